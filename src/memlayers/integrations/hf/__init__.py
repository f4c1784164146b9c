"""Hugging Face transformers integration (needs ``pip install memlayers[hf]``).

- :class:`MemlayersConfig` / :class:`MemlayersForCausalLM`: memlayers models as
  transformers models, registered with ``AutoConfig`` / ``AutoModelForCausalLM``.
- :func:`export_to_hf` / :func:`import_from_hf`: memlayers checkpoint <-> transformers directory.
- :func:`add_memory`: retrofit memory layers into a Llama, Mistral, Qwen2 or Qwen3 model;
  :func:`freeze_all_but_memory` and :func:`train_memory` train them with the memlayers trainer;
  :func:`retrofit_pretrained` does all of it for a model directory (``memlayers retrofit``),
  also under torchrun (:func:`full_state_dict` gathers the sharded result).
"""

from memlayers.integrations.hf.convert import export_to_hf, import_from_hf
from memlayers.integrations.hf.finetune import (
    CausalLMAdapter,
    full_state_dict,
    retrofit_pretrained,
    train_memory,
)
from memlayers.integrations.hf.modeling import MemlayersConfig, MemlayersForCausalLM
from memlayers.integrations.hf.retrofit import (
    FAMILIES,
    ParallelMemory,
    add_memory,
    freeze_all_but_memory,
    memory_parameters,
)

__all__ = [
    "FAMILIES",
    "CausalLMAdapter",
    "MemlayersConfig",
    "MemlayersForCausalLM",
    "ParallelMemory",
    "add_memory",
    "export_to_hf",
    "freeze_all_but_memory",
    "full_state_dict",
    "import_from_hf",
    "memory_parameters",
    "retrofit_pretrained",
    "train_memory",
]
