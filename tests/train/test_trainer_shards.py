"""Training from token shards (``data.shards``): the tokenizer and held-out split come from the
shard directory, a crashed run resumes at the exact token, bad combinations are refused."""

import sys
from pathlib import Path

import pytest

from memlayers.config import ConfigError
from memlayers.data.facts import FactWorldConfig, generate_world, write_world
from memlayers.data.shards_write import write_shards
from memlayers.data.text import DataError, read_documents
from memlayers.data.tokenizer import Tokenizer
from memlayers.train.checkpoint import list_checkpoints
from memlayers.train.metrics import read_metrics
from memlayers.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the shared helpers
from conftest import EXACT_KEYS, Crash, crash_at  # noqa: E402


def make_shards(tmp_path: Path) -> Path:
    """A fact world's training text as token shards of 2,000 tokens with a 10% held-out split."""
    files = write_world(generate_world(FactWorldConfig(n_people=30, heldout_people=0, bios_per_person=2)), tmp_path / "world")
    tokenizer = Tokenizer.train(read_documents(files["train"]), 300).save(tmp_path / "tokenizer.json")
    out = tmp_path / "shards"
    write_shards([files["train"]], tokenizer, out, workers=1, heldout_fraction=0.1, shard_tokens=2000, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("corpus"))


def train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_resume_from_shards_is_exact(make_config, shards):
    settings = (f"data.shards={shards}", "train.steps=8", "train.checkpoint_every=4", "train.log_every=1",
                "train.keep_last=5", "train.eval_qa=0")
    straight = Trainer(make_config(*settings, name="straight"))
    assert straight.data.tokenizer.vocab_size == Tokenizer.load(shards / "tokenizer.json").vocab_size
    summary = straight.fit(progress=False)
    assert summary["heldout_loss"] > 0  # from the shards' heldout split

    crashed_config = make_config(*settings, name="crashed")
    with pytest.raises(Crash):
        Trainer(crashed_config).fit(progress=False, on_step=crash_at(6))
    assert [p.name for p in list_checkpoints(crashed_config.train.out_dir)] == ["step_00000004"]
    resumed = Trainer(crashed_config, resume=True)
    assert resumed.batches.state_dict() == {"epoch": 0, "position": 16}  # 4 steps of 4 sequences
    resumed.fit(progress=False)
    a, b = train_records(straight.run_dir), train_records(resumed.run_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra[k] for k in EXACT_KEYS} == {k: rb[k] for k in EXACT_KEYS}, ra["step"]


def test_shards_and_text_are_exclusive_and_a_foreign_tokenizer_is_refused(make_config, shards, tmp_path):
    with pytest.raises(ConfigError, match="two sources of training text"):
        make_config(f"data.shards={shards}", "data.train=train.txt")
    other = Tokenizer.train(["something else entirely", "and more text"] * 50, 300).save(tmp_path / "other.json")
    with pytest.raises(DataError, match="not the tokenizer"):
        Trainer(make_config(f"data.shards={shards}", f"data.tokenizer={other}"))
    with pytest.raises(DataError, match="not a directory of token shards"):
        Trainer(make_config(f"data.shards={tmp_path / 'missing'}"))
