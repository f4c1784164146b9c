"""RunConfig: the root of a run's configuration (one YAML preset = one RunConfig)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from memlayers.config import check
from memlayers.data.facts import FactWorldConfig
from memlayers.distributed.parallelize import ParallelConfig
from memlayers.model.config import ModelConfig
from memlayers.train.optim import OptimConfig

MAX_VOCAB = 1 << 22
"""The largest tokenizer a run trains (far above any real vocabulary; the BPE trainer aborts
the process on absurd sizes instead of raising)."""

QA_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenised and packed.

    Without ``train`` a synthetic fact world (``facts``) is generated into the
    run directory and provides the training text, held-out text and QA pairs.
    """

    train: str | None = None
    """Training text: a .txt file (blank-line separated documents) or .jsonl (``text_field``)."""
    shards: str | None = None
    """A directory of token shards written by ``memlayers tokenize`` (instead of ``train``):
    batches stream from memory-mapped shards, its ``heldout`` split (if any) gives the held-out
    loss, and its tokenizer is the run's. Memory and start-up time do not grow with the corpus."""
    heldout: str | None = None
    """Held-out text for perplexity (.txt or .jsonl)."""
    qa: dict[str, str] | str | None = None
    """Named sets of question/answer pairs (.jsonl with question and answer) for factual QA,
    e.g. ``{recall: seen.jsonl, extraction: unseen.jsonl}``: each is scored as ``qa_em_<name>``
    and ``answer_nll_<name>``, the first also as ``qa_em``. A single path is the set ``qa``.
    Without it a generated fact world gives recall (its seen split) and extraction (its test split)."""
    text_field: str = "text"
    tokenizer: str | None = None
    """An existing tokenizer.json; without it a byte-level BPE is trained on the training text."""
    vocab_size: int = 2048
    """Vocabulary of a trained tokenizer (model.vocab_size follows the tokenizer)."""
    seq_len: int = 128
    repack: bool = True
    """Pack the training documents in a fresh order every epoch. With false the
    rows are packed once; small models trained for many epochs then learn each
    row's context instead of the documents (see the demo's ablations)."""
    facts: FactWorldConfig = field(default_factory=FactWorldConfig)

    def __post_init__(self) -> None:
        if self.qa is None or isinstance(self.qa, str):
            self.qa = {} if self.qa is None else {"qa": self.qa}
        for name in self.qa:
            check(QA_NAME.fullmatch(name) is not None, f"qa.{name}",
                  "a QA set's name must be letters, digits and _ (it names metrics qa_em_<name>)")
        check(300 <= self.vocab_size <= MAX_VOCAB, "vocab_size",
              f"must be in [300, {MAX_VOCAB}] (256 bytes + specials + merges), got {self.vocab_size}")
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.shards is None or self.train is None, "shards",
              "data.shards and data.train are two sources of training text; set one of them")


@dataclass
class TrainConfig:
    """The training loop: length, batch, schedule, logging, evaluation, checkpoints."""

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 32
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    seed: int = 0
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on GPU, float32 on CPU."""
    threads: int | None = None
    """torch CPU threads; null leaves torch's default."""
    log_every: int = 10
    eval_every: int = 0
    """Steps between evaluations; 0 evaluates only at the end."""
    eval_qa: int = 500
    """QA pairs (the file's first ones) of every evaluation, periodic and final (0: all)."""
    eval_batches: int = 20
    """Held-out batches of every evaluation, periodic and final (0: all)."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    track_usage: bool = True
    """Log memory slot coverage and KL from uniform of the reads since the last log line
    (counted on the device, read only at log time)."""
    slot_stats_batches: int = 0
    """After training, read this many batches of the training text and write the memory's slot
    statistics into the final checkpoint (``slot_stats.safetensors``: the background counts of
    sparse memory finetuning, so the model ships with them); 0: none."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_qa", "eval_batches", "checkpoint_every", "slot_stats_batches"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.threads is None or 1 <= self.threads <= 1024, "threads", f"must be in [1, 1024] or null, got {self.threads}")
        check(self.grad_accum <= 1 << 16, "grad_accum", f"must be <= 65536 micro-batches per step, got {self.grad_accum}")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )


@dataclass
class RunConfig:
    """Everything a run needs, filled from ``configs/*.yaml`` plus dotted overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How a run launched by torchrun spreads over its ranks (ignored in one process)."""
