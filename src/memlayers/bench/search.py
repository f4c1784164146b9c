"""Benchmark (e): the product-key search, the fused backend against the torch reference.

Times the top-knn selection from given half scores (what the backends differ
in), forward and forward+backward, and the whole search of a layer (query
projection, sub-key scores and selection) forward+backward, each for the
reference and for the backend ``auto`` picks on the device, at 256**2 and
1024**2 slots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from memlayers.bench.timing import time_ms
from memlayers.kernels.search import product_key_topk, resolve_search_backend
from memlayers.memory import MemoryConfig, ProductKeySearch


@dataclass
class SearchShape:
    """Tokens, heads and knn of the search benchmark (the layer benchmark's: 8 x 256 tokens, 4 heads, knn 32)."""

    tokens: int = 2048
    dim: int = 512
    heads: int = 4
    knn: int = 32
    k_dim: int = 256
    n_keys: tuple[int, ...] = (256, 1024)


def _selection(halves: torch.Tensor, knn: int, backend: str, device: torch.device,
               repeat: int) -> tuple[float, float]:
    """Forward and forward+backward ms of the top-knn selection alone."""
    leaf = halves.detach().requires_grad_()
    grad = torch.randn(*halves.shape[:-2], knn, device=device, dtype=halves.dtype)

    def forward():
        with torch.no_grad():
            product_key_topk(halves, knn, backend)

    def forward_backward():
        scores, _ = product_key_topk(leaf, knn, backend)
        scores.backward(grad)
        leaf.grad = None

    return time_ms(forward, device, repeat), time_ms(forward_backward, device, repeat)


def _search(search: ProductKeySearch, x: torch.Tensor, device: torch.device, repeat: int) -> float:
    """Forward+backward ms of a whole search module."""

    def forward_backward():
        scores, _ = search(x)
        scores.sum().backward()
        search.zero_grad(set_to_none=True)

    return time_ms(forward_backward, device, repeat)


def bench_search(shape: SearchShape, device: torch.device, repeat: int = 5) -> dict:
    """(e): selection and whole-search times per table size, reference against the fast backend."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape.tokens, shape.dim, generator=g).to(device)  # (T, dim)
    cases = []
    for n_keys in shape.n_keys:
        halves = torch.randn(shape.tokens, shape.heads, 2, n_keys, generator=g).to(device)  # (T, H, 2, n)
        fast = resolve_search_backend("auto", halves, shape.knn)
        case = {"n_keys": n_keys, "slots": n_keys**2, "fast_backend": fast}
        for name, backend in (("reference", "reference"), ("fast", fast)):
            case[f"{name}_select_fwd_ms"], case[f"{name}_select_fwd_bwd_ms"] = _selection(
                halves, shape.knn, backend, device, repeat)
            torch.manual_seed(0)
            search = ProductKeySearch(shape.dim, MemoryConfig(n_keys=n_keys, heads=shape.heads, knn=shape.knn,
                                                              k_dim=shape.k_dim), backend=backend).to(device)
            case[f"{name}_search_fwd_bwd_ms"] = _search(search, x, device, repeat)
        for part in ("select_fwd", "select_fwd_bwd", "search_fwd_bwd"):
            case[f"{part}_speedup"] = case[f"reference_{part}_ms"] / case[f"fast_{part}_ms"]
        cases.append(case)
    return {"shape": asdict(shape), "cases": cases}
