"""A run directory holds one run: a new run refuses a used one (or moves it aside with
--overwrite), and --resume refuses another config, data or tokenizer, overwriting nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memlayers.cli import main
from memlayers.config import ConfigError
from memlayers.train.checkpoint import list_checkpoints
from memlayers.train.metrics import read_metrics
from memlayers.train.trainer import Trainer


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_directory_holding_a_run_and_changes_nothing(make_config, capsys):
    config = make_config("train.steps=2")
    Trainer(config).fit(progress=False)
    run_dir = Path(config.train.out_dir)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"already holds a run with checkpoints up to step 2 .*pass --resume"):
        Trainer(make_config("train.steps=4"))
    assert snapshot(run_dir) == before


def test_overwrite_moves_the_old_run_aside_and_prunes_only_the_new_one(make_config):
    old = make_config("train.steps=6", "train.checkpoint_every=3", "train.keep_last=5")
    Trainer(old).fit(progress=False)
    run_dir = Path(old.train.out_dir)
    old_files = snapshot(run_dir)
    new = make_config("train.steps=2", "train.checkpoint_every=1", "train.keep_last=1")
    Trainer(new, overwrite=True).fit(progress=False)
    # the new run's checkpoints survive pruning; the old run sits untouched under replaced/
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000002"]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    (aside,) = (run_dir / "replaced").iterdir()
    assert snapshot(aside) == old_files


def test_resume_with_other_data_is_refused_and_data_is_never_regenerated(make_config):
    config = make_config("train.steps=2")
    Trainer(config).fit(progress=False)
    run_dir = Path(config.train.out_dir)
    before = snapshot(run_dir)
    # another fact world (the same keys, another seed): the generated data must not be replaced
    with pytest.raises(ConfigError, match=r"data.facts.seed \(checkpoint 0, now 7\)"):
        Trainer(make_config("train.steps=4", "data.facts.seed=7"), resume=True)
    assert snapshot(run_dir) == before
    # the run's data file edited behind its back
    train_file = run_dir / "data" / "train.jsonl"
    train_file.write_text(train_file.read_text().replace("a", "e"))
    with pytest.raises(ConfigError, match="the train file differs from the one the run was trained on"):
        Trainer(make_config("train.steps=4"), resume=True)


def test_resume_with_another_tokenizer_is_refused(make_config, tmp_path):
    config = make_config("train.steps=2")
    Trainer(config).fit(progress=False)
    other = make_config("train.steps=2", "data.facts.seed=5", name="other")
    Trainer(other).fit(progress=False)
    foreign = Path(other.train.out_dir) / "tokenizer.json"
    with pytest.raises(ConfigError, match="the tokenizer file differs"):
        Trainer(make_config("train.steps=4", f"data.tokenizer={foreign}"), resume=True)
    # the run's own tokenizer, named explicitly, is accepted
    own = Path(config.train.out_dir) / "tokenizer.json"
    assert Trainer(make_config("train.steps=4", f"data.tokenizer={own}"), resume=True).step == 2


def test_resume_says_where_it_resumes_and_may_change_the_length(make_config, capsys):
    config = make_config("train.steps=2", "train.checkpoint_every=1", "train.keep_last=3")
    Trainer(config).fit(progress=False)
    trainer = Trainer(make_config("train.steps=5", "train.log_every=2", "train.eval_qa=3"), resume=True)
    assert trainer.step == 2
    assert "memlayers: resuming from step 2" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(make_config):
    config = make_config("train.steps=4", "train.checkpoint_every=1", "train.keep_last=4")
    Trainer(config).fit(progress=False)
    run_dir = Path(config.train.out_dir)
    older = list_checkpoints(run_dir)[1]  # step 2
    trainer = Trainer(make_config("train.steps=4", "train.checkpoint_every=1", "train.keep_last=1"), resume=older)
    trainer.fit(progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004"]
    (abandoned,) = (run_dir / "abandoned").iterdir()
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000003", "step_00000004"]


def test_the_cli_refuses_and_overwrites(tmp_path, capsys):
    from memlayers.bench.reliability import write_config

    config = write_config(tmp_path / "run.yaml", tmp_path / "run")
    args = ["train", str(config), "train.steps=1", "train.eval_qa=2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memlayers: config error: train.out_dir:")
    assert main([*args, "--overwrite"]) == 0
    assert "moved the previous run" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / "state.json").read_text())["step"] == 1


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(make_config):
    with pytest.raises(ConfigError, match=r"^model: this run needs at least .* GiB"):
        Trainer(make_config("model.dim=65536", "model.n_heads=2", "model.n_layers=64"))


def test_the_fit_check_splits_the_model_over_the_ranks_that_shard_it(monkeypatch):
    from memlayers.model.accounting import count_parameters
    from memlayers.model.config import ModelConfig
    from memlayers.train import run_dir

    model = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=1024, max_seq_len=64)
    params = count_parameters(model).total
    # room for a quarter of the weights, gradients and moments, plus the batch's activations
    monkeypatch.setattr(run_dir, "machine_bytes", lambda device: 16 * params // 4 + 2**22)
    run_dir.check_fits(model, 1, 8, torch.device("cpu"), shards=4)
    with pytest.raises(ConfigError, match="this run needs at least"):
        run_dir.check_fits(model, 1, 8, torch.device("cpu"), shards=2)


def test_resume_without_the_run_s_world_says_so_and_generates_none(make_config):
    import shutil

    from memlayers.data.text import DataError

    config = make_config("train.steps=2")
    Trainer(config).fit(progress=False)
    shutil.rmtree(Path(config.train.out_dir) / "data")
    with pytest.raises(DataError, match="holds no fact world: a resumed run reads the world it generated"):
        Trainer(make_config("train.steps=4"), resume=True)
    assert not (Path(config.train.out_dir) / "data").exists()
