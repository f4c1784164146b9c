"""memlayers models as Hugging Face transformers models.

:class:`MemlayersConfig` (``model_type = "memlayers"``) carries a memlayers
:class:`~memlayers.model.config.ModelConfig` as a plain dict, and
:class:`MemlayersForCausalLM` wraps a :class:`~memlayers.model.transformer.Transformer`
as ``self.model``, so its weights keep memlayers' own names under ``model.``.
Both are registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when this
module is imported, so after ``import memlayers.integrations.hf``::

    model = AutoModelForCausalLM.from_pretrained("exported_dir")
    model.generate(input_ids, max_new_tokens=16)

``generate()`` runs on a transformers ``DynamicCache``: the wrapper hands the
Transformer a view of it with the interface of memlayers' own ``KVCache``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from memlayers.config import from_dict, to_dict
from memlayers.model.attention import rope_tables
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer

# transformers 5.24 renamed the cache argument of forward() and the output field from
# ``past_key_values`` to ``cache``; earlier 5.x releases pass and read ``past_key_values``
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class MemlayersConfig(PretrainedConfig):
    """A transformers config for a memlayers decoder LM.

    ``memlayers`` holds the memlayers ``ModelConfig`` as a dict (the same keys
    as the ``model:`` section of a run's YAML); the standard transformers
    attributes (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ...)
    are derived from it. ``memlayers_run`` optionally keeps the rest of the run
    config (data, optimizer, training) so that ``memlayers import`` restores it.
    """

    model_type = "memlayers"
    keys_to_ignore_at_inference = [CACHE_FIELD]

    memlayers: dict | None = None
    memlayers_run: dict | None = None
    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        model = self.model_config()  # validates the memlayers part (ConfigError naming the key)
        self.memlayers = to_dict(model)
        self.vocab_size = model.vocab_size
        self.hidden_size = model.dim
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.num_key_value_heads = model.kv_heads
        self.max_position_embeddings = model.max_seq_len
        self.tie_word_embeddings = model.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The memlayers ModelConfig this config describes."""
        return from_dict(ModelConfig, dict(self.memlayers or {}))


class _CacheView:
    """A transformers ``Cache`` seen through memlayers' ``KVCache`` interface
    (``length`` and ``update(layer, k, v)``), for one forward call."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(B, KV, T, hd)`` to ``layer``; return all cached so far."""
        return self.cache.update(k, v, layer)


class MemlayersPreTrainedModel(PreTrainedModel):
    """Base of the memlayers transformers models (config class, weight init)."""

    config_class = MemlayersConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the rotary tables: they are buffers outside the state dict, which
        loading on the meta device leaves empty. Every weight is initialised by
        memlayers' own init when the Transformer is built, or loaded."""
        if isinstance(module, Transformer):
            config = module.config
            cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
            with torch.no_grad():
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)


class MemlayersForCausalLM(MemlayersPreTrainedModel, GenerationMixin):
    """A memlayers :class:`Transformer` behind the transformers causal-LM interface.

    ``forward(input_ids, labels=..., cache=...)`` returns
    ``CausalLMOutputWithPast``; ``labels`` follow the transformers convention
    (same shape as ``input_ids``, shifted inside, ``-100`` ignored). An
    ``attention_mask`` with zeros marks padding: pad prompts on the left
    (``tokenizer.padding_side = "left"``) to generate a batch of different lengths.
    """

    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: MemlayersConfig):
        super().__init__(config)
        self.model = Transformer(config.model_config())
        self.post_init()

    @classmethod
    def from_memlayers(cls, model: Transformer, **config_kwargs: Any) -> MemlayersForCausalLM:
        """Wrap a trained memlayers ``model`` (its weights are shared, not copied).

        ``config_kwargs`` go to :class:`MemlayersConfig` (token ids,
        ``memlayers_run``).
        """
        config = MemlayersConfig(memlayers=to_dict(model.config), **config_kwargs)
        wrapper = cls(config)
        wrapper.model = model
        return wrapper.to(next(model.parameters()).device)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The token embedding table."""
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        """Replace the token embedding table."""
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        """The output projection."""
        return self.model.output

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        """Replace the output projection."""
        self.model.output = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` ``(B, T)`` after the cached positions; loss with ``labels``.

        ``cache`` is the transformers cache (``past_key_values`` before transformers 5.24).
        """
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing hidden: the plain causal path
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        targets = None
        if labels is not None:
            targets = torch.full_like(labels, -100)  # (B, T): position t predicts token t + 1
            targets[:, :-1] = labels[:, 1:]
        view = _CacheView(cache) if use_cache else None
        out = self.model(input_ids, targets, cache=view, attention_mask=attention_mask)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits[:, keep],  # (B, kept, vocab)
            **{CACHE_FIELD: cache if use_cache else None},
        )


AutoConfig.register(MemlayersConfig.model_type, MemlayersConfig, exist_ok=True)
AutoModelForCausalLM.register(MemlayersConfig, MemlayersForCausalLM, exist_ok=True)
