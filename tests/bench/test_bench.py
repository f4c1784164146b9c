"""memlayers bench at tiny shapes: results are consistent with themselves and with what
the measured configurations must hold (no timing thresholds: timing belongs to the benchmarks)."""

import json
import subprocess

import pytest
import torch

from memlayers import bench
from memlayers.bench.timing import round_ratios, source_commit, time_interleaved
from memlayers.cli import main
from memlayers.kernels import cpu


def test_bag_results_are_self_consistent():
    r = bench.run(("bag",), device="cpu", quick=True, repeat=1)["bag"]
    for name in ("torch", "ours"):  # one round: each ratio is that of its two times
        assert r[f"{name}_fwd_ms"] > 0
        assert r[f"{name}_ratio"] == pytest.approx(r[f"{name}_fwd_bwd_ms"] / r[f"{name}_fwd_ms"])
        assert r[f"{name}_ratio_quartiles"] == [r[f"{name}_ratio"]] * 2
    assert r["meets_target"] == (r["ours_ratio"] <= r["target_ratio"])
    assert r["speedup_fwd_bwd_vs_torch"] == pytest.approx(r["torch_fwd_bwd_ms"] / r["ours_fwd_bwd_ms"])
    assert r["backend"] in ("cpu", "torch_rows")


def test_bandwidth_counts_the_bytes_of_each_kernel():
    # skipped by `bench` without a GPU, so called directly: the device run must not be its first
    from memlayers.bench.bag import BagShape, bench_bag_bandwidth

    shape = BagShape(n_rows=512, dim=64, bags=32, bag_size=8)
    r = bench_bag_bandwidth(shape, torch.device("cpu"), repeat=1)
    assert r["kernels"] == ["forward", "weight_grad", "row_grad", "forward_int8", "forward_int4"]
    lookups, out = 32 * 8, 32 * 64 * 4
    ids_and_weights = lookups * (8 + 4)
    assert r["bytes"]["forward"] == lookups * 64 * 4 + out + ids_and_weights
    # a quantized row is its codes and scales: 64 + 4 bytes in int8, 32 + 2 * 4 in int4 (groups of 32)
    assert r["bytes"]["forward_int8"] == lookups * (64 + 4) + out + ids_and_weights
    assert r["bytes"]["forward_int4"] == lookups * (32 + 8) + out + ids_and_weights
    for name in r["kernels"]:
        assert r[f"{name}_gb_s"] == pytest.approx(r["bytes"][name] / r[f"{name}_ms"] / 1e6)
        assert r[f"{name}_fraction_of_copy"] == pytest.approx(r[f"{name}_gb_s"] / r["copy_bandwidth_gb_s"])
    assert 0 < r["touched_rows"] <= 512
    rendered = bench.render({"environment": {"date": "today", "device": "cpu", "torch": torch.__version__},
                             "quick": True, "bandwidth": r})
    assert [line.split("|")[1].strip() for line in rendered.splitlines() if "forward" in line] == r["kernels"][:1] + r["kernels"][3:]


def test_step_results_cover_every_optimizer_and_touched_rows():
    r = bench.run(("step",), device="cpu", quick=True, repeat=1)["step"]
    shape = r["shape"]
    assert set(r["optimizers"]) == {"adamw", "row_adamw", "row_adagrad"}
    for row in r["optimizers"].values():
        # one round: the per-round ratio is the ratio of the medians, and both quartiles
        assert row["ratio"] == pytest.approx(row["large_ms"] / row["small_ms"]) and row["ratio_quartiles"] == [row["ratio"]] * 2
        assert row["values_ratio"] == pytest.approx(row["values_large_ms"] / row["values_small_ms"])
        # both are measured (in separate timings, so neither bounds the other under CPU load)
        assert row["values_large_ms"] > 0 and row["large_ms"] > 0
        # the small memory has 16**2 = 256 slots: the batch reads at most all of them
        assert 0 < row["touched_rows_small"] <= shape["small_keys"] ** 2
        assert row["touched_rows_small"] <= row["touched_rows_large"] <= shape["large_keys"] ** 2
    assert r["optimizers"]["adamw"]["large_speedup_vs_adamw"] == 1.0


def test_search_results_compare_the_reference_with_the_backend_auto_picks(capsys):
    results = bench.run(("search",), device="cpu", quick=True, repeat=1)
    r = results["search"]
    assert [c["n_keys"] for c in r["cases"]] == list(r["shape"]["n_keys"])
    for case in r["cases"]:
        assert case["slots"] == case["n_keys"] ** 2
        assert case["fast_backend"] == ("cpu" if cpu.available() else "reference")
        for part in ("select_fwd", "select_fwd_bwd", "search_fwd_bwd"):  # one round: a ratio of its two times
            assert case[f"{part}_speedup"] == pytest.approx(case[f"reference_{part}_ms"] / case[f"fast_{part}_ms"])
            assert case[f"{part}_speedup_quartiles"] == [case[f"{part}_speedup"]] * 2
    assert f"{r['cases'][-1]['search_fwd_bwd_speedup']:.2f}x" in bench.render(results)


def test_lm_results_compare_the_demo_models_at_matched_flops():
    results = bench.run(("lm",), device="cpu", quick=True, repeat=1)
    (setting,) = results["lm"]["settings"]
    kinds = setting["kinds"]
    assert list(kinds) == ["dense", "memory", "moe"] and kinds["dense"]["vs_dense"] == 1.0
    for kind, row in kinds.items():
        assert row["tokens_per_s"] == pytest.approx(setting["batch_size"] * setting["seq_len"] / (row["ms"] / 1e3))
        # one round: its ratio is the ratio of the medians, and both quartiles
        assert row["vs_dense"] == pytest.approx(row["tokens_per_s"] / kinds["dense"]["tokens_per_s"])
        assert row["vs_dense_quartiles"] == [row["vs_dense"], row["vs_dense"]]
        assert abs(row["flops_vs_dense"] - 1) <= 0.10  # the demo's matching holds for the models timed
        assert row["meets_target"] == (None if kind == "dense" else row["vs_dense"] >= results["lm"]["targets"][kind])
    assert kinds["memory"]["run"].startswith("memory-") and kinds["memory"]["params"] > 5 * kinds["dense"]["params"]
    assert "(f) LM training step" in bench.render(results)


@pytest.mark.slow
def test_inference_measures_every_variant_in_its_own_process():
    results = bench.run(("inference",), device="cpu", quick=True)
    r = results["inference"]
    variants = {v["variant"]: v for v in r["variants"]}
    assert list(variants) == ["dense", "memory, float32 in RAM", "memory, int8 in RAM", "memory, int4 in RAM",
                              "memory, float32 mmap cold", "memory, float32 mmap warm"]
    for v in variants.values():
        assert v["new_tokens"] == r["shape"]["new_tokens"] and v["ttft_s"] > 0 and v["load_s"] > 0
        assert v["decode_vs_dense"] == pytest.approx(v["decode_tokens_per_s"] / variants["dense"]["decode_tokens_per_s"])
    sizes = [variants[f"memory, {k} in RAM"]["checkpoint_bytes"] for k in ("float32", "int8", "int4")]
    assert sizes[0] > sizes[1] > sizes[2]  # the quantized checkpoints are smaller
    assert r["meets_target"] == (variants["memory, float32 in RAM"]["decode_vs_dense"] >= r["target"])
    assert "(g) generation on the CPU" in bench.render(results)


@pytest.mark.slow
def test_memory_peaks_account_for_table_gradient_and_state():
    """Each case's peak holds at least its table and state; dense AdamW at least table,
    gradient and two moments (16 bytes per fp32 value); row-wise Adagrad far less."""
    cases = {c["name"]: c for c in bench.run(("memory",), device="cpu", quick=True)["memory"]["cases"]}
    slack = 0.2  # memory freed by other objects after the peak was reset lowers the difference a little
    dense = cases["dense AdamW, fp32"]["bytes_per_param"]
    assert dense >= 16 - slack
    assert cases["row AdamW, fp32"]["bytes_per_param"] >= 12 - slack  # table + two fp32 moments
    assert cases["row AdamW, bf16 table + state"]["bytes_per_param"] >= 6 - slack  # table + two bf16 moments
    adagrad_bf16 = cases["row Adagrad, bf16 table"]["bytes_per_param"]
    assert 2 - slack <= adagrad_bf16 < cases["row AdamW, bf16 table + state"]["bytes_per_param"]
    assert cases["row Adagrad, fp32"]["bytes_per_param"] < dense / 3
    for case in cases.values():
        assert case["meets_target"] in (None, case["bytes_per_param"] <= (case["target"] or 0))


def test_cli_writes_json_and_renders_tables(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "bag", "bandwidth", "--quick", "--device", "cpu", "--repeat", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["environment"]["device"]
    assert results["bandwidth"] == {"skipped": "needs a CUDA device"}
    assert "(a) embedding bag" in printed and f"{results['bag']['ours_ratio']:.2f}" in printed


def test_unknown_benchmark_is_a_config_error(capsys):
    assert main(["bench", "speed"]) == 2
    assert "unknown benchmark(s) ['speed']" in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device: cuda asked for, but no CUDA device is available; use cpu"),
    ("gpu", "--device: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
])
def test_a_device_the_machine_lacks_is_a_config_error(monkeypatch, capsys, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "bag", "--quick", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err == f"memlayers: config error: {message}\n"


def test_interleaved_timing_calls_the_variants_in_turns_and_reports_each_median(monkeypatch):
    from memlayers.bench import timing

    clock = iter([0, 1, 10, 13, 20, 22, 30, 37, 40, 48, 50, 55])  # seconds at each start and stop
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             torch.device("cpu"), repeat=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up, then one of each per round
    assert times == {"a": 2000.0, "b": 5000.0}  # medians of (1, 2, 8) s and (3, 7, 5) s


def test_round_ratios_pair_the_variants_round_by_round():
    # the machine changes speed from round to round; the ratio within each round stays 2
    fast, slow = [1.0, 2.0, 1.0, 2.0, 1.0], [2.0, 4.0, 2.0, 4.0, 2.0]
    assert round_ratios(slow, fast) == {"median": 2.0, "q1": 2.0, "q3": 2.0}
    r = round_ratios([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert r == {"median": 3.0, "q1": 2.0, "q3": 4.0}
    with pytest.raises(ValueError):
        round_ratios([1.0, 2.0], [1.0])


def test_source_commit_names_the_commit_and_marks_changed_code(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("r\n")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "README.md").write_text("changed\n")  # outside src and tests: still clean
    assert source_commit(tmp_path) == head
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == f"{head}-dirty"
