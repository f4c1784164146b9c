"""The lm-evaluation-harness model ``memlayers``: a memlayers checkpoint behind lm-eval's LM API.

::

    lm_eval.simple_evaluate(model="memlayers", model_args="checkpoint=runs/tiny", tasks=[...])

Text is encoded as ``memlayers eval`` encodes it (BOS first when the tokenizer
has one), so lm-eval's scores of a checkpoint match memlayers' own. All three
request types run batched: log-likelihoods in batches of up to ``batch_size``
sequences sorted by length and padded on the right (harmless for a causal
model: a padding token cannot change an earlier position), generation through
:func:`memlayers.eval.generate.generate`, which batches prompts of equal length
(the model has no attention mask, so prompts are never padded).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

# lm-eval fills its model registry lazily only while it is empty: fill it first,
# or registering memlayers would hide "hf" and lm-eval's other models
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from memlayers.config import ConfigError
from memlayers.device import pick_device
from memlayers.eval.generate import generate, length_buckets
from memlayers.eval.loglikelihood import score_continuations
from memlayers.train.checkpoint import CheckpointError, resolve_checkpoint
from memlayers.train.pretrained import load_pretrained

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
_MODEL_ARGS = "checkpoint, device, batch_size, max_gen_toks, seed"

# A (context, continuation) request as TemplateLM hands it to _loglikelihood_tokens:
# the strings (None for rolling windows), the context ids and the continuation ids.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _batch_size(value: int | str | None) -> int:
    """``batch_size`` from lm-eval: an int or its string; ``auto`` (lm-eval's ``auto:N`` too) and None mean the default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ConfigError("batch_size", f"must be a positive integer or auto, got {value!r}") from None
    if size < 1:
        raise ConfigError("batch_size", f"must be a positive integer or auto, got {value!r}")
    return size


@register_model("memlayers")
class MemlayersLM(TemplateLM):
    """A memlayers checkpoint as an lm-eval model.

    Model arguments: ``checkpoint`` (required: a checkpoint directory, or a
    run directory for its latest checkpoint), ``device`` (``auto``: CUDA when
    available, else the CPU), ``batch_size`` (default 16; ``auto`` means the
    default), ``max_gen_toks`` (new tokens per generation unless a task says
    otherwise, default 256) and ``seed`` (of the generator used when a task
    samples, default 1234). ``max_batch_size``, which lm-eval passes to every
    model, is ignored. On lm-eval's command line ``device`` and ``batch_size``
    are its ``--device`` and ``--batch_size`` options, which it passes to every
    model. A missing or unreadable checkpoint raises memlayers'
    :class:`~memlayers.train.checkpoint.CheckpointError`, a device this machine
    does not have a :class:`~memlayers.config.ConfigError`.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_gen_toks: int | str = 256,
        seed: int | str = 1234,
        max_batch_size: int | None = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ConfigError("model_args", f"unknown argument(s) {sorted(unknown)}; memlayers takes {_MODEL_ARGS}")
        if not checkpoint:
            raise CheckpointError(
                "no checkpoint given; pass model_args checkpoint=PATH (a checkpoint or run directory)"
            )
        self._device = pick_device(device or "auto", "device")
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.model, self.tokenizer, _ = load_pretrained(self.checkpoint, self._device)
        self.batch_size = _batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._stop_id_cache: dict[tuple[str, ...], frozenset[int]] = {}

    # -- what lm-eval asks of a TemplateLM ------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) starts with: BOS, else EOS."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        """The longest sequence the model reads: its ``max_seq_len``."""
        return self.model.config.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        """New tokens per generation when a request does not say."""
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, after BOS when the tokenizer has one unless ``add_special_tokens`` is False.

        These are the ids of ``memlayers eval``: ``encode(text, bos=bos_id is not None)``.
        """
        bos = add_special_tokens is not False and self.tokenizer.bos_id is not None
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``tokens`` (BOS, EOS and padding dropped unless ``skip_special_tokens`` is False)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results' ``config``."""
        return {
            "memlayers_checkpoint": str(self.checkpoint),
            "memlayers_parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # -- log-likelihoods ------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """``(sum of log-probs of the continuation, whether it is the greedy continuation)`` per request.

        Context and continuation are joined and cropped on the left to
        ``max_length + 1`` tokens (the model reads all but the last); requests
        are scored longest first, ``batch_size`` at a time, in float32 or
        better. An empty continuation scores ``(0.0, True)``.
        """
        sequences, n_scored = [], []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"max_seq_len = {self.max_length}; it cannot be scored"
                )
            sequences.append((context + continuation)[-(self.max_length + 1) :])
            n_scored.append(len(continuation))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        todo = [i for i in range(len(requests)) if n_scored[i] > 0]
        todo.sort(key=lambda i: -len(sequences[i]))  # similar lengths share a batch: little padding
        with tqdm(total=len(requests), desc="memlayers loglikelihood", disable=disable_tqdm) as bar:
            bar.update(len(requests) - len(todo))
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                scores = score_continuations(
                    self.model, [sequences[i] for i in chunk], [n_scored[i] for i in chunk], self.tokenizer.pad_id or 0
                )
                for index, score in zip(chunk, scores, strict=True):
                    results[index] = score
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], score)
                bar.update(len(chunk))
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (``req.args == (text,)``), BOS-prefixed, in disjoint windows.

        The text's tokens (without BOS) are split by lm-eval's
        ``get_rolling_token_windows`` / ``make_disjoint_window`` into windows of
        at most ``max_length`` tokens that predict every token exactly once, the
        first after :attr:`prefix_token_id`; the windows of all texts are
        scored together in batches. An empty text scores 0.
        """
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[index] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float, int | None]:
        """``(until, max_gen_toks, temperature, top_k)`` of a request's generation arguments.

        Greedy (temperature 0) unless ``do_sample`` is true or a temperature
        above 0 is given without ``do_sample``; sampling without a temperature
        uses 1. Other arguments are logged and ignored.
        """
        settings = dict(gen_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(settings.pop("temperature", 0.0) or 0.0)
        do_sample = bool(settings.pop("do_sample", temperature > 0))
        top_k = settings.pop("top_k", None) or None
        if settings:
            logger.warning("memlayers ignores the generation arguments %s", sorted(settings))
        if not do_sample:
            temperature = 0.0
        elif temperature == 0.0:
            temperature = 1.0
        return until, max_new, temperature, None if top_k is None else int(top_k)

    def _stop_ids(self, until: list[str]) -> frozenset[int]:
        """EOS and every token whose own text contains one of the ``until`` strings.

        Once such a token is generated the answer is complete (its text gets
        cut there), so generation can end. Left out are a stop string inside
        another one (the longer one could begin before it and end after it) and
        one with U+FFFD, which a token's own text can show for bytes that its
        neighbours complete; any other text of a byte-level token is the same
        in context.
        """
        key = tuple(until)
        if key not in self._stop_id_cache:
            eos = self.tokenizer.eos_id
            stops = [
                s
                for s in until
                if "\ufffd" not in s and not any(s != other and s in other for other in until)
            ]
            ids = {i for i in range(self.tokenizer.vocab_size) if any(s in self.tok_decode([i]) for s in stops)}
            self._stop_id_cache[key] = frozenset(ids if eos is None else ids | {eos})
        return self._stop_id_cache[key]

    def _prompt_ids(self, context: str) -> list[int]:
        """The ids of ``context``, cropped on the left to ``max_length`` tokens.

        Not to ``max_length - max_gen_toks``: when prompt and answer do not fit
        in the window, :func:`~memlayers.eval.generate.generate` slides the
        window along as it generates, as it does for ``memlayers eval``, whose
        answers this must reproduce; the window never holds more than the
        last ``max_length`` tokens, so cropping further would only lose context.
        """
        return self.tok_encode(context)[-self.max_length :]

    def _cut(self, ids: list[int], until: list[str]) -> str:
        """The text of generated ``ids`` up to the first occurrence of any ``until`` string."""
        text = self.tok_decode(ids)
        found = [text.find(s) for s in until]
        return text[: min((f for f in found if f >= 0), default=len(text))]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (``req.args == (context, gen_kwargs)``) and return the new text.

        ``gen_kwargs`` may give ``until`` (strings: the text is cut at the first
        occurrence of any), ``max_gen_toks``, ``do_sample``, ``temperature``
        and ``top_k`` (see :meth:`_generation_settings`); generation also stops
        at EOS. Contexts are encoded with BOS (see :meth:`_prompt_ids` for
        long ones), so answers equal those of ``memlayers eval``. Requests with the same arguments
        and prompt length are generated together, ``batch_size`` at a time;
        sampling draws from the generator seeded by the ``seed`` model argument.
        """
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs = [""] * len(requests)
        with tqdm(total=len(requests), desc="memlayers generate_until", disable=disable_tqdm) as bar:
            for indices in groups.values():
                until, max_new, temperature, top_k = self._generation_settings(requests[indices[0]].args[1])
                stop_ids = self._stop_ids(until)
                prompts = [self._prompt_ids(requests[i].args[0]) for i in indices]
                for bucket in length_buckets([len(p) for p in prompts], self.batch_size):
                    new = generate(
                        self.model,
                        [prompts[j] for j in bucket],
                        max_new,
                        temperature=temperature,
                        top_k=top_k,
                        stop_ids=stop_ids,
                        generator=self._generator,
                        batch_size=self.batch_size,
                    )
                    for j, ids in zip(bucket, new, strict=True):
                        request = requests[indices[j]]
                        outputs[indices[j]] = self._cut(ids, until)
                        self.cache_hook.add_partial("generate_until", request.args, outputs[indices[j]])
                    bar.update(len(bucket))
        return outputs
