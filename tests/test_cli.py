"""The command line: info output and one-line config errors."""

import json

from memlayers.cli import main
from memlayers.config import load_config
from memlayers.demo.report import summary_lines
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


def _demo_results(dense_em: float) -> dict:
    """Results of a demo with a dense run at ``dense_em`` and two memory runs at 10% and 20%."""
    def run(name, kind, slots, em):
        return {"name": name, "kind": kind, "memory_slots": slots, "qa_em": em, "flops_per_token": 1e6}

    return {"runs": [run("dense", "dense", None, dense_em), run("memory-32x32", "memory", 1024, 0.1),
                     run("memory-64x64", "memory", 4096, 0.2)]}


def test_demo_summary_gives_no_ratio_when_dense_scores_zero():
    assert summary_lines(_demo_results(0.05))[0] == "- Largest memory (memory-64x64) exact match 20.0% vs dense 5.0%: **4.00x**."
    first = summary_lines(_demo_results(0.0))[0]
    assert first == "- Largest memory (memory-64x64) exact match 20.0% vs dense 0.0%: n/a (dense 0%)."
