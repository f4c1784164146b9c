"""What a training log says about speed: tokens/s per device, model FLOPs utilisation, peak memory.

MFU is the model's training FLOPs per second (3x the forward FLOPs per token of
:func:`memlayers.model.accounting.count_flops`: forward plus a backward of twice
the forward) over the device's peak dense bfloat16 FLOP/s, from the same table of
GPUs the planner uses (:data:`memlayers.distributed.plan.GPUS`). On a device not
in that table (a CPU, another GPU) it is left out rather than guessed.
"""

from __future__ import annotations

import resource

import torch

from memlayers.distributed.plan import GPUS

TRAIN_FLOPS_PER_FORWARD = 3
"""Training FLOPs per forward FLOP: the backward costs about twice the forward."""


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bfloat16 FLOP/s of ``device`` when it is a GPU the planner knows, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, gpu in GPUS.items():
        if key in name:
            return gpu.bf16_tflops * 1e12
    return None


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated on a GPU, resident on the CPU, MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def throughput_fields(tokens_per_s: float, world: int, device: torch.device,
                      forward_flops_per_token: float | None) -> dict[str, float]:
    """The log fields for a run training ``tokens_per_s`` tokens/s over ``world`` devices:
    ``tokens_per_s_per_device``, ``peak_memory_mib`` and, when the FLOPs and the device's
    peak are known, ``mfu``."""
    per_device = tokens_per_s / world
    fields = {"tokens_per_s_per_device": per_device, "peak_memory_mib": peak_memory_mib(device)}
    peak = device_peak_flops(device)
    if peak is not None and forward_flops_per_token:
        fields["mfu"] = TRAIN_FLOPS_PER_FORWARD * forward_flops_per_token * per_device / peak
    return fields
