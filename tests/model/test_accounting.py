"""Parameter and FLOP accounting: hand-written counts, and agreement with the real modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from memlayers.memory.config import MemoryConfig
from memlayers.model import ModelConfig, MoEConfig, Transformer, count_flops, count_parameters


def _hand_config() -> ModelConfig:
    """dense block 0, Memory+ block 1, MoE block 2."""
    return ModelConfig(
        dim=16,
        n_layers=3,
        n_heads=2,
        n_kv_heads=1,
        vocab_size=50,
        max_seq_len=32,
        ffn_hidden_dim=24,
        memory_layers=(1,),
        memory=MemoryConfig(n_keys=8, heads=2, knn=3, k_dim=8),
        moe_layers=(2,),
        moe=MoEConfig(n_experts=4, top_k=2, hidden_dim=8),
    )


def test_parameter_counts_by_hand():
    counts = count_parameters(_hand_config())
    # head_dim = 16 / 2 = 8.
    # Attention per block: wq 16*(2*8) + wk 16*(1*8) + wv 16*(1*8) + wo (2*8)*16
    attention = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16  # 768
    norms = 2 * 16  # attention_norm and ffn_norm gains
    embedding = 50 * 16 + 16 * 50  # untied: token embedding + output head = 1600
    final_norm = 16
    dense_ffn = 3 * 16 * 24  # w1, w3, w2 = 1152
    # Memory+ layer: W_q (16 -> 2 heads * 8) + bias, sub-keys 2 heads * 2 halves * 8 keys * (8/2),
    # W_1 and W_2 (16 <-> value_dim 16).
    memory_layer = 16 * 2 * 8 + 2 * 8 + 2 * 2 * 8 * 4 + 16 * 16 + 16 * 16  # 912
    pool = 8 * 8 * 16  # 64 slots of 16 values = 1024
    moe = 16 * 4 + 4 * 3 * 16 * 8  # router + 4 SwiGLU experts of hidden 8 = 1600
    total = embedding + final_norm + 3 * (attention + norms) + dense_ffn + memory_layer + pool + moe
    assert total == 8704
    assert counts.total == total
    assert counts.embedding == embedding
    assert counts.memory == memory_layer + pool
    # Active per token: all but the 49 other input-embedding rows, the 2 experts not routed to,
    # and the pool rows not read (a token reads heads * knn = 6 of the 64 rows).
    inactive = 49 * 16 + 2 * (3 * 16 * 8) + (64 - 2 * 3) * 16
    assert counts.active == total - inactive == 6224


def test_flop_counts_by_hand():
    seq_len = 10
    flops = count_flops(_hand_config(), seq_len=seq_len)
    head = 2 * 16 * 50  # output head
    projections = 3 * 2 * 768  # wq, wk, wv, wo in each of 3 blocks
    dense = 2 * 3 * 16 * 24
    memory = 2 * 16 * 16 + 2 * 2 * 16 * 16  # query projection + W_1 and W_2
    moe = 2 * 16 * 4 + 2 * (2 * 3 * 16 * 8)  # router + 2 routed experts
    assert flops.matmul == head + projections + dense + memory + moe == 11712
    # q.k and weighted sum: 2 flops * 2 products * 2 heads * head_dim 8 * mean context (10 + 1) / 2
    assert flops.attention == pytest.approx(3 * 2 * 2 * 2 * 8 * (seq_len + 1) / 2)
    # 2 heads * (two halves of 8 sub-keys of size 4, 2 flops each = 2 * 8 * 8; 3 * 3 candidate sums)
    assert flops.key_search == 2 * (2 * 8 * 8 + 3 * 3) == 274
    # 2 heads * 3 slots * 16 values, a multiply-add each
    assert flops.value_read == 2 * 2 * 3 * 16 == 192
    assert flops.total == pytest.approx(11712 + 1056 + 274 + 192)
    assert flops.as_dict() == {
        "matmul": 11712,
        "attention": pytest.approx(1056),
        "key_search": 274,
        "value_read": 192,
        "total": pytest.approx(13234),
    }


def test_flops_default_sequence_is_max_seq_len():
    config = _hand_config()
    assert count_flops(config) == count_flops(config, seq_len=config.max_seq_len)
    assert count_flops(config, seq_len=7).attention < count_flops(config, seq_len=8).attention


def test_peer_counts_by_hand():
    config = ModelConfig(
        dim=8,
        n_layers=3,
        n_heads=2,
        vocab_size=20,
        max_seq_len=16,
        ffn_hidden_dim=12,
        tie_embeddings=True,
        memory_layers=(0, 2),
        memory=MemoryConfig(
            n_keys=4, heads=1, knn=2, k_dim=4, variant="peer", gated=True, query_bias=False
        ),
    )
    counts = count_parameters(config)
    attention = 4 * 8 * 8  # head_dim 4, 2 heads, no GQA: four 8x8 matrices
    # W_q (no bias), sub-keys 1 head * 4 keys * 4, gate
    memory_layer = 8 * 1 * 4 + 1 * 4 * 4 + (8 + 1)
    pool = 16 * (8 + 8)  # 16 slots, each a value row and a PEER input row
    total = 20 * 8 + 8 + 3 * (attention + 2 * 8) + 3 * 8 * 12 + 2 * memory_layer + pool
    assert counts.total == total
    assert counts.embedding == 20 * 8  # tied: counted once
    assert counts.memory == 2 * memory_layer + pool
    # Tied embedding: the whole matrix is the output head, so all of it is active.
    # Two layers read the shared pool, 1 head * 2 slots each: 4 of 16 rows.
    assert counts.active == total - (16 - 4) * 16

    flops = count_flops(config, seq_len=5)
    assert flops.matmul == 2 * 8 * 20 + 3 * 2 * attention + 2 * 3 * 8 * 12 + 2 * (2 * 8 * 4 + 2 * 8)
    # PEER reads a value row and dots the input with an up row for every selected slot.
    assert flops.value_read == 2 * (2 * 1 * 2 * 8 + 2 * 1 * 2 * 8)
    assert flops.key_search == 2 * 1 * (2 * 4 * 4 + 2 * 2)


def test_shared_pool_active_rows_are_capped_at_pool_size():
    memory = MemoryConfig(n_keys=2, heads=2, knn=2, k_dim=4)  # 4 slots, each layer reads 4 rows
    config = ModelConfig(
        dim=8,
        n_layers=2,
        n_heads=2,
        vocab_size=10,
        ffn_hidden_dim=8,
        memory_layers=(0, 1),
        memory=memory,
    )
    counts = count_parameters(config)
    # Every pool row is active; only the other input-embedding rows are not.
    assert counts.active == counts.total - 9 * 8


def _model_memory_params(model: Transformer) -> int:
    memory_modules = model.memory_layers()  # in either memory mode
    total = sum(p.numel() for module in memory_modules for p in module.parameters())
    if model.memory_pool is not None:
        total += sum(p.numel() for p in model.memory_pool.parameters())
    return total


MEMORY = {"n_keys": 4, "heads": 2, "knn": 2, "k_dim": 6}
CONFIGS = {
    "dense_untied": {},
    "dense_tied": {"tie_embeddings": True},
    "gqa": {"n_heads": 4, "n_kv_heads": 2},
    "llama_hidden": {"ffn_hidden_dim": None, "multiple_of": 8, "ffn_dim_multiplier": 1.5},
    "shared_pool": {
        "n_layers": 3,
        "memory_layers": (0, 2),
        "memory": {**MEMORY, "shared_values": True},
    },
    "unshared_pools": {
        "n_layers": 3,
        "memory_layers": (0, 2),
        "memory": {**MEMORY, "shared_values": False},
    },
    "gated_qk_norm_no_bias": {
        "memory_layers": (1,),
        "memory": {**MEMORY, "gated": True, "qk_norm": True, "query_bias": False},
    },
    "value_dim": {"memory_layers": (1,), "memory": {**MEMORY, "value_dim": 10}},
    "plain": {"memory_layers": (1,), "memory": {**MEMORY, "variant": "plain"}},
    "plain_value_dim": {
        "memory_layers": (1,),
        "memory": {**MEMORY, "variant": "plain", "value_dim": 6},
    },
    "peer_shared": {
        "n_layers": 3,
        "memory_layers": (0, 1),
        "memory": {**MEMORY, "variant": "peer"},
    },
    "peer_unshared": {
        "memory_layers": (0,),
        "memory": {**MEMORY, "variant": "peer", "shared_values": False},
    },
    "parallel": {"memory_layers": (1,), "memory_mode": "parallel", "memory": {**MEMORY, "gated": True}},
    "moe": {"moe_layers": (0,), "moe": {"n_experts": 3, "top_k": 2, "hidden_dim": 5}},
    "moe_default_hidden": {"moe_layers": (1,), "moe": {"n_experts": 2, "top_k": 1}},
    "everything": {
        "n_layers": 4,
        "n_heads": 4,
        "n_kv_heads": 1,
        "tie_embeddings": True,
        "memory_layers": (1, 3),
        "moe_layers": (2,),
        "memory": {**MEMORY, "gated": True, "value_dim": 7},
    },
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_matches_the_real_model(tiny_config, name):
    config = tiny_config(**CONFIGS[name])
    model = Transformer(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    if not config.tie_embeddings:
        embedding += model.output.weight.numel()
    assert counts.embedding == embedding
    assert counts.memory == _model_memory_params(model)
    assert (counts.memory > 0) == bool(config.memory_layers)
    assert 0 < counts.active <= counts.total


@register_flop_formula(torch.ops.aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The MoE's grouped matmuls, which FlopCounterMode does not count: (N, K) rows, each
    against one group's (K, M) matrix of ``b`` (G, K, M)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize(
    "name", ["dense_untied", "gqa", "moe", "shared_pool", "value_dim", "parallel", "everything"]
)
def test_matmul_and_key_search_flops_match_torch_flop_counter(tiny_config, name):
    """torch's FlopCounterMode counts the matmuls of a real forward (not the embedding bag or
    SDPA on CPU); per token they must equal ``matmul`` plus the sub-key score part of ``key_search``.
    The search runs its reference (the C search scores inside its kernel, out of the counter's sight)."""
    config = tiny_config(**CONFIGS[name])
    model = Transformer(config)
    for layer in model.memory_layers():
        layer.search.backend = "reference"
    T = 9
    tokens = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counted.items() if str(op) in ("aten.mm", "aten.addmm", "aten._grouped_mm"))
    batched = sum(v for op, v in counted.items() if str(op) == "aten.bmm")
    flops = count_flops(config, seq_len=T)
    assert matmuls == T * flops.matmul
    m = config.memory
    knn_sums = len(config.memory_layers) * m.heads * m.knn**2
    assert batched == T * (flops.key_search - knn_sums)


def test_paper_memory_adds_about_a_billion_parameters():
    dense = ModelConfig(dim=1024, n_layers=24, n_heads=16, vocab_size=32000)
    memory = ModelConfig(
        dim=1024,
        n_layers=24,
        n_heads=16,
        vocab_size=32000,
        memory_layers=(4, 12, 20),
        memory=MemoryConfig(n_keys=1024, heads=4, knn=32, k_dim=512),
    )
    d, m = count_parameters(dense), count_parameters(memory)
    pool = 1024**2 * 1024  # 1M slots of 1024 values
    # Each Memory+ layer: W_q 1024 -> 4 * 512 with bias, 4 heads * 1024 sub-keys * 512, W_1 and W_2.
    layer = 1024 * 4 * 512 + 4 * 512 + 4 * 1024 * 512 + 2 * 1024 * 1024
    dense_ffn = 3 * 1024 * 2816
    assert m.memory == pool + 3 * layer
    assert m.total - d.total == pool + 3 * layer - 3 * dense_ffn
    # Memory reads 3 layers * 4 heads * 32 rows per token: active grows by far less than total.
    assert m.active - d.active < (m.total - d.total) / 100
    assert count_flops(memory).value_read == 3 * 2 * 4 * 32 * 1024
