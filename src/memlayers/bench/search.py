"""Benchmark (e): the product-key search, the fused backend against the torch reference.

Times the top-knn selection from given half scores (what the backends differ
in), forward and forward+backward, and the whole search of a layer (query
projection, sub-key scores and selection) forward+backward, each for the
reference and for the backend ``auto`` picks on the device, at 256**2 and
1024**2 slots. All six are timed in turns, and each speedup is the median over
rounds of the reference's time over the fast backend's in that round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from memlayers.bench.timing import round_ratios, time_rounds
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


PARTS = ("select_fwd", "select_fwd_bwd", "search_fwd_bwd")


def _selection(halves: torch.Tensor, knn: int, backend: str, device: torch.device) -> tuple[Callable, Callable]:
    """The top-knn selection alone, forward and forward+backward, as functions to time."""
    leaf = halves.detach().requires_grad_()
    grad = torch.randn(*halves.shape[:-2], knn, device=device, dtype=halves.dtype)

    def forward():
        with torch.no_grad():
            product_key_topk(halves, knn, backend)

    def forward_backward():
        scores, _ = product_key_topk(leaf, knn, backend)
        scores.backward(grad)
        leaf.grad = None

    return forward, forward_backward


def _search(search: ProductKeySearch, x: torch.Tensor) -> Callable:
    """A whole search module forward+backward, as a function to time."""

    def forward_backward():
        scores, _ = search(x)
        scores.sum().backward()
        search.zero_grad(set_to_none=True)

    return forward_backward


def bench_search(shape: SearchShape, device: torch.device, repeat: int = 5) -> dict:
    """(e): selection and whole-search times per table size, reference against the fast backend."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape.tokens, shape.dim, generator=g).to(device)  # (T, dim)
    cases = []
    for n_keys in shape.n_keys:
        halves = torch.randn(shape.tokens, shape.heads, 2, n_keys, generator=g).to(device)  # (T, H, 2, n)
        fast = resolve_search_backend("auto", halves, shape.knn)
        case = {"n_keys": n_keys, "slots": n_keys**2, "fast_backend": fast}
        fns = {}
        for name, backend in (("reference", "reference"), ("fast", fast)):
            fns[name, "select_fwd"], fns[name, "select_fwd_bwd"] = _selection(halves, shape.knn, backend, device)
            torch.manual_seed(0)
            search = ProductKeySearch(shape.dim, MemoryConfig(n_keys=n_keys, heads=shape.heads, knn=shape.knn,
                                                              k_dim=shape.k_dim), backend=backend).to(device)
            fns[name, "search_fwd_bwd"] = _search(search, x)
        rounds = time_rounds(fns, device, repeat)
        for (name, part), times in rounds.items():
            case[f"{name}_{part}_ms"] = statistics.median(times)
        for part in PARTS:
            ratio = round_ratios(rounds["reference", part], rounds["fast", part])
            case[f"{part}_speedup"], case[f"{part}_speedup_quartiles"] = ratio["median"], [ratio["q1"], ratio["q3"]]
        cases.append(case)
    return {"shape": asdict(shape), "cases": cases}
