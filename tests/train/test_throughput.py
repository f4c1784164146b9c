"""Throughput log fields: tokens/s per device, MFU from the FLOP accounting, peak memory."""

import pytest
import torch

from memlayers.distributed.plan import GPUS
from memlayers.train import throughput
from memlayers.train.metrics import read_metrics
from memlayers.train.throughput import throughput_fields
from memlayers.train.trainer import Trainer


def test_fields_on_a_cpu_leave_mfu_out():
    fields = throughput_fields(8000.0, 4, torch.device("cpu"), 1e9)
    assert fields["tokens_per_s_per_device"] == 2000.0
    assert "mfu" not in fields  # a CPU's peak is not guessed
    assert fields["peak_memory_mib"] > 10  # this process's resident memory, MiB


def test_mfu_is_training_flops_over_the_peak(monkeypatch):
    monkeypatch.setattr(throughput, "device_peak_flops", lambda device: GPUS["h100"].bf16_tflops * 1e12)
    fields = throughput_fields(2.0e5, 8, torch.device("cpu"), 1.5e9)
    # 25,000 tokens/s per GPU x 3 x 1.5 GFLOP = 112.5 TFLOP/s of 989
    assert fields["mfu"] == pytest.approx(112.5 / 989)
    assert "mfu" not in throughput_fields(2.0e5, 8, torch.device("cpu"), None)  # an external model's FLOPs are unknown


def test_training_logs_them(make_config):
    trainer = Trainer(make_config("train.steps=2", "train.log_every=1"))
    trainer.fit(progress=False)
    logged = [r for r in read_metrics(trainer.run_dir) if "loss" in r]
    assert len(logged) == 2
    for record in logged:
        assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"])  # one process
        assert record["peak_memory_mib"] > 0
