"""The metrics log: one JSON object per line, truncated on resume."""

from __future__ import annotations

import json
import random

from memlayers.train.metrics import MetricsLogger, read_metrics


def random_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"step": s, "loss": rng.uniform(1, 6), "lr": rng.uniform(1e-4, 1e-2), "name": f"r{s}"}
        for s in range(1, n + 1)
    ]


def write(run_dir, records, resume_step=None) -> MetricsLogger:
    logger = MetricsLogger(run_dir, resume_step=resume_step, tensorboard=False)
    for record in records:
        logger.log(record["step"], {k: v for k, v in record.items() if k != "step"})
    return logger


def test_lines_are_json_with_step_and_read_back(tmp_path):
    records = random_records(5)
    logger = write(tmp_path, records)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    for line, record in zip(lines, records, strict=True):
        parsed = json.loads(line)
        assert parsed == record
        assert next(iter(parsed)) == "step"  # step comes first
    logger.close()
    assert read_metrics(tmp_path) == records


def test_lines_are_flushed_as_logged(tmp_path):
    logger = write(tmp_path, random_records(2))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # before close
    logger.close()


def test_a_new_run_starts_an_empty_log(tmp_path):
    write(tmp_path, random_records(4)).close()
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert read_metrics(tmp_path) == []


def test_resume_drops_later_steps(tmp_path):
    records = random_records(9, seed=3)
    records.insert(6, {"step": 6, "heldout_loss": 2.5})  # an evaluation record at the resume step
    write(tmp_path, records).close()
    logger = write(tmp_path, [{"step": 7, "loss": 0.25}], resume_step=6)
    logger.close()
    assert read_metrics(tmp_path) == records[:7] + [{"step": 7, "loss": 0.25}]


def test_resume_without_a_log_starts_one(tmp_path):
    write(tmp_path, [{"step": 3, "loss": 1.0}], resume_step=2).close()
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.0}]


def test_resume_drops_a_torn_last_line(tmp_path):
    records = random_records(4, seed=1)
    write(tmp_path, records).close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "loss": 1.2')  # the process died mid-write
    write(tmp_path, [{"step": 5, "loss": 1.5}], resume_step=4).close()
    assert read_metrics(tmp_path) == records + [{"step": 5, "loss": 1.5}]
