"""Conversion between a memlayers checkpoint and a transformers model directory.

``export_to_hf`` writes what ``save_pretrained`` writes (``config.json``,
``model.safetensors``, ``generation_config.json``) plus the tokenizer as a
transformers fast tokenizer that puts BOS first (as memlayers feeds its
models), so ``AutoModelForCausalLM`` and ``AutoTokenizer`` load the directory. ``import_from_hf`` writes such a directory back as a
memlayers checkpoint (step 0, no optimizer state) that ``memlayers eval``,
``generate`` and ``train --resume-from`` read.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from memlayers.config import ConfigError, from_dict, to_dict
from memlayers.data.tokenizer import Tokenizer
from memlayers.integrations.hf.modeling import MemlayersConfig, MemlayersForCausalLM
from memlayers.train.checkpoint import CheckpointError, save_checkpoint
from memlayers.train.config import RunConfig
from memlayers.train.pretrained import load_pretrained


def _token(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    """The text of a special token id (None stays None)."""
    return None if token_id is None else tokenizer.backend.id_to_token(token_id)


def _with_bos(tokenizer: Tokenizer) -> HFTokenizer:
    """A copy of the tokenizer's backend that puts BOS first, as memlayers encodes for its
    models (``tokenizer(text)`` then gives the ids that ``memlayers eval`` feeds)."""
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    if tokenizer.bos_id is not None:
        bos = _token(tokenizer, tokenizer.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_id)]
        )
    return backend


def export_to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a memlayers checkpoint (or a run's latest) as a transformers directory.

    The model's weights keep their memlayers names under ``model.``; the run
    config beyond the model is kept in ``config.json`` as ``memlayers_run``.
    """
    model, tokenizer, run = load_pretrained(checkpoint)
    out = Path(out_dir)
    run_rest = {key: value for key, value in to_dict(run).items() if key != "model"}
    hf_model = MemlayersForCausalLM.from_memlayers(
        model,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        memlayers_run=run_rest,
    )
    hf_model.save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_with_bos(tokenizer),
        bos_token=_token(tokenizer, tokenizer.bos_id),
        eos_token=_token(tokenizer, tokenizer.eos_id),
        pad_token=_token(tokenizer, tokenizer.pad_id),
    )
    fast.model_max_length = model.config.max_seq_len
    fast.save_pretrained(out)
    return out


def _read_hf_config(hf_dir: Path) -> MemlayersConfig:
    """The directory's config, checked to describe a memlayers model."""
    file = hf_dir / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json: not a transformers model directory")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON ({error})") from None
    if model_type != MemlayersConfig.model_type:
        raise CheckpointError(
            f"{hf_dir} holds a {model_type!r} model; only memlayers models (model_type 'memlayers') convert "
            "to memlayers checkpoints (a retrofitted model stays a transformers model: load it with from_pretrained)"
        )
    return MemlayersConfig.from_pretrained(hf_dir)


def import_from_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Write a transformers directory of a memlayers model as ``run_dir/checkpoints/step_00000000``.

    The directory must hold ``tokenizer.json`` (``export_to_hf`` writes it).
    The run config is the one kept at export when there is one, else the
    defaults around the model; ``train.out_dir`` becomes ``run_dir``.
    """
    hf_dir = Path(hf_dir)
    config = _read_hf_config(hf_dir)
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{hf_dir} has no tokenizer.json; save the model's tokenizer into it first")
    model = MemlayersForCausalLM.from_pretrained(hf_dir, config=config).model
    run_dict = {**(config.memlayers_run or {}), "model": to_dict(model.config)}
    run_dict.setdefault("train", {})["out_dir"] = str(run_dir)
    try:
        run = from_dict(RunConfig, run_dict)
    except ConfigError as error:
        raise CheckpointError(f"{hf_dir}/config.json: memlayers_run is not a valid run config ({error})") from None
    return save_checkpoint(run_dir, 0, model, None, {"config": to_dict(run)}, tokenizer_path=tokenizer_file)
