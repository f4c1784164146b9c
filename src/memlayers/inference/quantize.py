"""``memlayers quantize``: a checkpoint's value tables in int8 or int4, for inference.

The model is loaded, each memory pool's float table is replaced by its
quantization (:meth:`memlayers.memory.pool.MemoryPool.quantize_`), and the result
is written as a new checkpoint whose config says ``memory.value_dtype: int8``
(or ``int4``), so every command that loads checkpoints (``eval``, ``generate``,
``export``) builds the quantized pool and reads it. Training refuses it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from memlayers.config import ConfigError, to_dict
from memlayers.memory.pool import MemoryPool
from memlayers.train.checkpoint import (
    CheckpointError,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from memlayers.train.pretrained import load_pretrained


def quantize_checkpoint(source: str | Path, out: str | Path, bits: int, group_size: int = 32) -> dict[str, Any]:
    """Write ``source``'s model with ``bits``-bit value tables as a checkpoint under run directory
    ``out``; returns the paths and the table bytes before and after."""
    path = resolve_checkpoint(source)
    model, _, run = load_pretrained(path)
    pools = [m for m in model.modules() if isinstance(m, MemoryPool)]
    if not pools:
        raise CheckpointError(f"checkpoint {path} has no memory layers: there is no value table to quantize")
    if run.model.memory.quantized:
        raise CheckpointError(f"checkpoint {path} is quantized already ({run.model.memory.value_dtype}); "
                              "quantize the float checkpoint it came from")
    before = sum(p.values.numel() * p.values.element_size() for p in pools)
    for pool in pools:
        try:
            pool.quantize_(bits, group_size)
        except ValueError as error:
            raise ConfigError("--group-size", str(error)) from None
    after = sum(p.values.nbytes for p in pools)
    memory = dataclasses.replace(run.model.memory, value_dtype=f"int{bits}", value_group_size=group_size)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, memory=memory))
    written = save_checkpoint(out, int(read_state(path)["step"]), model, None, {"config": to_dict(run)},
                              tokenizer_path=path / "tokenizer.json")
    return {"source": str(path), "checkpoint": str(written), "bits": bits,
            "group_size": group_size if bits == 4 else None, "table_bytes": before, "quantized_bytes": after}
