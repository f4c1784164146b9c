"""The models continual learning works on: memlayers checkpoints and transformers directories.

A transformers directory (``config.json``, weights, ``tokenizer.json``) holds
a model retrofitted with :func:`memlayers.integrations.hf.add_memory` (or one
exported by ``memlayers export``). It is wrapped in
:class:`~memlayers.integrations.hf.CausalLMAdapter`, so every command calls it
like a memlayers model, reads it with its own tokenizer, and writes what it
produces as a transformers directory again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from memlayers.data.tokenizer import Tokenizer
from memlayers.train.checkpoint import (
    CheckpointError,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)

DEFAULT_TRANSFORMERS_SEQ_LEN = 512
"""Sequence length of a transformers model's batches (capped by its max_position_embeddings)."""


@dataclass
class LoadedModel:
    """A model ready for ``model(tokens, targets)``, its tokenizer, and where it came from."""

    model: nn.Module
    tokenizer: Tokenizer
    seq_len: int
    """Tokens per sequence it trained on (memlayers) or a default within its context (transformers)."""
    path: Path
    """The checkpoint directory, or the transformers directory."""
    run: object | None = None
    """The memlayers run config (None for a transformers model)."""

    @property
    def is_transformers(self) -> bool:
        """Whether the model is a transformers directory's."""
        return self.run is None

    def save(self, out: str | Path, step: int | None = None) -> Path:
        """Write ``model`` as its source was: a memlayers checkpoint under run directory ``out``
        (at ``step``, default the source's), or a transformers directory ``out`` with the tokenizer."""
        from memlayers.config import to_dict

        out = Path(out)
        if self.is_transformers:
            self.model.lm.save_pretrained(out)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (self.path / name).is_file():
                    shutil.copyfile(self.path / name, out / name)
            return out
        step = int(read_state(self.path)["step"]) if step is None else step
        return save_checkpoint(out, step, self.model, None, {"config": to_dict(self.run)},
                               tokenizer_path=self.path / "tokenizer.json")


def is_transformers_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers model directory (not a memlayers checkpoint or run)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "state.json").is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A memlayers checkpoint (or run directory: its latest) or a transformers directory, in eval mode."""
    path = Path(path)
    if not is_transformers_dir(path):
        from memlayers.train.pretrained import load_pretrained

        checkpoint = resolve_checkpoint(path)
        model, tokenizer, run = load_pretrained(checkpoint, device)
        return LoadedModel(model, tokenizer, run.data.seq_len, checkpoint, run)
    try:
        from transformers import AutoModelForCausalLM

        from memlayers.integrations.hf import CausalLMAdapter
    except ImportError:
        raise CheckpointError(f"{path} is a transformers directory: install memlayers[hf] to read it") from None
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer.json; save the model's tokenizer beside it")
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    seq_len = min(DEFAULT_TRANSFORMERS_SEQ_LEN, lm.config.max_position_embeddings)
    return LoadedModel(CausalLMAdapter(lm).to(device).eval(), Tokenizer.load(path / "tokenizer.json"), seq_len, path)
