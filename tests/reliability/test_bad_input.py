"""Bad input through `memlayers train`: every case works or fails with one clear line (exit 2),
never a traceback, a hang or a crash. Runs stop after one training step (an injected fault)."""

from __future__ import annotations

import pytest

from memlayers.bench.reliability import (
    BAD_OVERRIDES,
    BAD_YAML,
    bad_input_cases,
    numeric_keys,
    run_bad_input,
)

CASES = bad_input_cases()
NUMERIC = [name for name in CASES if name not in BAD_OVERRIDES and not name.startswith("yaml: ")]


def test_the_fuzz_covers_every_numeric_key_three_ways():
    keys = [k for k, _ in numeric_keys()]
    assert {"model.dim", "model.memory.n_keys", "optim.value_lr", "train.batch_size", "data.seq_len"} <= set(keys)
    assert len(NUMERIC) == 3 * len(keys)


@pytest.mark.slow
@pytest.mark.timeout(120)  # a case that hangs (as grad_accum=10**12 once did) fails, and soon
@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_keys_at_zero_negative_and_huge(tmp_path, name):
    outcome = run_bad_input(tmp_path, name)
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BAD_OVERRIDES if not n.startswith("key: ")])
def test_bad_missing_and_foreign_files(tmp_path, name):
    outcome = run_bad_input(tmp_path, name)
    assert outcome.ok, f"{outcome.scenario}: {outcome.detail}"


@pytest.mark.parametrize("name", [n for n in BAD_OVERRIDES if n.startswith("key: ")] + [f"yaml: {n}" for n in BAD_YAML])
def test_unknown_and_mistyped_keys_and_malformed_yaml_are_refused(tmp_path, name):
    outcome = run_bad_input(tmp_path, name)
    assert outcome.ok and outcome.detail != "accepted", f"{outcome.scenario}: {outcome.detail}"
