"""The demo's comparison: which models are trained, built from one DemoConfig.

All runs share one fact world, one tokenizer and the same number of training
tokens. The suite is

    dense       the baseline;
    memory-N    the same model with the FFN of ``memory_layers`` replaced by
                Memory+ layers (one shared pool of N = n_keys**2 slots), one
                run per entry of ``memory_sizes``; FLOPs within 10% of dense;
    moe         routed experts in the same layers, matched to the largest
                memory model in active FLOPs and total parameters;
    peer        (with ``peer: true``) the largest memory as PEER (one-neuron
                experts instead of value rows);
    dense-big   a wider and deeper dense model with >= 4x the FLOPs per token.

Each kind trains with its own learning rates, ``lrs[kind]`` over ``optim``
(values found by ``memlayers demo --tune`` on the validation split).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from memlayers.config import check
from memlayers.data.facts import FactWorldConfig
from memlayers.memory.config import MemoryConfig
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.model.config import ModelConfig, MoEConfig
from memlayers.train.config import DataConfig, RunConfig, TrainConfig
from memlayers.train.optim import OptimConfig

TUNED = {
    "dense": ("lr",),
    "memory": ("lr", "value_lr"),
    "moe": ("lr", "expert_lr"),
    "peer": ("lr", "value_lr"),
    "dense_big": ("lr",),
}
"""The learning rates each model kind has (and ``memlayers demo --tune`` searches)."""


@dataclass
class TuneConfig:
    """The search of ``memlayers demo --tune`` (the same budget for every model kind)."""

    lr_trials: int = 6
    """Stage 1: ``lr`` values log-spaced over ``lr_range``, the same for every kind (a second
    rate is held at ``lr`` times the geometric middle of ``ratio_range``)."""
    refine_trials: int = 3
    """Stage 2, at each kind's best stage-1 ``lr``: two-rate kinds try that many other ratios
    from ``ratio_range``; one-rate kinds try that many ``lr`` values between stage-1 neighbours."""
    lr_range: tuple[float, float] = (1e-3, 3e-2)
    """Smallest and largest ``lr`` tried."""
    ratio_range: tuple[float, float] = (1.0, 30.0)
    """Smallest and largest ``value_lr / lr`` (memory, PEER) and ``expert_lr / lr`` (MoE) tried."""
    seeds: int = 2
    """Training seeds per setting (``train.seed`` + 0, 1, ...); settings are compared by their
    mean validation score."""

    def __post_init__(self) -> None:
        check(self.lr_trials >= 1, "lr_trials", f"must be >= 1, got {self.lr_trials}")
        check(1 <= self.seeds <= 10, "seeds", f"must be in [1, 10], got {self.seeds}")
        check(0 <= self.refine_trials < self.lr_trials, "refine_trials",
              f"must be >= 0 and < lr_trials ({self.lr_trials}): one-rate kinds refine between "
              f"stage-1 neighbours, of which there are lr_trials - 1; got {self.refine_trials}")
        for name in ("lr_range", "ratio_range"):
            low, high = getattr(self, name)
            check(0 < low < high, name, f"must be [low, high] with 0 < low < high, got {[low, high]}")

    @property
    def trials(self) -> int:
        """Runs per model kind (both stages)."""
        return self.lr_trials + self.refine_trials


@dataclass
class DemoConfig:
    """Everything the demo trains; presets in configs/demo.yaml and configs/demo_quick.yaml."""

    facts: FactWorldConfig = field(default_factory=FactWorldConfig)
    vocab_size: int = 2048
    seq_len: int = 128
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dim=64, n_layers=4, n_heads=4, multiple_of=32))
    """The dense baseline (vocab_size and max_seq_len are filled in)."""
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(heads=4, knn=16, k_dim=32, qk_norm=True))
    """Memory layer template; n_keys comes from memory_sizes."""
    memory_layers: tuple[int, ...] = (2,)
    memory_sizes: tuple[int, ...] = (32, 64, 128, 256)
    """n_keys of each memory run (slots = n_keys**2)."""
    value_lr_exponent: float = 0.0
    """value_lr for n slots is optim.value_lr * (n / largest)**exponent."""
    moe_top_k: int = 1
    peer: bool = False
    """Also train the largest memory as PEER."""
    lrs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per model kind (dense, memory, moe, peer, dense_big), the learning rates that replace
    ``optim``'s: ``lr``, and ``value_lr`` (memory, peer) or ``expert_lr`` (moe). The presets hold
    the values ``memlayers demo --tune`` selected on the validation split."""
    flops_tolerance: float = 0.10
    """How far a memory run's FLOPs/token may be from dense's (a parallel memory at a small model
    dim costs more than the FFN it sits beside: ``model.memory_mode=parallel flops_tolerance=0.15``)."""
    big_dim: int = 128
    big_layers: int = 6
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The search of ``memlayers demo --tune``."""
    workers: int = 2
    """Runs trained at once, each in its own process on one CPU thread."""
    seeds: int = 1
    """Training seeds per run (``train.seed`` + 0, 1, ...); rows report mean and spread."""

    def __post_init__(self) -> None:
        check(len(self.memory_sizes) >= 1, "memory_sizes", "must list at least one n_keys")
        check(
            len(set(self.memory_sizes)) == len(self.memory_sizes),
            "memory_sizes",
            f"lists a size twice: {list(self.memory_sizes)}",
        )
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(1 <= self.seeds <= 100, "seeds", f"must be in [1, 100], got {self.seeds}")
        check(0 < self.flops_tolerance <= 1, "flops_tolerance", f"must be in (0, 1], got {self.flops_tolerance}")
        check(self.big_dim % self.model.n_heads == 0, "big_dim", f"must be divisible by model.n_heads={self.model.n_heads}")
        for kind, values in self.lrs.items():
            check(kind in TUNED, f"lrs.{kind}", f"unknown model kind; choose from {list(TUNED)}")
            for name, value in values.items():
                check(name in TUNED[kind], f"lrs.{kind}.{name}", f"{kind} has the learning rates {list(TUNED[kind])}")
                check(value > 0, f"lrs.{kind}.{name}", f"must be > 0, got {value}")

    def optim_for(self, kind: str) -> OptimConfig:
        """``optim`` with the learning rates of ``lrs[kind]``."""
        return dataclasses.replace(self.optim, **self.lrs.get(kind, {}))


@dataclass
class DemoRun:
    """One model of the comparison."""

    name: str
    kind: str
    """dense | memory | moe | peer | dense_big"""
    memory_slots: int
    config: RunConfig


def _moe_for(base: ModelConfig, target: ModelConfig, layers: tuple[int, ...], top_k: int) -> MoEConfig:
    """Experts in ``layers`` with the target's active FLOPs and total parameters."""
    target_flops = count_flops(target).total
    target_params = count_parameters(target).total
    dim = base.dim
    dense_flops = count_flops(base).total - len(layers) * 2 * 3 * dim * base.ffn_hidden
    # per MoE layer: top_k experts of 3*dim*hidden params (2 FLOPs each) plus the router
    per_layer_flops = (target_flops - dense_flops) / len(layers)
    hidden = max(1, round(per_layer_flops / (top_k * 6 * dim)))
    dense_params = count_parameters(base).total - len(layers) * 3 * dim * base.ffn_hidden
    per_layer_params = (target_params - dense_params) / len(layers)
    n_experts = max(top_k, math.floor(per_layer_params / (3 * dim * hidden)))
    return MoEConfig(n_experts=n_experts, top_k=top_k, hidden_dim=hidden)


def build_runs(demo: DemoConfig, data: DataConfig, out_dir: str, vocab_size: int) -> list[DemoRun]:
    """The RunConfigs of the whole comparison, writing under ``out_dir/runs``.

    ``vocab_size`` is the shared tokenizer's, so FLOP matching sees the real output head.
    """
    base = dataclasses.replace(
        demo.model, vocab_size=vocab_size, max_seq_len=demo.seq_len, memory_layers=(), moe_layers=()
    )

    def run_config(name: str, model: ModelConfig, optim: OptimConfig) -> RunConfig:
        train = dataclasses.replace(demo.train, out_dir=f"{out_dir}/runs/{name}", threads=1)
        return RunConfig(model=model, optim=optim, data=data, train=train)

    runs = [DemoRun("dense", "dense", 0, run_config("dense", base, demo.optim_for("dense")))]
    largest = max(demo.memory_sizes) ** 2
    memory_models = []
    for n_keys in sorted(demo.memory_sizes):
        memory = dataclasses.replace(demo.memory, n_keys=n_keys, knn=min(demo.memory.knn, n_keys))
        model = dataclasses.replace(base, memory_layers=demo.memory_layers, memory=memory)
        optim = demo.optim_for("memory")
        optim = dataclasses.replace(optim, value_lr=optim.value_lr * (n_keys**2 / largest) ** demo.value_lr_exponent)
        runs.append(DemoRun(f"memory-{n_keys}x{n_keys}", "memory", n_keys**2, run_config(f"memory-{n_keys}", model, optim)))
        memory_models.append(model)
    moe = _moe_for(base, memory_models[-1], demo.memory_layers, demo.moe_top_k)
    moe_model = dataclasses.replace(base, moe_layers=demo.memory_layers, moe=moe)
    runs.append(DemoRun("moe", "moe", 0, run_config("moe", moe_model, demo.optim_for("moe"))))
    if demo.peer:
        peer_model = dataclasses.replace(
            memory_models[-1], memory=dataclasses.replace(memory_models[-1].memory, variant="peer", value_dim=None))
        runs.append(DemoRun("peer", "peer", largest, run_config("peer", peer_model, demo.optim_for("peer"))))
    big = dataclasses.replace(base, dim=demo.big_dim, n_layers=demo.big_layers)
    runs.append(DemoRun("dense-big", "dense_big", 0, run_config("dense-big", big, demo.optim_for("dense_big"))))
    check_matching(runs, demo.flops_tolerance)
    return runs


def largest_of_each_kind(runs: list[DemoRun]) -> dict[str, DemoRun]:
    """One run per kind: the last of it in ``runs`` (for memory, built smallest first, the largest)."""
    return {run.kind: run for run in runs}


def check_matching(runs: list[DemoRun], tolerance: float = 0.10) -> None:
    """Memory runs within ``tolerance`` of dense FLOPs and dense-big >= 4x, or a ConfigError."""
    flops = {run.name: count_flops(run.config.model).total for run in runs}
    dense = flops["dense"]
    for run in runs:
        ratio = flops[run.name] / dense
        if run.kind in ("memory", "peer"):
            check(
                abs(ratio - 1) <= tolerance,
                "memory",
                f"{run.name} has {ratio:.2f}x the dense FLOPs/token (allowed 1 +- {tolerance}); "
                "adjust memory.heads, memory.k_dim or memory_sizes, or allow it with flops_tolerance",
            )
        if run.kind == "dense_big":
            check(ratio >= 4, "big_dim", f"dense-big has {ratio:.2f}x the dense FLOPs/token; raise big_dim or big_layers")
