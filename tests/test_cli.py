"""The command line: info output and one-line config errors."""

import json

from memlayers.cli import main
from memlayers.config import load_config
from memlayers.model import count_flops, count_parameters
from memlayers.train import RunConfig


def test_info_json_reports_counts_with_overrides(capsys):
    assert main(["info", "configs/tiny.yaml", "model.memory.n_keys=32", "--json", "--seq-len", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = load_config(RunConfig, "configs/tiny.yaml", ["model.memory.n_keys=32"])
    assert report["config"]["model"]["memory"]["n_keys"] == 32
    assert report["params"]["total"] == count_parameters(config.model).total
    assert report["flops_per_token"]["total"] == count_flops(config.model, 64).total


def test_info_table_shows_layer_layout(capsys):
    assert main(["info", "configs/paper_373m_memory.yaml"]) == 0
    out = capsys.readouterr().out
    layout = out.splitlines()[0].split()[1:25]
    assert [i for i, kind in enumerate(layout) if kind == "M"] == [4, 12, 20]


def test_config_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    assert main(["info", "configs/tiny.yaml", "model.memory.knn=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.memory.knn" in err and "n_keys" in err
    assert main(["info", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_says_which_vocabulary_it_counts(capsys):
    assert main(["info", "tiny", "data.vocab_size=1024"]) == 0
    vocab = capsys.readouterr().out.splitlines()[-1]
    assert vocab == ("vocab        512 (model.vocab_size; a run uses its tokenizer's vocabulary: "
                     "data.vocab_size=1024 when it trains one)")
    assert main(["info", "tiny", "data.tokenizer=my/tokenizer.json"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("vocabulary: that of data.tokenizer=my/tokenizer.json)")
