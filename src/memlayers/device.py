"""The one device picker of every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked."""

from __future__ import annotations

import torch

from memlayers.config import ConfigError

CHOICES = "auto, cpu, cuda or cuda:N"
"""The device names memlayers takes, as its error messages list them."""


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The ``torch.device`` of ``name``: ``auto`` is CUDA when available, else the CPU.

    ``key`` is where the name came from (``train.device``, ``--device``, lm-eval's
    ``device``); it starts the :class:`~memlayers.config.ConfigError` raised for a
    name that is not a device of :data:`CHOICES`, or a CUDA device this machine
    does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, f"unknown device {name!r}; use {CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(key, f"unknown device {name!r}; use {CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name} asked for, but no CUDA device is available; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(key, f"{name} asked for, but this machine has {count} CUDA device(s); "
                                   f"use cuda:0 to cuda:{count - 1}")
    return device
