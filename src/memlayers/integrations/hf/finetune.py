"""Train a retrofitted transformers model with the memlayers trainer.

:class:`CausalLMAdapter` puts a transformers causal LM behind the interface of
memlayers' own :class:`~memlayers.model.transformer.Transformer`, so the
trainer, factual-QA evaluation and generation run on it unchanged;
:func:`train_memory` freezes all but the memory and trains on the text that
the run config names::

    model = AutoModelForCausalLM.from_pretrained("my-llama")
    add_memory(model, layers=[4, 12], memory=MemoryConfig(n_keys=256), mode="parallel")
    config = load_config(RunConfig, overrides=["data.train=notes.txt",
                                                "data.tokenizer=my-llama/tokenizer.json"])
    train_memory(model, config)
    model.save_pretrained("my-llama-memory")

or from the command line, ``memlayers retrofit my-llama --layers 4,12 --out
my-llama-memory data.train=notes.txt model.memory.n_keys=256``
(:func:`retrofit_pretrained`).

Under torchrun (``torchrun --nproc-per-node N -m memlayers.cli retrofit ...``)
rank 0 loads the base model and the other ranks build it on the meta device;
the trainer shards it and fills every rank's shards from rank 0: FSDP2
over the frozen base's decoder layers and the rest, memory parallelism over the
value pool (``parallel.*``); checkpoints hold only the memory and its optimizer
state, with a fingerprint of the base model that a ``--resume`` must match.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
)

from memlayers.config import ConfigError
from memlayers.data.tokenizer import FILE_NAME, Tokenizer
from memlayers.distributed.comm import launch_rank
from memlayers.integrations.hf.modeling import CACHE_FIELD
from memlayers.integrations.hf.retrofit import Mode, add_memory, freeze_all_but_memory
from memlayers.memory.layer import MemoryLayer
from memlayers.model.attention import KVCache
from memlayers.model.transformer import LMOutput, next_token_loss
from memlayers.train.checkpoint import CheckpointError
from memlayers.train.config import RunConfig
from memlayers.train.trainer import Trainer


class CausalLMAdapter(nn.Module):
    """A transformers causal LM called like a memlayers ``Transformer``.

    ``forward(tokens, targets=None, cache=None)`` returns ``LMOutput``;
    ``targets`` are aligned with ``tokens`` (position t predicts
    ``targets[:, t]``, ``-100`` ignored). With a memlayers ``KVCache`` the
    model's own transformers cache lives in ``cache.external``.
    ``config.max_seq_len`` is the model's ``max_position_embeddings``.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.lm = model
        self.config = SimpleNamespace(max_seq_len=model.config.max_position_embeddings)

    @property
    def wrapped_model(self) -> PreTrainedModel:
        """The transformers model: memory layer and table names are relative to it."""
        return self.lm

    def memory_layers(self) -> list[MemoryLayer]:
        """The memory layers, in depth order."""
        return [m for m in self.modules() if isinstance(m, MemoryLayer)]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None) -> LMOutput:
        """Logits ``(B, T, vocab)`` for ``tokens`` ``(B, T)``, and the mean loss against ``targets``."""
        past = None
        if cache is not None:
            if cache.external is None:
                cache.external = DynamicCache()
            past = cache.external
        logits = self.lm(input_ids=tokens, use_cache=cache is not None, **{CACHE_FIELD: past}).logits  # (B, T, V)
        if cache is not None:
            cache.length += tokens.shape[1]
        loss = None if targets is None else next_token_loss(logits, targets)
        return LMOutput(logits, loss, None)


def _with_model_tokenizer(model: PreTrainedModel, config: RunConfig) -> RunConfig:
    """``config`` with ``data.tokenizer`` set to the model's own ``tokenizer.json`` when unset,
    checked to give ids the model embeds (a ConfigError naming ``data.tokenizer`` otherwise)."""
    file = config.data.tokenizer
    if file is None:
        model_dir = Path(model.name_or_path) if model.name_or_path else None
        if model_dir is None or not (model_dir / FILE_NAME).is_file():
            where = f"{model_dir} has no {FILE_NAME}" if model_dir else "the model was not loaded from a directory"
            raise ConfigError(
                "data.tokenizer",
                f"not set, and {where}; set it to the tokenizer.json the model was trained with "
                "(a tokenizer trained here would feed the model ids it never saw)",
            )
        file = str(model_dir / FILE_NAME)
    vocab = Tokenizer.load(file).vocab_size
    rows = model.get_input_embeddings().num_embeddings
    if vocab > rows:
        raise ConfigError(
            "data.tokenizer",
            f"{file} has {vocab} tokens but the model embeds only {rows}; set it to the model's own tokenizer.json",
        )
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=file))


def train_memory(
    model: PreTrainedModel,
    config: RunConfig,
    freeze: bool = True,
    resume: bool | str | Path = False,
) -> dict[str, Any]:
    """Train ``model`` (retrofitted with ``add_memory``) on the run config's data; returns the trainer's summary.

    ``config.data`` names the user's text (``data.train``) and the model's
    ``tokenizer.json`` (``data.tokenizer``; unset, the one in the directory the
    model was loaded from); a tokenizer with more tokens than the model embeds
    is refused. ``optim`` and ``train`` work as in ``memlayers train``
    (``optim.value_lr`` for the value pool, checkpoints and ``resume`` in
    ``train.out_dir``). With ``freeze`` only the memory layers, their pool and
    their gates are trained. The model is trained in place. Under torchrun every
    rank passes the same model (built alike, memory initialised from the same
    seed); it is left sharded (see :func:`full_state_dict`).
    """
    if not any(isinstance(m, MemoryLayer) for m in model.modules()):
        raise ValueError("the model has no memory layers; call memlayers.integrations.hf.add_memory first")
    config = _with_model_tokenizer(model, config)
    if freeze:
        freeze_all_but_memory(model)
    return Trainer(config, resume=resume, model=CausalLMAdapter(model)).fit()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a model that training under torchrun left sharded, on rank 0's
    CPU (None on the other ranks, which must call too); the model's own in one process, and on
    rank 0 of processes torchrun started that never formed a group (``retrofit --no-train``)."""
    if not dist.is_initialized():
        return model.state_dict() if launch_rank() == 0 else None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if dist.get_rank() == 0 else None


def meta_model(model_dir: str | Path) -> PreTrainedModel:
    """The model ``from_pretrained(model_dir)`` gives, built on the meta device from its config:
    the same classes, names, shapes and dtypes, no weights read (see
    :mod:`memlayers.distributed.rank0_init`)."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def retrofit_pretrained(
    model_dir: str | Path,
    out_dir: str | Path,
    layers: list[int],
    mode: Mode,
    config: RunConfig,
    train: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Load a local transformers model, add memory layers, train them, save the result; returns the training summary.

    The memory is ``config.model.memory`` (the rest of ``config.model`` is not
    used), initialised from ``train.seed``; training is :func:`train_memory` on
    ``config.data`` with the model's own ``tokenizer.json`` unless
    ``data.tokenizer`` names one (``resume``: from the latest checkpoint in
    ``train.out_dir``). The retrofitted model (and the model's tokenizer, when
    it has one) is saved to ``out_dir`` with ``save_pretrained`` (by rank 0
    under torchrun). Under torchrun only rank 0 reads the base model's weights;
    the other ranks build it on the meta device (:func:`meta_model`) and receive
    their shards from rank 0. Nothing is downloaded.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} has no config.json: give a local transformers model directory")
    if launch_rank() == 0:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    else:  # torchrun's other ranks: shapes only; the trainer gives them rank 0's weights after sharding
        model = meta_model(model_dir)
    torch.manual_seed(config.train.seed)  # the same memory on every rank, and in every run of this command
    add_memory(model, layers, config.model.memory, mode)
    summary = train_memory(model, config, resume=resume) if train else {}
    state = full_state_dict(model)
    if state is not None:
        model.save_pretrained(out_dir, state_dict=state)
        if (model_dir / FILE_NAME).is_file() or (model_dir / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(out_dir)
    return summary
