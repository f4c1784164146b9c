"""Row-sparse value optimizers: equal to dense AdamW when every row is touched, wired into
optimizer groups, clipping and the model's memory layers."""

import math

import pytest
import torch

from memlayers.kernels import embedding_bag, row_grad_of
from memlayers.memory import MemoryConfig
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer
from memlayers.train.optim import (
    ChainedOptimizer,
    OptimConfig,
    build_optimizer,
    clip_gradients,
    uses_row_grads,
)
from memlayers.train.row_optim import RowAdagrad, RowAdamW, RowSGD


def all_rows_read(table, step, backend, table_grad):
    """A loss whose bags read every row of ``table`` (with random weights, different every step)."""
    g = torch.Generator().manual_seed(step)
    n = table.shape[0]
    indices = torch.cat([torch.randperm(n, generator=g), torch.randint(0, n, (n,), generator=g)]).view(-1, 4)
    weights = torch.randn(indices.shape, generator=g)
    target = torch.randn(indices.shape[0], table.shape[1], generator=g)
    out = embedding_bag(indices, weights, table, backend=backend, table_grad=table_grad)
    return (out - target).square().sum()


@pytest.mark.parametrize("backend", ["cpu", "torch_rows"])
def test_row_adamw_equals_dense_adamw_when_every_row_is_touched(backend):
    init = torch.randn(24, 8)
    dense, rows = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    reference, ours = torch.optim.AdamW([dense], **kwargs), RowAdamW([rows], **kwargs)
    for step in range(6):
        all_rows_read(dense, step, "reference", "dense").backward()
        all_rows_read(rows, step, backend, "rows").backward()
        assert rows.grad is None and row_grad_of(rows) is not None
        reference.step()
        ours.step()
        reference.zero_grad()
        ours.zero_grad()
        assert row_grad_of(rows) is None
    torch.testing.assert_close(rows, dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.state[rows]["exp_avg"], reference.state[dense]["exp_avg"])
    assert ours.state[rows]["row_step"].tolist() == [6] * 24


def test_row_optimizers_with_dense_gradients_and_state_dtypes():
    table = torch.nn.Parameter(torch.randn(10, 4))
    grad = torch.zeros(10, 4)
    grad[3] = 1.0
    for optimizer in (RowAdamW([table], lr=0.1, state_dtype=torch.bfloat16), RowAdagrad([table], lr=0.1), RowSGD([table], lr=0.1)):
        before = table.detach().clone()
        table.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        changed = (table.detach() != before).any(dim=1)
        assert changed.tolist() == [i == 3 for i in range(10)]
    states = RowAdamW([table], lr=0.1, state_dtype=torch.bfloat16)
    table.grad = grad.clone()
    states.step()
    assert states.state[table]["exp_avg"].dtype == torch.bfloat16
    assert RowAdagrad([table]).state == {} and table.grad is not None
    with pytest.raises(ValueError, match="tables"):
        RowAdagrad([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="state_dtype"):
        RowAdamW([table], state_dtype=torch.float16)


def tiny_model(variant="plus"):
    memory = MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=8, variant=variant)
    return Transformer(ModelConfig(dim=16, n_layers=2, n_heads=2, vocab_size=50, multiple_of=16, memory_layers=(0, 1), memory=memory))


@pytest.mark.parametrize("name", ["row_adamw", "row_adagrad", "row_sgd"])
def test_build_optimizer_chains_adamw_with_the_value_optimizer(name):
    model = tiny_model()
    config = OptimConfig(value_optimizer=name, value_lr=0.05)
    assert uses_row_grads(config) and not uses_row_grads(OptimConfig())
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, ChainedOptimizer)
    adamw, values = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW)
    assert [p for g in values.param_groups for p in g["params"]] == [model.memory_pool.values]
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "values"]
    assert optimizer.param_groups[-1]["lr"] == 0.05
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)


def test_clipping_scales_row_gradients_like_dense_ones():
    tokens = torch.randint(0, 50, (2, 6))
    dense_model, rows_model = tiny_model(), tiny_model()
    rows_model.load_state_dict(dense_model.state_dict())
    for layer in rows_model.memory_layers():
        layer.table_grad = "rows"
    config = OptimConfig(value_optimizer="row_sgd", value_grad_clip=1e-3, grad_clip=None)
    dense_opt = build_optimizer(dense_model, OptimConfig(value_grad_clip=1e-3, grad_clip=None))
    rows_opt = build_optimizer(rows_model, config)
    dense_model(tokens, targets=tokens).loss.backward()
    rows_model(tokens, targets=tokens).loss.backward()
    values = rows_model.memory_pool.values
    assert values.grad is None
    dense_grad = dense_model.memory_pool.values.grad.clone()
    torch.testing.assert_close(row_grad_of(values).to_dense(), dense_grad)  # both layers' reads summed
    norms_dense, norms_rows = clip_gradients(dense_opt, config), clip_gradients(rows_opt, config)
    assert norms_rows["value_grad_norm"] == pytest.approx(norms_dense["value_grad_norm"], rel=1e-5)
    assert norms_rows["grad_norm"] == pytest.approx(norms_dense["grad_norm"], rel=1e-5)
    clipped = row_grad_of(values).to_dense()
    assert math.sqrt(float(clipped.double().square().sum())) == pytest.approx(1e-3, rel=1e-4)
    torch.testing.assert_close(clipped, dense_model.memory_pool.values.grad)


def test_peer_tables_train_with_row_optimizers():
    """PEER's two tables (expert inputs ``up`` and outputs ``values``) both leave row
    gradients; a step moves exactly the rows the batch selected, in both."""
    model = tiny_model("peer")
    for layer in model.memory_layers():
        layer.table_grad = "rows"
    optimizer = build_optimizer(model, OptimConfig(value_optimizer="row_adagrad", value_lr=0.1))
    pool = model.memory_pool
    up_before, values_before = pool.up.detach().clone(), pool.values.detach().clone()
    tokens = torch.randint(0, 50, (2, 5))
    model(tokens, targets=tokens).loss.backward()
    assert pool.up.grad is None and pool.values.grad is None
    read = row_grad_of(pool.values).segments().rows
    torch.testing.assert_close(row_grad_of(pool.up).segments().rows, read)
    optimizer.step()
    selected = torch.zeros(64, dtype=torch.bool)
    selected[read] = True
    assert 0 < int(selected.sum()) < 64
    assert torch.equal((pool.up.detach() != up_before).any(dim=1), selected)
    assert torch.equal((pool.values.detach() != values_before).any(dim=1), selected)
