"""The single-process training loop (CPU or one GPU).

``Trainer(config).fit()`` prepares the data (a fact world unless the config
names files), trains with warmup + decay, gradient accumulation and separate
clipping of the value tables, evaluates periodically, logs metrics, and writes
atomic checkpoints. ``Trainer(config, resume=True)`` continues the run in
``train.out_dir`` from its latest checkpoint so exactly that the losses equal
those of an uninterrupted run on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from memlayers.config import ConfigError, to_dict
from memlayers.data.packing import BatchIterator, DocumentBatchIterator, pack_documents
from memlayers.data.stream import ShardBatches
from memlayers.device import pick_device
from memlayers.distributed import (
    barrier,
    build_mesh,
    init_distributed,
    launched_by_torchrun,
    parallelize,
    sum_over,
    sync_value_grads,
)
from memlayers.distributed.activation_checkpointing import apply_activation_checkpointing
from memlayers.distributed.comm import collective
from memlayers.distributed.rank0_init import any_rank_on_meta, has_meta, load_from_rank0
from memlayers.eval.perplexity import evaluate_perplexity
from memlayers.eval.qa import evaluate_qa
from memlayers.faults import fault_point
from memlayers.memory.layer import MemoryLayer
from memlayers.model.accounting import count_flops, size_fields
from memlayers.model.transformer import Transformer
from memlayers.train.checkpoint import (
    Checkpoint,
    check_files,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from memlayers.train.checkpoint_write import recover
from memlayers.train.config import RunConfig
from memlayers.train.data import prepare_data
from memlayers.train.metrics import MetricsLogger
from memlayers.train.optim import (
    build_optimizer,
    clip_gradients,
    lr_factor,
    peak_lr,
    uses_row_grads,
)
from memlayers.train.run_dir import (
    base_fingerprint,
    check_fits,
    check_fresh,
    check_resume,
    file_fingerprint,
    move_aside,
    set_aside_newer,
)
from memlayers.train.sharded_checkpoint import load_sharded, save_sharded
from memlayers.train.throughput import throughput_fields

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
"""The block index in a module name such as ``layers.3.ffn`` or ``model.layers.3.mlp.memory``."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the message says what to do."""


class Trainer:
    """Trains a :class:`Transformer` as a :class:`RunConfig` says.

    ``model`` trains another module in its place (``config.model`` is then
    not used): anything called as ``model(tokens, targets=None, cache=None)``
    returning an :class:`~memlayers.model.transformer.LMOutput`, with
    ``config.max_seq_len`` and ``memory_layers()``, such as a retrofitted
    transformers model behind ``memlayers.integrations.hf.CausalLMAdapter``.
    Its frozen parameters stay as they are: its checkpoints hold only what
    trains, and a fingerprint of the frozen rest (``base_model``) that a resume
    must match. Under torchrun every rank passes the same model, built alike (or,
    on every rank but 0, on the meta device), which is sharded like memlayers' own;
    every rank then holds rank 0's weights (:mod:`memlayers.distributed.rank0_init`).
    """

    def __init__(
        self, config: RunConfig, resume: bool | str | Path = False, model: nn.Module | None = None, overwrite: bool = False
    ):
        self.run_dir = Path(config.train.out_dir)
        tcfg = config.train
        if tcfg.threads is not None:
            torch.set_num_threads(tcfg.threads)
        random.seed(tcfg.seed)
        torch.manual_seed(tcfg.seed)
        if tcfg.slot_stats_batches and model is None and not config.model.memory_layers:
            raise ConfigError("train.slot_stats_batches", "slot statistics need a memory model; set "
                              "model.memory_layers or leave train.slot_stats_batches at 0")
        self.rank, self.world = 0, 1
        if launched_by_torchrun():
            self.device = init_distributed(config.parallel.timeout_s)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.device = pick_device(tcfg.device)
        resume_from, saved = self._open_run_dir(resume, overwrite)
        tokenizer_file = None
        if resume_from is not None and (resume_from / "tokenizer.json").is_file():
            tokenizer_file = resume_from / "tokenizer.json"
        if self.rank == 0:  # one rank writes the world and the tokenizer, the others read them
            self.data = prepare_data(config, self.run_dir, write=resume_from is None, tokenizer_file=tokenizer_file)
        if self.world > 1:
            barrier()
        if self.rank > 0:
            self.data = prepare_data(config, self.run_dir, write=False)
        self.external_model = model is not None
        if model is None:  # the model's vocabulary is the tokenizer's
            model_config = dataclasses.replace(config.model, vocab_size=self.data.tokenizer.vocab_size)
            if model_config.vocab_size != config.model.vocab_size:
                self._say(f"model.vocab_size is {model_config.vocab_size}, the tokenizer's vocabulary "
                          f"(the config said {config.model.vocab_size})")
            config = dataclasses.replace(config, model=model_config)
            shards = config.parallel.memory_parallel if self.world > 1 else 1  # FSDP shards within an mp group
            check_fits(model_config, tcfg.batch_size, config.data.seq_len, self.device, shards)
            # rank 0 initialises the model; the others build it on the meta device and get their
            # shards of rank 0's weights once it is sharded (rank0_init), holding it whole never
            with torch.device("meta") if self.rank > 0 else contextlib.nullcontext():
                model = Transformer(model_config)
        self.config = config
        self.flops_per_token = None if self.external_model else count_flops(config.model, config.data.seq_len).total
        # a big model may come on the meta device on all ranks but 0, which holds the weights (rank0_init)
        from_rank0 = any_rank_on_meta(model) if self.world > 1 else False
        if has_meta(model) and not from_rank0:
            raise ValueError("the model is on the meta device (no weights); only a distributed run can take one, "
                             "on every rank but rank 0, which holds the weights")
        self.fingerprints = self._fingerprints(resume_from, saved, model)
        self.model = model if from_rank0 else model.to(self.device)
        if any(layer.pool.quantized for layer in self.model.memory_layers()):
            raise ConfigError("memory.value_dtype", "int8 and int4 value tables are for inference: train in float32 "
                              "or bfloat16, then quantize the checkpoint with `memlayers quantize`")
        if tcfg.slot_stats_batches and not list(self.model.memory_layers()):
            raise ConfigError("train.slot_stats_batches", "slot statistics need a memory model")
        if tcfg.slot_stats_batches and self.world > 1:
            raise ConfigError("train.slot_stats_batches", "is for one-process runs; count a distributed run's "
                              "reads from its checkpoint with `memlayers slot-stats`")
        if uses_row_grads(config.optim):
            for layer in self.model.memory_layers():
                layer.table_grad = "rows"
        if config.parallel.activation_checkpointing:  # before FSDP wraps the blocks
            try:
                apply_activation_checkpointing(self.model)
            except ValueError as error:
                raise ConfigError("parallel.activation_checkpointing", str(error)) from None
        self.value_norm_reduce = None
        if self.world > 1:
            mesh = build_mesh(config.parallel, self.device)
            full_state = self.model.state_dict() if from_rank0 and self.rank == 0 else None  # before sharding
            parallelize(self.model, mesh, config.parallel, from_rank0)
            if from_rank0:
                load_from_rank0(self.model, full_state, self.device)
                del full_state
            self.value_norm_reduce = sum_over(mesh["mp"].get_group())
        self.optimizer = build_optimizer(self.model, config.optim)
        tokenizer = self.data.tokenizer
        global_batch = tcfg.batch_size * self.world  # every rank draws the same rows and trains on its slice
        if self.data.train_shards is not None:  # each rank reads only its own windows
            self.batches = ShardBatches(self.data.train_shards, config.data.seq_len, tcfg.batch_size, tcfg.seed,
                                        self.rank, self.world)
        elif config.data.repack:
            self.batches = DocumentBatchIterator(
                self.data.train_docs, config.data.seq_len, tokenizer.bos_id, tokenizer.eos_id, global_batch, tcfg.seed
            )
        else:
            rows = pack_documents(self.data.train_docs, config.data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
            self.batches = BatchIterator(rows, global_batch, tcfg.seed)
        self.step = 0
        self.tokens_seen = 0
        if resume_from is not None:
            checkpoint = self.load(resume_from)
            self._say(f"resuming from step {checkpoint.step} ({checkpoint.path})")
            if self.rank == 0:
                for moved in set_aside_newer(self.run_dir, checkpoint.step):
                    self._say(f"moved {moved.name}, newer than the checkpoint resumed from, aside to {moved.parent}")
            self.step = checkpoint.step
            self.tokens_seen = checkpoint.state.get("tokens_seen", 0)
            self.batches.load_state_dict(checkpoint.state["data"])
            set_rng_state(checkpoint.state["rng"])
        if tcfg.track_usage:
            for layer in self.model.memory_layers():
                layer.track_usage()
        self.logger = MetricsLogger(self.run_dir, resume_step=self.step if resume else None, enabled=self.rank == 0)
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))

    def _open_run_dir(self, resume: bool | str | Path, overwrite: bool) -> tuple[Path | None, dict[str, Any]]:
        """Check ``train.out_dir`` (a new run refuses one that holds a run, unless ``overwrite``
        moves it aside) and clean up after crashed writers; returns the checkpoint to resume
        from and its state. Every rank checks before any rank writes, so all refuse alike."""
        resume_from, saved = None, {}
        if resume:
            resume_from = resolve_checkpoint(self.run_dir if resume is True else resume)
            saved = read_state(resume_from)
            check_files(resume_from, saved)  # before anything of it is used
            if self.world > 1 and not saved.get("sharded"):
                fix = (f"write one with `memlayers shard {resume_from} --out {self.run_dir}`" if not saved.get("trained_only")
                       else "a retrofit's cannot be converted without its base model, so resume this one in one process")
                raise TrainingError(
                    f"{resume_from} is a single-process checkpoint; a distributed run resumes from sharded ones: {fix}"
                )
        elif not overwrite:
            check_fresh(self.run_dir)
        if self.world > 1:
            barrier()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if overwrite and not resume:
                self._say(move_aside(self.run_dir))
            for line in recover(self.run_dir):
                self._say(line)
        return resume_from, saved

    def _fingerprints(self, resume_from: Path | None, saved: dict[str, Any], model: nn.Module) -> dict[str, str | None]:
        """Fingerprints of the run's data and tokenizer files and of a passed model's frozen
        parameters (saved in every checkpoint); on resume, refuse a config, data, tokenizer or
        base model that differs from the checkpoint's."""
        fingerprints = {name: file_fingerprint(path) for name, path in self.data.files.items()}
        if self.external_model:  # before sharding, by rank 0 (the others may hold no weights)
            digest = [base_fingerprint(model) if self.rank == 0 else None]
            if self.world > 1:
                with collective("sharing the base model's fingerprint"):
                    dist.broadcast_object_list(digest, src=0)
            fingerprints["base_model"] = digest[0]
        if self.config.data.tokenizer is not None:  # the source file, not the run's re-serialised copy
            fingerprints["tokenizer"] = file_fingerprint(self.config.data.tokenizer)
        elif resume_from is not None:  # the checkpoint's own tokenizer was used
            fingerprints["tokenizer"] = saved.get("fingerprints", {}).get("tokenizer")
        if resume_from is not None:
            check_resume(resume_from, saved, to_dict(self.config), fingerprints, self.world)
        return fingerprints

    def _say(self, line: str | None) -> None:
        """A status line on stderr (rank 0 only), between progress bar updates."""
        if line and self.rank == 0:
            tqdm.write(f"memlayers: {line}", file=sys.stderr)

    def lockstep(self, what: str) -> contextlib.AbstractContextManager:
        """In a distributed run, a failed collective inside becomes one :class:`PeerLostError` line
        naming ``what`` (FSDP's own collectives included); nothing in one process."""
        return collective(what) if self.world > 1 else contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU when precision allows, nothing otherwise."""
        precision = self.config.train.precision
        use_bf16 = precision == "bfloat16" or (precision == "auto" and self.device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def set_learning_rates(self) -> float:
        """Apply the schedule for the current step; returns the factor."""
        tcfg, ocfg = self.config.train, self.config.optim
        factor = lr_factor(self.step, tcfg.steps, tcfg.warmup_steps, tcfg.schedule, tcfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = factor * peak_lr(ocfg, group["name"])
        return factor

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches."""
        tcfg = self.config.train
        factor = self.set_learning_rates()
        total = torch.zeros((), device=self.device)
        mine = slice(self.rank * tcfg.batch_size, (self.rank + 1) * tcfg.batch_size)
        ranks_per_batch = 1  # the batch drawn is the global one (every rank draws it and trains on its slice)
        if getattr(self.batches, "rank_local", False):  # the batch is already this rank's own
            mine, ranks_per_batch = slice(None), self.world
        step = self.step + 1
        fault_point("step.start", step)
        for micro in range(tcfg.grad_accum):
            if isinstance(self.model, FSDPModule):
                # gradients stay sharded and reduce-scattered every micro-batch; the replicas (dp)
                # all-reduce them once, after the last one
                self.model.set_requires_all_reduce(micro == tcfg.grad_accum - 1)
            inputs, targets = next(self.batches)
            self.tokens_seen += inputs.numel() * ranks_per_batch
            inputs, targets = inputs[mine].to(self.device), targets[mine].to(self.device)
            with self.autocast():
                loss = self.model(inputs, targets).loss / tcfg.grad_accum
            loss.backward()
            total += loss.detach()
        fault_point("step.backward", step)
        if self.world > 1:
            sync_value_grads(self.model)
            with collective("the loss all-reduce"):
                dist.all_reduce(total)  # every rank decides on the same mean loss
            total /= self.world
        if fault_point("step.loss", step) == "nan":
            total = total * float("nan")
        loss_value = float(total)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            last = list_checkpoints(self.run_dir)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"loss is {loss_value} at step {step}; stopped without saving ({where}). "
                "Lower optim.lr / optim.value_lr or check the data, then resume with --resume."
            )
        norms = clip_gradients(self.optimizer, self.config.optim, self.value_norm_reduce)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        fault_point("step.optimizer", step)
        self.step = step
        return {"loss": loss_value, "lr": factor * self.config.optim.lr, **norms}

    def usage_stats(self) -> dict[str, float]:
        """Slot coverage and KL from uniform of each memory layer's reads since the last call."""
        stats = {}
        for name, module in self.model.named_modules():
            if isinstance(module, MemoryLayer) and module.usage is not None:
                layer = LAYER_INDEX.search(name)
                label = f"memory{layer.group(1)}" if layer else f"memory_{name}"
                for key, value in module.usage.read().items():
                    stats[f"{label}/{key}"] = value
        return stats

    @torch.no_grad()
    def evaluate(self, progress: bool = False) -> dict[str, float]:
        """Held-out perplexity (``train.eval_batches``) and factual QA (the first ``train.eval_qa`` pairs
        of every QA set: ``qa_em_<name>``, ``answer_nll_<name>``; the first set also as ``qa_em``)."""
        tcfg = self.config.train
        results: dict[str, float] = {}
        with self.autocast():
            if self.data.heldout_rows is not None:
                rows = self.data.heldout_rows
                if tcfg.eval_batches:
                    rows = rows[: tcfg.eval_batches * tcfg.batch_size]
                ppl = evaluate_perplexity(self.model, rows.to(self.device), batch_size=tcfg.batch_size)
                results.update({"heldout_loss": ppl["loss"], "heldout_ppl": ppl["perplexity"]})
            for index, (name, pairs) in enumerate(self.data.qa_sets.items()):
                pairs = pairs[: tcfg.eval_qa or None]
                qa = evaluate_qa(self.model, self.data.tokenizer, pairs, batch_size=4 * tcfg.batch_size, progress=progress)
                results.update({f"qa_em_{name}": qa.exact_match, f"answer_nll_{name}": qa.answer_nll})
                if index == 0:
                    results.update({"qa_em": qa.exact_match, "answer_nll": qa.answer_nll})
        return results

    def save(self) -> Path:
        """Write a checkpoint of the current step (sharded, by every rank, in a distributed run);
        a passed model's without its frozen parameters."""
        state: dict[str, Any] = {
            "config": to_dict(self.config),
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "tokens_seen": self.tokens_seen,
            "fingerprints": self.fingerprints,
        }
        if self.world == 1:
            return save_checkpoint(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                state,
                tokenizer_path=self.data.tokenizer_path,
                keep_last=self.config.train.keep_last,
                trained_only=self.external_model,
            )
        return save_sharded(self.run_dir, self.step, self.model, self.optimizer, state, self.data.tokenizer_path,
                            self.config.train.keep_last, trained_only=self.external_model)

    def load(self, path: str | Path) -> Checkpoint:
        """Load a checkpoint to resume from: single-process, or sharded (by any number of ranks)."""
        path = resolve_checkpoint(path)
        state = read_state(path)
        if not state.get("sharded"):
            return load_checkpoint(path, self.model, self.optimizer)
        load_sharded(path, self.model, self.optimizer, no_dist=self.world == 1)
        return Checkpoint(path=path, step=int(state["step"]), state=state)

    def write_slot_stats(self, checkpoint: Path) -> Path:
        """Count the memory's reads over the first ``train.slot_stats_batches`` batches of the
        training text (in order) and write them as ``checkpoint/slot_stats.safetensors``."""
        from memlayers.continual.slot_stats import collect_slot_stats

        tcfg, tokenizer = self.config.train, self.data.tokenizer
        rows = pack_documents(self.data.train_docs, self.config.data.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        batches = rows[:, :-1].split(tcfg.batch_size)[: tcfg.slot_stats_batches]  # (B, L) inputs each
        stats = collect_slot_stats(self.model, batches, progress=False)
        stats.metadata.update({"data": str(self.data.files["train"]), "data_sha256": self.fingerprints.get("train") or "",
                               "seq_len": str(self.config.data.seq_len), "batch_size": str(tcfg.batch_size)})
        return stats.save(checkpoint / "slot_stats.safetensors")

    def fit(self, progress: bool = True, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to ``train.steps``; returns the final metrics and throughput.

        ``on_step(step)`` is called after every optimizer step (the demo uses
        it to drive one progress bar over several runs).
        """
        tcfg = self.config.train
        bar = tqdm(total=tcfg.steps, initial=self.step, unit="step", disable=not progress or self.rank > 0, dynamic_ncols=True)
        start, start_tokens, trained = time.perf_counter(), self.tokens_seen, 0
        try:
            while self.step < tcfg.steps:
                with self.lockstep(f"training step {self.step + 1}"):
                    metrics = self.train_step()
                trained += 1
                elapsed = time.perf_counter() - start
                tokens_per_s = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                    metrics.update(tokens=self.tokens_seen, tokens_per_s=tokens_per_s, **self.usage_stats(),
                                   **throughput_fields(tokens_per_s, self.world, self.device, self.flops_per_token))
                    self.logger.log(self.step, metrics)
                if tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.steps:
                    with self.lockstep(f"the evaluation at step {self.step}"):
                        self.logger.log(self.step, self.evaluate())
                if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and self.step < tcfg.steps:
                    with self.lockstep(f"the checkpoint of step {self.step}"):
                        self.save()
                fault_point("step.end", self.step)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        with self.lockstep("the final checkpoint"):
            checkpoint = self.save()  # before the final evaluation: nothing trained is lost if it fails
        with self.lockstep("the final evaluation"):
            final = self.evaluate(progress=progress)
        self.logger.log(self.step, final)
        self.logger.close()
        if tcfg.slot_stats_batches:
            self.write_slot_stats(Path(checkpoint))
        summary = {
            **final,
            "step": self.step,
            "checkpoint": str(checkpoint),
            "tokens_per_s": (self.tokens_seen - start_tokens) / max(seconds, 1e-9) if trained else 0.0,
        }
        if self.external_model:
            params = list(self.model.parameters())
            summary["params"] = sum(p.numel() for p in params)
            summary["trained_params"] = sum(p.numel() for p in params if p.requires_grad)
            return summary
        return {**summary, **size_fields(self.config.model, self.config.data.seq_len)}
