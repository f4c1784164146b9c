"""Load a trained model, its tokenizer and its config from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from memlayers.config import ConfigError, from_dict
from memlayers.data.tokenizer import Tokenizer
from memlayers.model.transformer import Transformer
from memlayers.train.checkpoint import (
    CheckpointError,
    load_model_weights,
    read_state,
    resolve_checkpoint,
)
from memlayers.train.config import RunConfig


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    mmap: bool = False) -> tuple[Transformer, Tokenizer, RunConfig]:
    """Model (in eval mode), tokenizer and run config of a checkpoint or a run's latest one.

    ``mmap`` (CPU only): the weights stay views of the checkpoint file mapped into memory, so
    a value table larger than free RAM is read from disk page by page as tokens touch its rows.
    """
    path = resolve_checkpoint(path)
    state = read_state(path)
    try:
        config = from_dict(RunConfig, state["config"])
    except (ConfigError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} has an invalid config ({error})") from None
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no tokenizer.json; copy the run's tokenizer.json into it")
    tokenizer = Tokenizer.load(path / "tokenizer.json")
    if mmap:
        if torch.device(device).type != "cpu":
            raise CheckpointError("memory-mapped loading is for the CPU; load to a GPU without it")
        with torch.device("meta"):  # nothing allocated: the file's tensors are assigned
            model = Transformer(config.model)
        load_model_weights(path, model, mmap=True)
        model.init_buffers("cpu")
        return model.eval(), tokenizer, config
    model = Transformer(config.model)
    load_model_weights(path, model)
    return model.to(device).eval(), tokenizer, config
