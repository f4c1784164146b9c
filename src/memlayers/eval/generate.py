"""Autoregressive generation: greedy or sampled, batched by prompt length.

The model has no attention mask, so only prompts of equal token length share a
batch (left padding would change their outputs). When prompt and continuation
fit in ``model.config.max_seq_len``, the prompt is run once into a KV cache and
each new token costs one position; longer generations re-run the model on the
sequence cropped to its last ``max_seq_len`` tokens at every step.

With a model sharded over the ranks of a torchrun job, every rank calls
:func:`generate` with its own prompts (any number, even none) and the ranks
stay in lockstep (see :mod:`memlayers.eval.lockstep`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.eval.lockstep import Ranks
from memlayers.model.attention import KVCache


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped by equal length, in chunks of at most ``batch_size``.

    Groups come in order of each length's first appearance; indices keep their
    input order inside a group.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    return [
        indices[start : start + batch_size]
        for indices in groups.values()
        for start in range(0, len(indices), batch_size)
    ]


def truncate_at_stop(ids: list[int], stop_ids: Collection[int]) -> list[int]:
    """``ids`` up to and including the first stop id (all of ``ids`` if none occurs)."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1]
    return ids


def _next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``(B, V)``: argmax at temperature 0, else sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # sample where the generator lives
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    return sampled.to(logits.device)


def _generate_batch(
    model: nn.Module,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    stop: torch.Tensor | None,
    generator: torch.Generator | None,
    ranks: Ranks,
    live: bool,
) -> list[list[int]]:
    """New tokens for a batch of equal-length prompts ``tokens`` ``(B, P)``, untruncated.

    Stops early once every row has emitted a stop id (``stop`` ``(S,)``), on
    every rank of ``ranks``: until then a rank whose rows are all done keeps
    running the forward on its last token and picks nothing more. A batch
    that is not ``live`` is a placeholder that only runs those forwards.
    """
    max_len = model.config.max_seq_len
    prompt_len = tokens.shape[1]
    done = torch.full((tokens.shape[0],), not live, dtype=torch.bool, device=tokens.device)  # (B,)
    finished = not live
    cache = KVCache(max_len) if prompt_len + max_new_tokens <= max_len else None
    step_input = tokens  # (B, P): with a cache, the whole prompt once, then only the newest token
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(tokens[:, -max_len:]).logits[:, -1]  # (B, V)
        else:
            logits = model(step_input, cache=cache).logits[:, -1]  # (B, V)
        if not finished:
            new = _next_tokens(logits, temperature, top_k, generator)  # (B,)
            tokens = torch.cat([tokens, new[:, None]], dim=1)  # (B, T + 1)
            step_input = new[:, None]  # (B, 1)
            if stop is not None:
                done |= torch.isin(new, stop)  # (B,)
                finished = bool(done.all())
        if ranks.all(finished):
            break
    return tokens[:, prompt_len:].tolist()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    ``temperature`` 0 is greedy (argmax; ``top_k`` is then irrelevant);
    otherwise tokens are sampled from ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest logits (all when None), using
    ``generator`` (on any device) when given. An output ends with its first
    stop id, which is included. Outputs are in the order of ``prompts``.

    Prompts of equal length are batched together, at most ``batch_size`` at
    a time; a batch runs until all its rows have stopped or
    ``max_new_tokens`` is reached. The model runs in eval mode on its own
    device; its previous train/eval mode is restored afterwards.

    A model sharded over the ranks of a process group (DTensor parameters)
    needs every rank to call this, each with its own prompts and the same
    other arguments: the ranks run the same number of batches (placeholders
    where a rank has fewer) and a batch runs until its rows have stopped on
    every rank. Bad arguments on one rank raise on all of them.
    """
    ranks = Ranks(model)
    try:
        _check_arguments(prompts, max_new_tokens, temperature, top_k)
        buckets = length_buckets([len(p) for p in prompts], batch_size)
        error = None
    except ValueError as refused:
        buckets, error = [], refused
    ranks.agree(error)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = ranks.device
    stops = {int(s) for s in stop_ids}
    stop = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None  # (S,)
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for number in range(ranks.most(len(buckets))[0]):
            indices = buckets[number] if number < len(buckets) else []
            batch = [prompts[i] for i in indices] or [[0]]  # a placeholder for a rank with no batch left
            tokens = torch.tensor(batch, dtype=torch.long, device=device)  # (B, P)
            new = _generate_batch(
                model, tokens, max_new_tokens, temperature, top_k, stop, generator, ranks, live=bool(indices)
            )
            for index, ids in zip(indices, new[: len(indices)], strict=True):
                outputs[index] = truncate_at_stop(ids, stops)
    finally:
        model.train(was_training)
    return outputs


def _check_arguments(
    prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None
) -> None:
    """Raise ValueError for arguments :func:`generate` cannot run with."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty; a prompt needs at least one token")
