"""Retrofit memory layers into an existing Llama-family transformers model.

``add_memory(model, layers=[...], memory=MemoryConfig(...), mode=...)`` changes
the model in place:

- ``mode="replace"``: the chosen decoder layers' MLPs become memory layers;
- ``mode="parallel"``: a memory layer is added beside each chosen MLP, its
  output scaled by a per-channel gate initialised to zero, so the model
  computes exactly what it did until training moves the gates.

All added memory layers read one value pool, registered once on the base
model as ``memory_pool`` (unless ``memory.shared_values`` is false). The
change is recorded in the config (``memory_retrofit``) and the model and
config become the family's memory classes (``LlamaMemoryForCausalLM``,
``model_type = "llama_memory"``, subclasses of the originals) registered with
the Auto classes, so ``save_pretrained`` then ``AutoModelForCausalLM.from_pretrained``
rebuilds the memory layers and loads their weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.llama import LlamaConfig, LlamaForCausalLM
from transformers.models.mistral import MistralConfig, MistralForCausalLM
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

from memlayers.config import ConfigError, check_layers, from_dict, to_dict
from memlayers.memory.config import MemoryConfig
from memlayers.memory.layer import MemoryLayer
from memlayers.memory.pool import MemoryPool

Mode = Literal["replace", "parallel"]
MODES = ("replace", "parallel")


class ParallelMemory(nn.Module):
    """An MLP with a memory layer beside it: ``mlp(x) + gate * memory(x)``.

    ``gate`` ``(dim,)`` starts at zero, so at first the block is the MLP alone.
    """

    def __init__(self, mlp: nn.Module, memory: MemoryLayer):
        super().__init__()
        self.mlp = mlp
        self.memory = memory
        ref = next(mlp.parameters())
        self.gate = nn.Parameter(torch.zeros(memory.dim, device=ref.device, dtype=ref.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim) -> (B, T, dim)``."""
        return self.mlp(x) + self.gate * self.memory(x)


def _memory_classes(base_config: type, base_model: type) -> tuple[type, type]:
    """The config and causal-LM subclasses of a family that carry ``memory_retrofit``."""
    name = base_model.__name__.removesuffix("ForCausalLM")
    config_cls = type(
        f"{name}MemoryConfig",
        (base_config,),
        {
            "__module__": __name__,
            "__doc__": f"{base_config.__name__} with memory layers retrofitted (``memory_retrofit``).",
            "model_type": f"{base_config.model_type}_memory",
            "__annotations__": {"memory_retrofit": "dict | None"},
            "memory_retrofit": None,
        },
    )

    def __init__(self, config):  # noqa: N807 - becomes the class's __init__
        base_model.__init__(self, config)
        if config.memory_retrofit:
            _install(self, config.memory_retrofit)

    model_cls = type(
        f"{name}MemoryForCausalLM",
        (base_model,),
        {
            "__module__": __name__,
            "__doc__": f"{base_model.__name__} whose config's ``memory_retrofit`` adds memory layers.",
            "config_class": config_cls,
            "__init__": __init__,
        },
    )
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


FAMILIES: dict[str, tuple[type, type]] = {
    base_config.model_type: _memory_classes(base_config, base_model)
    for base_config, base_model in (
        (LlamaConfig, LlamaForCausalLM),
        (MistralConfig, MistralForCausalLM),
        (Qwen2Config, Qwen2ForCausalLM),
        (Qwen3Config, Qwen3ForCausalLM),
    )
}
"""model_type -> (memory config class, memory causal-LM class) of each supported family."""


def _install(model: PreTrainedModel, spec: dict[str, Any]) -> None:
    """Build the memory layers that ``spec`` (a ``memory_retrofit`` dict) describes."""
    memory = from_dict(MemoryConfig, spec["memory"])
    base = model.model
    dim = model.config.hidden_size
    ref = next(base.layers[spec["layers"][0]].mlp.parameters())
    pool = None
    if memory.shared_values:
        pool = MemoryPool(dim, memory).to(ref.device)
        base.memory_pool = pool
    for index in spec["layers"]:
        layer = base.layers[index]
        memory_layer = MemoryLayer(dim, memory, pool=pool)
        for name, module in memory_layer.named_children():
            if name != "pool":  # a layer's own pool keeps the value dtype of its config
                module.to(device=ref.device, dtype=ref.dtype)
        memory_layer.to(ref.device)
        layer.mlp = memory_layer if spec["mode"] == "replace" else ParallelMemory(layer.mlp, memory_layer)


def add_memory(
    model: PreTrainedModel,
    layers: Iterable[int],
    memory: MemoryConfig | None = None,
    mode: Mode = "parallel",
) -> PreTrainedModel:
    """Add memory layers to a Llama, Mistral, Qwen2 or Qwen3 causal LM, in place; returns it.

    ``layers`` are 0-based decoder-layer indices. ``mode="replace"`` swaps
    their MLPs for memory layers; ``mode="parallel"`` keeps the MLPs and adds
    a zero-gated memory layer beside each (outputs unchanged at first). The
    memory layers are new, initialised as in memlayers; the rest of the
    model keeps its weights.
    """
    model_type = model.config.model_type
    if model_type.endswith("_memory"):
        raise ConfigError("layers", f"this {model_type} model already has memory layers; add them once")
    if model_type not in FAMILIES:
        raise ConfigError("model", f"cannot retrofit a {model_type!r} model; supported: {sorted(FAMILIES)}")
    if mode not in MODES:
        raise ConfigError("mode", f"must be one of {list(MODES)}, got {mode!r}")
    layers = [int(i) for i in layers]
    if not layers:
        raise ConfigError("layers", "name at least one decoder layer")
    check_layers(layers, "layers", model.config.num_hidden_layers)
    spec = {"layers": layers, "mode": mode, "memory": to_dict(memory or MemoryConfig())}
    _install(model, spec)
    config_cls, model_cls = FAMILIES[model_type]
    model.config.__class__ = config_cls
    model.config.memory_retrofit = spec
    model.__class__ = model_cls
    return model


def memory_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the memory layers, their value pool and parallel gates, by name."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (MemoryLayer, MemoryPool)):
            names.update(f"{prefix}.{name}" for name, _ in module.named_parameters())
        elif isinstance(module, ParallelMemory):
            names.add(f"{prefix}.gate")
    return {name: param for name, param in model.named_parameters() if name in names}


def freeze_all_but_memory(model: nn.Module) -> list[str]:
    """Stop gradients to every parameter outside the memory; returns the names still trained."""
    trained = memory_parameters(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return sorted(trained)
