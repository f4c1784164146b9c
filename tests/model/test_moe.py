"""MoE: routed output against a naive per-token loop, routing weights, balancing loss, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlayers.model import MoEConfig, Transformer
from memlayers.model.ffn import MoE, expert_outputs, expert_outputs_reference, grouped_mm_supported


def _moe(dim: int, hidden: int, seed: int = 0, dtype=torch.float64, **config) -> MoE:
    """A MoE with random (not zero) weights of order one."""
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, MoEConfig(**config))
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
        for weight in (moe.w1, moe.w3, moe.w2):
            weight.normal_(0.0, 0.5)
    return moe.to(dtype)


def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k experts, SwiGLU experts; weights renormalised
    over the chosen experts when top_k > 1, the raw probability when top_k == 1 (Switch)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    k = moe.config.top_k
    for m in range(flat.shape[0]):
        token = flat[m]
        probs = torch.softmax(moe.router.weight @ token, dim=0)  # (E,)
        chosen = sorted(range(moe.config.n_experts), key=lambda e: -probs[e].item())[:k]
        total = sum(probs[e] for e in chosen) if k > 1 else 1.0
        for e in chosen:
            hidden = F.silu(moe.w1[e] @ token) * (moe.w3[e] @ token)
            out[m] += probs[e] / total * (moe.w2[e] @ hidden)
    return out.reshape(x.shape)


@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (4, 2), (5, 3), (3, 3)])
def test_output_matches_naive_per_token_loop(n_experts, top_k):
    moe = _moe(6, 5, n_experts=n_experts, top_k=top_k)
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = moe(x)
        expected = _naive(moe, x)
    assert out.shape == x.shape and out.dtype == torch.float64
    assert expected.abs().amax() > 0.1
    torch.testing.assert_close(out, expected)


def test_every_expert_is_used_in_the_naive_comparison():
    """Guard against a vacuous comparison: the random batch reaches every expert."""
    moe = _moe(6, 5, n_experts=4, top_k=1)
    x = torch.randn(21, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, _, experts = moe.route(x)
    assert set(experts.flatten().tolist()) == {0, 1, 2, 3}


def test_routing_weights_are_renormalised_top_k_probabilities():
    moe = _moe(8, 4, n_experts=6, top_k=3)
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probs, weights, experts = moe.route(x)
    assert probs.shape == (40, 6) and weights.shape == (40, 3) and experts.shape == (40, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(40, dtype=probs.dtype))
    torch.testing.assert_close(weights.sum(-1), torch.ones(40, dtype=weights.dtype))
    assert (weights > 0).all()
    # The chosen experts are distinct and the most probable ones.
    assert all(len(set(row)) == 3 for row in experts.tolist())
    chosen = probs.gather(-1, experts)  # (40, 3)
    others = probs.masked_fill(F.one_hot(experts, 6).sum(1).bool(), -1.0)
    assert (chosen.amin(-1) >= others.amax(-1)).all()
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_aux_loss_matches_formula_on_random_batch():
    moe = _moe(8, 4, n_experts=5, top_k=2)
    x = torch.randn(4, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    moe(x)
    probs, _, experts = moe.route(x.reshape(-1, 8))
    M = 24
    counts = torch.zeros(5, dtype=torch.float64)
    for e in experts.flatten().tolist():
        counts[e] += 1
    fraction = counts / (M * 2)  # fraction of the routed assignments per expert
    mean_prob = probs.double().mean(0)
    expected = 5 * (fraction * mean_prob).sum()
    torch.testing.assert_close(moe.aux_loss.double(), expected, rtol=1e-6, atol=1e-7)


def _one_hot_router_moe(top_k: int) -> MoE:
    """4 experts on 4-d inputs; input e_i has router logits ln3 for expert i,
    ln2 for expert i+1 (mod 4) and 0 for the others: probabilities 3/7, 2/7, 1/7, 1/7."""
    moe = _moe(4, 3, n_experts=4, top_k=top_k)
    weight = torch.zeros(4, 4, dtype=torch.float64)
    for i in range(4):
        weight[i, i] = math.log(3)
        weight[(i + 1) % 4, i] = math.log(2)
    with torch.no_grad():
        moe.router.weight.copy_(weight)
    return moe


def _inputs(*indices: int) -> torch.Tensor:
    return torch.eye(4, dtype=torch.float64)[list(indices)]


def test_aux_loss_hand_computed_top1():
    moe = _one_hot_router_moe(top_k=1)
    moe(_inputs(0, 0, 1))
    # Tokens e0, e0, e1 go to experts 0, 0, 1: f = (2/3, 1/3, 0, 0).
    # P = (2 * (3, 2, 1, 1) + (1, 3, 2, 1)) / (7 * 3) = (7, 7, 4, 3) / 21.
    # aux = 4 * (2/3 * 7/21 + 1/3 * 7/21) = 4 * 7/21 = 4/3.
    torch.testing.assert_close(moe.aux_loss.double(), torch.tensor(4 / 3, dtype=torch.float64))


def test_aux_loss_hand_computed_top2():
    moe = _one_hot_router_moe(top_k=2)
    moe(_inputs(0, 0, 1))
    # Assignments: e0 -> {0, 1} twice, e1 -> {1, 2}: counts (2, 3, 1, 0) of 6, f = (1/3, 1/2, 1/6, 0).
    # P = (7, 7, 4, 3) / 21 as above.
    # aux = 4 * (1/3 * 1/3 + 1/2 * 1/3 + 1/6 * 4/21) = 4 * 39/126 = 26/21.
    torch.testing.assert_close(moe.aux_loss.double(), torch.tensor(26 / 21, dtype=torch.float64))


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_when_balanced(top_k):
    moe = _one_hot_router_moe(top_k=top_k)
    moe(_inputs(0, 1, 2, 3))
    # Each expert gets the same share of assignments and the same mean probability 1/4.
    torch.testing.assert_close(moe.aux_loss.double(), torch.tensor(1.0, dtype=torch.float64))


def test_gradients_reach_router_and_routed_experts():
    moe = _moe(6, 5, n_experts=4, top_k=2)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, _, experts = moe.route(x.reshape(-1, 6))
    used = set(experts.flatten().tolist())
    assert len(used) >= 2
    direction = torch.randn(
        2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    (moe(x) * direction).sum().backward()
    assert moe.router.weight.grad.abs().amax() > 1e-4
    for weight in (moe.w1, moe.w3, moe.w2):
        for e in range(4):
            norm = weight.grad[e].abs().amax()
            assert (norm > 0) == (e in used), (e, used, norm)


def test_aux_loss_gradient_reaches_router_only():
    moe = _moe(6, 5, n_experts=4, top_k=2)
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    moe(x)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().amax() > 1e-6
    assert all(w.grad is None or w.grad.abs().amax() == 0 for w in (moe.w1, moe.w2, moe.w3))


def test_top1_router_learns_from_the_task_loss():
    moe = _moe(6, 5, n_experts=4, top_k=1)
    x = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    direction = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (moe(x) * direction).sum().backward()
    expert_grad = moe.w2.grad.abs().amax()
    assert expert_grad > 1e-3
    assert moe.router.weight.grad.abs().amax() > 1e-3 * expert_grad


def test_moe_in_transformer_receives_gradients(tiny_config):
    config = tiny_config(moe_layers=(0,), moe={"n_experts": 3, "top_k": 2})
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    model(tokens, tokens.roll(-1, dims=1)).loss.backward()
    moe = model.layers[0].ffn
    assert isinstance(moe, MoE)
    for param in (moe.router.weight, moe.w1, moe.w2, moe.w3):
        assert param.grad is not None and param.grad.abs().amax() > 0


def _expert_inputs(counts: list[int], dim: int = 8, hidden: int = 12, dtype=torch.float32):
    generator = torch.Generator().manual_seed(7)
    h = torch.randn(sum(counts), dim, dtype=dtype, generator=generator)
    weights = [torch.randn(len(counts), *shape, dtype=dtype, generator=generator) * 0.5
               for shape in ((hidden, dim), (hidden, dim), (dim, hidden))]
    return h, weights, torch.tensor(counts)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2]])
def test_grouped_expert_outputs_match_the_per_expert_loop(counts):
    """The grouped matmuls against the loop they replace: outputs and every gradient, empty experts included."""
    h, weights, counts = _expert_inputs(counts)
    assert grouped_mm_supported(h, weights[0])
    results = []
    for run in (expert_outputs, expert_outputs_reference):
        leaves = [t.clone().requires_grad_() for t in (h, *weights)]
        out = run(*leaves, counts)
        direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
        (out * direction).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    assert results[1][0].abs().amax() > 0.1
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_moe_takes_the_grouped_path_and_matches_the_naive_loop():
    moe = _moe(8, 12, dtype=torch.float32, n_experts=5, top_k=2)
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    assert grouped_mm_supported(x, moe.w1)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), _naive(moe, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("dtype", "dim", "hidden", "expected"), [
    (torch.float32, 8, 12, True), (torch.bfloat16, 8, 16, True), (torch.float32, 6, 12, False),
    (torch.float32, 8, 5, False), (torch.float64, 8, 12, False)])
def test_grouped_path_only_where_grouped_mm_takes_the_operands(dtype, dim, hidden, expected):
    """Rows of 16-byte multiples in float32 / bfloat16 on the CPU; anything else runs the loop."""
    moe = _moe(dim, hidden, dtype=dtype)
    assert grouped_mm_supported(torch.zeros(1, dim, dtype=dtype), moe.w1) == expected
