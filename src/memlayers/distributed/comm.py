"""Process groups and the two collectives memory parallelism needs, for uneven batch sizes.

Everything here is plain ``torch.distributed``: the process group is created
from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...), NCCL on GPUs and gloo on CPUs, with a timeout so that a
rank that dies or hangs makes the others fail with an error instead of
waiting forever.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from memlayers.config import first_line

RECEIVED_BYTES = {"total": 0}
"""Bytes this rank has received through :func:`gather_sizes`, :func:`all_gather_rows` and
:func:`all_to_all_rows` (padding included): what the communication benchmark reads."""


def _count(*tensors: torch.Tensor) -> None:
    RECEIVED_BYTES["total"] += sum(t.numel() * t.element_size() for t in tensors)


class PeerLostError(RuntimeError):
    """A collective failed because another rank died, hung or left."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a collective's backend error into one line that says what happened and what to do."""
    try:
        yield
    except PeerLostError:
        raise
    except (RuntimeError, dist.DistBackendError) as error:
        raise PeerLostError(
            f"{what}: a peer rank died, hung past the timeout or left ({first_line(error)}); "
            "the run stops here; restart it with --resume from the last checkpoint"
        ) from error


def init_distributed(timeout_s: float = 300.0) -> torch.device:
    """Join the job ``torchrun`` started; returns this rank's device.

    The backend is NCCL when CUDA is available (one GPU per local rank), gloo
    otherwise. ``timeout_s`` bounds every collective: a peer that never
    arrives raises on the others after that long.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("not launched by torchrun: RANK and WORLD_SIZE are unset; start with torchrun --nproc-per-node N")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    return device


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting RANK and WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without one), readable before
    and without a process group."""
    return int(os.environ.get("RANK", "0"))


def barrier() -> None:
    """Wait for every rank (a dead or hung one raises after the timeout)."""
    with collective("barrier"):
        dist.barrier()


def sum_over(group: dist.ProcessGroup):
    """A function summing over ``group`` what each rank holds of a column-sharded table:
    a Python float (e.g. a squared norm; a float comes back) or a tensor (e.g. per-row
    sums of squares; summed in place and returned)."""

    def reduce(value: float | torch.Tensor) -> float | torch.Tensor:
        t = value if isinstance(value, torch.Tensor) else torch.tensor([value], dtype=torch.float64)
        with collective("all-reduce over the shards of a value table"):
            dist.all_reduce(t, group=group)
        return t if isinstance(value, torch.Tensor) else float(t)

    return reduce


def shutdown() -> None:
    """Leave the job cleanly: wait for every rank, then destroy the process group."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def gather_sizes(n: int, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    with collective("all-gather of batch sizes"):
        dist.all_gather(sizes, mine, group=group)
    _count(*sizes)
    return [int(s) for s in sizes]


def all_gather_rows(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` ``(sizes[r], ...)`` along dim 0, in rank order."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    with collective("all-gather of memory lookups"):
        dist.all_gather(parts, padded.contiguous(), group=group)
    _count(*parts)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows ``x[sum(send[:r]) : sum(send[:r+1])]`` to rank ``r``; return what arrives,
    ``(sum(recv), ...)`` ordered by source rank."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    with collective("all-to-all of memory reads"):
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    _count(out)
    return out
