"""The Triton bag over quantized tables against the torch reference (and the C kernel).

Without a CUDA device the kernel runs on CPU tensors under Triton's interpreter;
with one, the ``gpu`` tests run it compiled and check that ``auto`` picks it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (see conftest)

pytest.importorskip("triton")

from memlayers.kernels import cpu, embedding_bag, triton_quantized  # noqa: E402
from memlayers.kernels.quantized import QuantizedTable, quantized_bag, quantized_bag_reference  # noqa: E402
from memlayers.kernels.triton_bag import _INTERPRETED  # noqa: E402

needs_interpreter = pytest.mark.skipif(not _INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1")
needs_compiled_gpu = pytest.mark.skipif(
    _INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device and compiled (not interpreted) kernels"
)


def case(bits, group_size, d, *, rows=60, bags=(3, 4), k=37, seed=0, device="cpu"):
    """A quantized table of rows at different scales, lookups with repeats, signed weights."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, d, generator=g) * (torch.rand(rows, 1, generator=g) * 3 + 0.1)
    q = QuantizedTable.quantize(table, bits, group_size).to(device)
    ids = torch.randint(0, rows, (*bags, k), generator=g)
    ids[..., 1] = ids[..., 0]  # a row read twice by one bag
    weights = torch.randn(*bags, k, generator=g)
    return q, ids.to(device), weights.to(device)


LAYOUTS = [(8, 32, 40), (8, 32, 300), (4, 8, 40), (4, 16, 64), (4, 2, 6), (4, 32, 288)]


@needs_interpreter
@pytest.mark.parametrize("bits,group_size,d", LAYOUTS)
def test_triton_bag_equals_the_reference(bits, group_size, d):
    # dims off powers of two (masked column tails), one past a column block (300, 288 > 256),
    # and bags of 37 lookups: one full block of BLOCK_K and a masked tail
    q, ids, weights = case(bits, group_size, d, seed=d + bits)
    ours = quantized_bag(ids, weights, q, "triton")
    expected = quantized_bag_reference(ids, weights, q)
    assert ours.shape == (3, 4, d) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1  # not a table of zeros: a wrong code or scale would show
    if cpu.available():  # and the C kernel: three implementations of one read
        torch.testing.assert_close(ours, quantized_bag(ids, weights, q, "cpu"), rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("bits", [8, 4])
def test_nibbles_and_scales_are_read_per_column(bits):
    # one lookup per bag with weight 1 returns the dequantized row itself: each column's own
    # code (low or high nibble) and its own group's scale, exactly
    q, _, _ = case(bits, 4, 24, rows=9)
    ids = torch.arange(9).reshape(9, 1)
    out = quantized_bag(ids, torch.ones(9, 1), q, "triton")
    assert torch.equal(out, q.dequantize())


@needs_interpreter
def test_int32_ids_bf16_scales_and_empty_bags():
    q, ids, weights = case(4, 8, 40)
    expected = quantized_bag_reference(ids, weights, q)
    torch.testing.assert_close(quantized_bag(ids.int(), weights, q, "triton"), expected, rtol=1e-5, atol=1e-5)
    q.to(torch.bfloat16)  # a model cast to bf16 casts the scales, not the codes
    assert q.scales.dtype == torch.bfloat16
    torch.testing.assert_close(quantized_bag(ids, weights, q, "triton"), quantized_bag_reference(ids, weights, q),
                               rtol=1e-5, atol=1e-5)
    for backend in ("triton", "cpu") if cpu.available() else ("triton",):
        no_lookups = quantized_bag(ids[..., :0], weights[..., :0], q, backend)
        assert no_lookups.shape == (3, 4, 40) and not no_lookups.any()
        assert quantized_bag(ids[:0], weights[:0], q, backend).shape == (0, 4, 40)


@needs_interpreter
def test_embedding_bag_passes_the_triton_backend_on(monkeypatch):
    q, ids, weights = case(8, 32, 16)
    calls = []
    real = triton_quantized.quantized_bag
    monkeypatch.setattr(triton_quantized, "quantized_bag", lambda *a: calls.append(a) or real(*a))
    out = embedding_bag(ids, weights, q, "triton")
    assert len(calls) == 1
    torch.testing.assert_close(out, quantized_bag_reference(ids, weights, q), rtol=1e-5, atol=1e-5)
    embedding_bag(ids, weights, q)  # auto on a CPU table is the C kernel (or the reference), not Triton
    assert len(calls) == 1


@needs_interpreter
def test_bad_inputs_raise_clear_errors():
    q, ids, weights = case(4, 8, 16)
    with pytest.raises(IndexError, match=r"must lie in \[0, 60\)"):
        triton_quantized.quantized_bag(q.codes, q.scales, 16, 4, 8, torch.full((2, 3), 60), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"must be \(B, K\) of one shape"):
        triton_quantized.quantized_bag(q.codes, q.scales, 16, 4, 8, ids[0], weights[0, :, :3])
    with pytest.raises(ValueError, match=r"ids \(3, 4, 37\) and weights \(3, 4, 37\) must be \(B, K\)"):
        triton_quantized.quantized_bag(q.codes, q.scales, 16, 4, 8, ids, weights)  # (..., K): flatten first


# ---------------------------------------------------------------- compiled on a GPU


@pytest.mark.gpu
@needs_compiled_gpu
@pytest.mark.parametrize("bits,group_size,d", LAYOUTS + [(8, 32, 1024), (4, 32, 1024)])
def test_gpu_triton_bag_equals_the_reference(bits, group_size, d):
    q, ids, weights = case(bits, group_size, d, rows=5000, bags=(64, 8), k=32, seed=d, device="cuda")
    ours = quantized_bag(ids, weights, q)  # auto: Triton on a CUDA table
    torch.testing.assert_close(ours, quantized_bag_reference(ids, weights, q), rtol=1e-5, atol=1e-4)
    q.to(torch.bfloat16)
    torch.testing.assert_close(quantized_bag(ids, weights, q, "triton"), quantized_bag_reference(ids, weights, q),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@needs_compiled_gpu
def test_gpu_auto_picks_triton_and_cpu_tables_are_refused(monkeypatch):
    q, ids, weights = case(8, 32, 64, device="cuda")
    calls = []
    real = triton_quantized.quantized_bag
    monkeypatch.setattr(triton_quantized, "quantized_bag", lambda *a: calls.append(a) or real(*a))
    quantized_bag(ids, weights, q)
    assert len(calls) == 1
    cpu_q, cpu_ids, cpu_weights = case(8, 32, 64)
    with pytest.raises(ValueError, match="need GPU tensors"):
        real(cpu_q.codes, cpu_q.scales, 64, 8, 32, cpu_ids.reshape(-1, 37), cpu_weights.reshape(-1, 37))
