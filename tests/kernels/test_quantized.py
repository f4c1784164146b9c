"""Quantized value tables: the error bound of the codes, the C bags against the torch reference."""

import pytest
import torch

from memlayers.kernels import cpu, embedding_bag
from memlayers.kernels.quantized import QuantizedTable, quantized_bag, quantized_bag_reference
from memlayers.memory import MemoryConfig, MemoryLayer
from memlayers.memory.pool import MemoryPool

needs_c = pytest.mark.skipif(not cpu.available(), reason="no C compiler")


@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 16), (4, 64)])
def test_dequantized_values_are_within_half_a_step(bits, group_size):
    torch.manual_seed(bits + group_size)
    table = torch.randn(300, 64) * torch.rand(300, 1) * 3  # rows of different scales
    table[7] = 0.0  # an all-zero row stays zero
    q = QuantizedTable.quantize(table, bits, group_size)
    restored = q.dequantize()
    assert restored.shape == table.shape and torch.equal(restored[7], table[7])
    steps = q.scales if bits == 8 else q.scales.repeat_interleave(group_size, dim=1)
    steps = steps.unsqueeze(1) if bits == 8 else steps
    assert ((restored - table).abs() <= steps / 2 + 1e-6).all()
    assert (restored - table).abs().max() > 0  # it is lossy: the test can tell
    assert q.nbytes == table.numel() * bits // 8 + q.scales.numel() * 4
    # rows read by id are the rows of the whole table
    ids = torch.tensor([[3, 7], [299, 0]])
    assert torch.equal(q.dequantize(ids), restored[ids])


@needs_c
@pytest.mark.parametrize("bits,group_size,dim", [(8, 32, 32), (4, 8, 32), (4, 32, 32), (4, 48, 96), (4, 64, 128)])
def test_c_bag_equals_the_reference(bits, group_size, dim):
    # int4 groups of 4, 16, 24 and 32 bytes: the vector loops (8 or 16 bytes a step) and their tails
    torch.manual_seed(1)
    q = QuantizedTable.quantize(torch.randn(500, dim), bits, group_size)
    ids = torch.randint(0, 500, (4, 6, 24))
    weights = torch.rand(4, 6, 24)
    ours = quantized_bag(ids, weights, q, "cpu")
    torch.testing.assert_close(ours, quantized_bag_reference(ids, weights, q))
    # and the float bag over the dequantized table
    torch.testing.assert_close(ours, embedding_bag(ids, weights, q.dequantize(), "reference"), rtol=1e-5, atol=1e-5)
    q.to(torch.bfloat16)  # casting a model casts the scales (not the codes); the C bag reads them right still
    assert q.scales.dtype == torch.bfloat16 and q.codes.dtype in (torch.int8, torch.uint8)
    torch.testing.assert_close(quantized_bag(ids, weights, q, "cpu"), quantized_bag_reference(ids, weights, q))


def test_reads_need_no_grad_and_bad_layouts_are_refused():
    q = QuantizedTable.quantize(torch.randn(10, 8), 8)
    weights = torch.rand(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="for inference"):
        quantized_bag(torch.zeros(2, 3, dtype=torch.long), weights, q)
    with torch.no_grad():
        assert quantized_bag(torch.zeros(2, 3, dtype=torch.long), weights, q).shape == (2, 8)
    with pytest.raises(IndexError, match=r"must lie in \[0, 10\)"):
        quantized_bag(torch.full((2, 3), 10), weights.detach(), q)
    with pytest.raises(ValueError, match="group size must be even and divide"):
        QuantizedTable.quantize(torch.randn(10, 24), 4, 16)
    with pytest.raises(ValueError, match="8 or 4 bits"):
        QuantizedTable.quantize(torch.randn(10, 8), 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_reads_close_to_its_float_self(bits):
    torch.manual_seed(2)
    layer = MemoryLayer(32, MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8)).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        before = layer(x)
        table = layer.pool.values.detach().clone()
        layer.pool.quantize_(bits, 16)
        after = layer(x)
        exact = MemoryLayer(32, MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8)).eval()
        exact.load_state_dict({**layer.state_dict(), "pool.values": layer.pool.values.dequantize()}, strict=False)
    assert isinstance(layer.pool.values, QuantizedTable) and not any(
        p is table for p in layer.parameters())
    torch.testing.assert_close(after, exact(x).detach(), rtol=1e-5, atol=1e-6)  # reads the dequantized table
    error = (after - before).abs().max() / before.abs().max()
    assert 0 < error < (0.02 if bits == 8 else 0.2)


def test_a_pool_built_quantized_holds_codes_and_scales_in_its_state():
    pool = MemoryPool(64, MemoryConfig(n_keys=8, knn=4, value_dtype="int4", value_group_size=16))
    state = pool.state_dict()
    assert state["values.codes"].shape == (64, 32) and state["values.codes"].dtype == torch.uint8
    assert state["values.scales"].shape == (64, 4)
    with pytest.raises(ValueError, match="value_group_size.*divide its row size 64"):
        MemoryPool(64, MemoryConfig(n_keys=8, knn=4, value_dtype="int4", value_group_size=48))
