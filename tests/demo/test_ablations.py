"""Ablation files: variants built from the demo suite with their overrides."""


import pytest

from memlayers.config import ConfigError, load_config
from memlayers.demo import build_runs, demo_config
from memlayers.demo.ablations import AblationConfig, Variant, build_variants, markdown_table
from memlayers.train.config import DataConfig


def _suite(tmp_path):
    demo = demo_config(False)
    data = DataConfig(vocab_size=demo.vocab_size, seq_len=demo.seq_len, facts=demo.facts)
    return build_runs(demo, data, str(tmp_path), demo.vocab_size)


def test_shipped_ablations_build(tmp_path):
    ablation = load_config(AblationConfig, "demo_ablations")
    runs = build_variants(ablation, _suite(tmp_path), tmp_path)
    assert [r.name for r in runs] == [v.name for v in ablation.variants]
    by_name = {r.name: r for r in runs}
    assert by_name["value lr 3e-2"].config.optim.value_lr == pytest.approx(3e-2)
    assert by_name["no qk-norm"].config.model.memory.qk_norm is False
    assert by_name["2 shared memory layers (1, 3)"].config.model.memory_layers == (1, 3)
    assert by_name["dense, fixed packing"].config.data.repack is False
    assert by_name["dense, fixed packing"].memory_slots == 0 and by_name["no qk-norm"].memory_slots == 256**2
    out_dirs = {r.config.train.out_dir for r in runs}
    assert len(out_dirs) == len(runs) and all(str(tmp_path) in d for d in out_dirs)


def test_unknown_run_and_bad_override_are_config_errors(tmp_path):
    suite = _suite(tmp_path)
    with pytest.raises(ConfigError, match="unknown run 'memory-7'"):
        build_variants(AblationConfig(variants=[Variant("x", "memory-7")]), suite, tmp_path)
    with pytest.raises(ConfigError) as error:
        build_variants(AblationConfig(variants=[Variant("x", "dense", ("model.memory.knn=0",))]), suite, tmp_path)
    assert error.value.key == "model.memory.knn"
    with pytest.raises(ConfigError, match="unique"):
        AblationConfig(variants=[Variant("a", "dense"), Variant("a", "dense")])


def test_markdown_table_has_a_row_per_variant():
    rows = [
        {"name": "a", "run": "dense", "overrides": [], "note": "", "qa_em": 0.25, "answer_nll": 1.5,
         "heldout_ppl": None, "tokens_per_s": 1000.0},
        {"name": "b", "run": "memory-64x64", "overrides": ["optim.value_lr=3e-2"], "note": "n",
         "qa_em": 0.5, "answer_nll": 0.7, "heldout_ppl": 3.25, "tokens_per_s": 900.0},
    ]
    table = markdown_table(rows, "Ablations")
    assert "| a | dense | - | 25.0% | 1.500 | - | 1,000 |  |" in table
    assert "| b | memory-64x64 | `optim.value_lr=3e-2` | 50.0% | 0.700 | 3.25 | 900 | n |" in table
