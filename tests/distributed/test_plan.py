"""``memlayers plan``: its arithmetic on hand-computed configs, its verdict and suggestions, its
JSON and errors, and its exact bytes against the real shards of 2 and 4 gloo ranks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memlayers import cli
from memlayers.config import load_config
from memlayers.distributed.plan import (
    GB,
    GPUS,
    Cluster,
    dense_shard_bytes,
    fsdp_shard_numel,
    model_shapes,
    plan,
)
from memlayers.distributed.plan_cli import add_parsers
from memlayers.distributed.plan_report import replanned
from memlayers.model.accounting import count_flops, count_parameters
from memlayers.train.config import RunConfig

WORKER = Path(__file__).with_name("worker_plan.py")
H100 = GPUS["h100"]

# dim 64, a table of 32**2 = 1024 rows x 64, every dense dim 0 even: FSDP over 2 ranks pads nothing
HAND = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=300", "model.ffn_hidden_dim=128",
        "model.max_seq_len=16", "model.memory_layers=[1]", "model.memory.n_keys=32", "model.memory.heads=2",
        "model.memory.knn=4", "model.memory.k_dim=8", "train.batch_size=2", "data.seq_len=8"]
# the worker's model: dim 16, a 64 x 16 table
TINY = ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=40", "model.multiple_of=16",
        "model.max_seq_len=16", "model.memory_layers=[1]", "model.memory.n_keys=8", "model.memory.heads=2",
        "model.memory.knn=4", "model.memory.k_dim=8", "train.batch_size=2", "data.seq_len=8"]


@pytest.fixture
def base(tmp_path) -> str:
    """A config file of defaults only, for the HAND overrides on the command line."""
    path = tmp_path / "base.yaml"
    path.write_text("{}\n")
    return str(path)


def config_of(overrides: list[str]) -> RunConfig:
    return load_config(RunConfig, None, overrides)


def planned(overrides: list[str], gpus: int, **cluster) -> object:
    return plan(config_of(overrides), Cluster(gpu=H100, gpus_per_node=gpus, **cluster))


def run_plan(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """``memlayers plan ARGV`` in this process: exit code, stdout, stderr (the parser gets
    ``plan`` whether or not cli.py lists it yet)."""
    build = cli.build_parser

    def with_plan() -> argparse.ArgumentParser:
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "plan" not in sub.choices:
            add_parsers(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", with_plan)
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, monkeypatch, *argv: str) -> tuple[int, dict]:
    code, out, _ = run_plan(capsys, monkeypatch, *argv, "--json")
    return code, json.loads(out)


# --- arithmetic ---------------------------------------------------------------------------------


def test_fsdp_shards_dim_0_in_ceil_chunks_the_last_ranks_short():
    assert [fsdp_shard_numel((41, 16), 2, i) for i in range(2)] == [21 * 16, 20 * 16]
    assert [fsdp_shard_numel((2, 2, 8, 4), 4, i) for i in range(4)] == [64, 64, 0, 0]
    assert [fsdp_shard_numel((10,), 4, i) for i in range(4)] == [3, 3, 3, 1]
    assert fsdp_shard_numel((7, 3), 1, 0) == 21


@pytest.mark.parametrize(
    ("optimizer", "state_dtype", "state_bytes"),
    [("adamw", "float32", 2 * 1024 * 32 * 4), ("row_adamw", "float32", 2 * 1024 * 32 * 4 + 4 * 1024),
     ("row_adamw", "bfloat16", 2 * 1024 * 32 * 2 + 4 * 1024), ("row_adagrad", "float32", 4 * 1024),
     ("row_sgd", "float32", 0)],
)
def test_a_1024_x_64_table_over_mp_2(optimizer, state_dtype, state_bytes):
    result = planned([*HAND, "parallel.memory_parallel=2", "train.grad_accum=3", f"optim.value_optimizer={optimizer}",
                      f"optim.value_state_dtype={state_dtype}"], gpus=2)
    m = result.memory
    assert m.value_params == 1024 * 32 * 4
    assert m.value_optimizer == state_bytes
    K = 2 * 4
    # dense: the shard; rows: 3 micro-batches x 2 ranks x 16 tokens of (int64 id, fp32 weight) x K + 32 fp32 columns
    assert m.value_grads == (1024 * 32 * 4 if optimizer == "adamw" else 3 * 2 * 16 * (12 * K + 4 * 32))
    dense = count_parameters(config_of(HAND).model).total - 1024 * 64
    assert m.dense_params == m.dense_grads == 4 * dense // 2
    assert m.dense_optimizer == 2 * 4 * dense // 2
    # one read a micro-batch: bench/comm.py's M*8 + M*B*K*12 + 8*B*d, less the rank's own half
    assert result.communication.memory_reads == 3 * (2 * 8 + 2 * 16 * K * 12 + 8 * 16 * 64) / 2
    # bf16 all-gathers of the root once and each block twice; fp32 reduce-scatters; one replica
    root, blocks = 300 * 64 * 2 + 64, dense - (300 * 64 * 2 + 64)
    assert result.communication.fsdp_all_gather == 3 * 2 * (root + 2 * blocks) // 2
    assert result.communication.fsdp_reduce_scatter == 3 * 4 * dense // 2
    assert result.communication.dense_all_reduce == result.communication.value_grad_sync == 0


def test_without_memory_parallelism_every_rank_holds_all_dense_weights():
    """parallelize() shards FSDP2 over the mesh's mp dimension only (hybrid), so mp=1 replicates."""
    result = planned(HAND, gpus=8)
    dense = count_parameters(config_of(HAND).model).total - 1024 * 64
    assert (result.memory_parallel, result.data_parallel) == (1, 8)
    assert result.memory.dense_params == 4 * dense
    assert result.memory.value_params == 1024 * 64 * 4
    c = result.communication
    assert c.fsdp_all_gather == c.fsdp_reduce_scatter == c.memory_reads == 0
    assert c.dense_all_reduce == 2 * 7 / 8 * 4 * dense  # ring all-reduce of fp32 gradients
    assert c.value_grad_sync == 2 * 7 / 8 * 1024 * 64 * 4
    # the trainer all-reduces over the replicas after the last micro-batch only
    assert planned([*HAND, "train.grad_accum=4"], gpus=8).communication.dense_all_reduce == c.dense_all_reduce


def test_activations_follow_the_documented_formula():
    """A dense model: per token and layer p(5d + 2d_kv) + 4 n_heads + p(2d + 4f), head p 2d + 4V + 16."""
    dense = [o for o in HAND if not o.startswith("model.memory")]
    attention, ffn, head = 2 * (5 * 64 + 2 * 64) + 4 * 4, 2 * (2 * 64 + 4 * 128), 2 * 2 * 64 + 4 * 300 + 16
    assert planned(dense, gpus=1).memory.activations == 16 * (2 * (attention + ffn) + head)
    checkpointed = planned([*dense, "parallel.activation_checkpointing=true"], gpus=1)
    assert checkpointed.memory.activations == 16 * (2 * 2 * 64 + attention + ffn + head)
    fp32 = planned([*dense, "train.precision=float32", "parallel.mixed_precision=false"], gpus=1)
    attention, ffn, head = 4 * (5 * 64 + 2 * 64) + 4 * 4, 4 * (2 * 64 + 4 * 128), 4 * 2 * 64 + 4 * 300 + 16
    assert fp32.memory.activations == 16 * (2 * (attention + ffn) + head)


def test_step_time_is_compute_or_value_traffic_plus_communication():
    result = planned([*HAND, "train.grad_accum=2"], gpus=4, nodes=2, mfu=0.5)
    flops = count_flops(config_of(HAND).model, 8).total
    assert result.flops_per_token == flops
    assert result.time.compute == pytest.approx(3 * flops * 2 * 16 / (0.5 * 989e12))
    c = result.communication  # mp=1: everything crosses the nodes, at the inter-node link
    assert result.time.communication == pytest.approx((c.dense_all_reduce + c.value_grad_sync) / 50e9)
    assert result.time.step == pytest.approx(max(result.time.compute, result.time.value_traffic) + result.time.communication)
    one_node = planned([*HAND, "train.grad_accum=2"], gpus=8, mfu=0.5)
    assert one_node.time.communication == pytest.approx((c.dense_all_reduce + c.value_grad_sync) / 450e9)
    assert result.tokens_per_second == pytest.approx(8 * 2 * 16 / result.time.step)


def test_peer_shards_its_input_table_too():
    result = planned([*HAND, "model.memory.variant=peer", "parallel.memory_parallel=2"], gpus=2)
    assert result.memory.value_params == 2 * 1024 * 32 * 4  # values and up, each 1024 x 64 / 2
    assert len(model_shapes(config_of([*HAND, "model.memory.variant=peer"]).model).reads) == 2


# --- the command: verdict, suggestions, JSON, errors --------------------------------------------


def test_a_fitting_plan_says_so_and_exits_0(capsys, monkeypatch):
    code, out, err = run_plan(capsys, monkeypatch, "tiny", "--gpus", "2", "--gpu", "h200")
    assert code == 0 and not err
    tiny = plan(load_config(RunConfig, "tiny"), Cluster(gpu=GPUS["h200"], gpus_per_node=2))
    assert out.rstrip().endswith(f"fits: {tiny.memory.total / GB:,.1f} GB of 141 GB per GPU")
    for assumption in ("989 TFLOP/s", "4.8 TB/s HBM", "450 GB/s NVLink", "50 GB/s per GPU", "0.4 of peak", "--reserve-gb"):
        assert assumption in out


def kinds(suggestions: list[dict]) -> set[str]:
    return {"mp" if "memory_parallel" in s["change"] else "rows" if "value_optimizer" in s["change"]
            else "batch" if "batch_size" in s["change"] else "checkpointing" for s in suggestions}


def candidates(config: RunConfig, world: int) -> dict[str, list[list[str]]]:
    """Every change of each kind the planner could suggest, as overrides."""
    B, A = config.train.batch_size, config.train.grad_accum
    return {
        "mp": [[f"parallel.memory_parallel={k}"] for k in range(2, world + 1) if world % k == 0],
        "rows": [["optim.value_optimizer=row_adamw", f"optim.value_state_dtype={s}"] for s in ("float32", "bfloat16")]
        + [["optim.value_optimizer=row_adagrad"]],
        "batch": [[f"train.batch_size={b}", f"train.grad_accum={A * B // b}"] for b in range(1, B) if B % b == 0],
        "checkpointing": [["parallel.activation_checkpointing=true"]],
    }


@pytest.mark.parametrize(
    ("overrides", "memory_gb", "expected"),
    [  # a big table, tiny activations: sharding it or a lighter optimizer helps, a smaller batch does not
        (["model.memory.n_keys=256", "model.dim=256", "model.memory.value_dim=256", "train.batch_size=4"], 0.3,
         {"mp", "rows"}),
        # long sequences: only fewer activations help
        (["train.batch_size=16", "data.seq_len=512", "model.max_seq_len=512"], 0.06, {"batch", "checkpointing"}),
    ],
    ids=["table-bound", "activation-bound"],
)
def test_suggestions_are_exactly_the_changes_that_fit(capsys, monkeypatch, base, overrides, memory_gb, expected):
    args = [base, *HAND, *overrides, "--gpus", "4", "--gpu-memory", str(memory_gb), "--reserve-gb", "0"]
    code, report = plan_json(capsys, monkeypatch, *args)
    assert code == 1 and not report["fits"]
    assert report["verdict"].startswith(f"does not fit: needs {report['plan']['memory']['total'] / GB:,.1f} GB per GPU of")
    assert kinds(report["suggestions"]) == expected
    for suggestion in report["suggestions"]:  # each one, planned again from the command line, fits
        code, again = plan_json(capsys, monkeypatch, *args, *suggestion["overrides"])
        assert code == 0 and again["fits"] and again["plan"]["memory"]["total"] == suggestion["bytes_per_gpu"]
    # and no change of a kind left out fits
    config = config_of([*HAND, *overrides])
    cluster = Cluster(gpu=dataclasses.replace(H100, memory_gb=memory_gb), gpus_per_node=4, reserve_gb=0)
    for kind, options in candidates(config, 4).items():
        if kind not in expected:
            for extra in options:
                assert not plan(replanned(config, extra), cluster).fits, (kind, extra)
    code, out, _ = run_plan(capsys, monkeypatch, *args)
    assert "each of these alone makes it fit (re-planned):" in out
    assert ("parallel.activation_checkpointing=true:" in out) == ("checkpointing" in expected)


def test_when_no_change_alone_fits_all_together_are_planned(capsys, monkeypatch, base):
    args = [base, *HAND, "train.batch_size=8", "--gpus", "2", "--gpu-memory", "0.0005", "--reserve-gb", "0"]
    code, report = plan_json(capsys, monkeypatch, *args)
    assert code == 1 and report["suggestions"] == []
    combined = report["combined"]
    assert not combined["fits"]
    assert combined["overrides"] == ["parallel.memory_parallel=2", "optim.value_optimizer=row_adagrad",
                                     "parallel.activation_checkpointing=true", "train.batch_size=1", "train.grad_accum=8"]
    assert combined["bytes_per_gpu"] < report["plan"]["memory"]["total"]
    code, out, _ = run_plan(capsys, monkeypatch, *args)
    assert "no single change makes it fit; all together (" in out and "still does not fit" in out


def test_json_holds_every_figure_and_its_totals(capsys, monkeypatch, base):
    code, report = plan_json(capsys, monkeypatch, base, *HAND, "--gpus", "4", "--nodes", "2", "--mp", "2", "--mfu", "0.3")
    assert code == 0 and report["fits"] and report["suggestions"] == [] and report["combined"] is None
    p = report["plan"]
    assert (p["world"], p["memory_parallel"], p["data_parallel"]) == (8, 2, 4)
    assert report["cluster"]["mfu"] == 0.3 and report["cluster"]["world"] == 8
    assert p["memory"]["total"] == pytest.approx(sum(v for k, v in p["memory"].items() if k != "total"))
    assert p["memory"]["reserve"] == 2 * GB
    assert p["communication"]["total"] == pytest.approx(sum(v for k, v in p["communication"].items() if k != "total"))
    assert p["time"]["step"] == pytest.approx(max(p["time"]["compute"], p["time"]["value_traffic"]) + p["time"]["communication"])


def test_mp_comes_from_the_config_unless_the_command_line_says(capsys, monkeypatch, base):
    _, report = plan_json(capsys, monkeypatch, base, *HAND, "parallel.memory_parallel=4", "--gpus", "8")
    assert report["plan"]["memory_parallel"] == 4
    _, report = plan_json(capsys, monkeypatch, base, *HAND, "parallel.memory_parallel=4", "--gpus", "8", "--mp", "2")
    assert report["plan"]["memory_parallel"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny", "--gpus", "0"], "--gpus: must be >= 1, got 0"),
        (["tiny", "--gpus", "2", "--nodes", "0"], "--nodes: must be >= 1, got 0"),
        (["tiny", "--gpus", "2", "--gpu", "v100"], "--gpu: must be one of a100, h100, h200, got 'v100'"),
        (["tiny", "--gpus", "6", "--mp", "4"], "parallel.memory_parallel: must divide the number of ranks 6, got 4"),
        (["tiny", "--gpus", "2", "--mp", "0"], "parallel.memory_parallel: must be >= 1, got 0"),
        (["tiny", *HAND, "--gpus", "128", "--mp", "128"],
         "parallel.memory_parallel: must divide the width 64 of the value tables, got 128"),
        (["tiny", "--gpus", "2", "--mfu", "1.5"], "--mfu: must be in (0, 1], got 1.5"),
        (["tiny", "--gpus", "2", "--gpu-memory", "0"], "--gpu-memory: must be > 0, got 0.0"),
        (["tiny", "--gpus", "2", "--inter-node-gb-s", "-1"], "--inter-node-gb-s: must be > 0, got -1.0"),
        (["tiny", "--gpus", "2", "--reserve-gb", "-1"], "--reserve-gb: must be >= 0, got -1.0"),
        (["tiny", "--gpus", "2", "model.memory.value_dtype=int8"], "model.memory.value_dtype: int8 and int4 value tables"),
        (["tiny", "--gpus", "2", "model.nope=1"], "model.nope: unknown key"),
        (["no_such_preset", "--gpus", "2"], "config file no_such_preset does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, monkeypatch, args, message):
    code, out, err = run_plan(capsys, monkeypatch, *args)
    assert code == 2 and not out
    assert err.startswith(f"memlayers: config error: {message}") and err.count("\n") == 1, err


def test_a_malformed_config_file_is_a_config_error(capsys, monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    code, _, err = run_plan(capsys, monkeypatch, str(bad), "--gpus", "2")
    assert code == 2 and err.startswith(f"memlayers: config error: config file {bad} is not valid YAML")


# --- against the real shards --------------------------------------------------------------------


def torchrun(nproc: int, out: Path, cases: list[list[str]]) -> list[list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           str(out), json.dumps(cases)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_against_plan(nproc: int, cases: list[list[str]], measured: list[list[dict]]) -> None:
    for c, overrides in enumerate(cases):
        config = config_of(overrides)
        shapes = model_shapes(config.model)
        M = config.parallel.memory_parallel
        expected = plan(config, Cluster(gpu=H100, gpus_per_node=nproc), shapes=shapes).memory
        held = [ranks[c] for ranks in measured]
        for rank in held:
            dense = dense_shard_bytes(shapes, M, rank["mp_index"])
            assert rank["dense_params"] == rank["dense_grads"] == dense, (overrides, rank)
            assert rank["dense_optimizer"] == 2 * dense
            assert rank["dense_adamw_steps"] == [4] * rank["dense_tensors"]  # host scalars on GPUs: not planned
            if rank["mp_index"] == 0:  # the fullest rank is what the plan reports
                assert (expected.dense_params, expected.dense_grads, expected.dense_optimizer) == (dense, dense, 2 * dense)
            assert rank["value_params"] == expected.value_params, (overrides, rank)
            assert rank["value_grads"] == expected.value_grads, (overrides, rank)
            assert rank["value_optimizer"] == expected.value_optimizer, (overrides, rank)
            assert rank["value_adamw_steps"] == ([4] * rank["value_tensors"] if config.optim.value_optimizer == "adamw" else [])
            assert rank["buffers"] == expected.buffers
        assert sum(r["dense_params"] for r in held if r["mp_index"] == 0) // (nproc // M) == expected.dense_params
        if "model.vocab_size=41" in overrides or M == 4:  # FSDP2 pads: the ranks of a group differ
            assert len({r["dense_params"] for r in held}) > 1


@pytest.mark.multiprocess
def test_plan_matches_the_shards_of_2_ranks(tmp_path):
    cases = [
        [*TINY, "parallel.memory_parallel=2"],
        # vocab 41: the embeddings split 21 / 20 rows; bf16 values with bf16 row AdamW moments
        [*TINY, "parallel.memory_parallel=2", "model.vocab_size=41", "model.memory.value_dtype=bfloat16",
         "optim.value_optimizer=row_adamw", "optim.value_state_dtype=bfloat16"],
        [*TINY, "optim.value_optimizer=row_adagrad"],  # mp 1: two replicas, dense weights whole
    ]
    check_against_plan(2, cases, torchrun(2, tmp_path, cases))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_plan_matches_the_shards_of_4_ranks(tmp_path):
    cases = [
        # mp 2 x dp 2, two memory layers with a table each, dense AdamW
        [*TINY, "parallel.memory_parallel=2", "model.memory_layers=[0,1]", "model.memory.shared_values=false"],
        # mp 4: the sub-keys' dim 0 (2 heads) leaves two ranks empty; PEER shards its up table too
        [*TINY, "parallel.memory_parallel=4", "model.memory.variant=peer", "optim.value_optimizer=row_adamw"],
        [*TINY, "optim.value_optimizer=row_sgd", "train.batch_size=3"],
    ]
    check_against_plan(4, cases, torchrun(4, tmp_path, cases))
