"""`memlayers tokenize`: its arguments, the summary line, and bad input as one line with exit code 2."""

import argparse
import json
import re

import pytest

from memlayers.data.shards_write import DEFAULT_SHARD_TOKENS
from memlayers.data.text import DataError
from memlayers.data.tokenize_cli import add_parsers
from memlayers.data.tokenizer import Tokenizer

DOCS = [f"document {i}: the analytical engine weaves algebraic patterns" for i in range(60)]


@pytest.fixture
def corpus(tmp_path):
    Tokenizer.train(DOCS, vocab_size=300).save(tmp_path / "tokenizer.json")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("\n\n".join(DOCS[:20]))
    (tmp_path / "data" / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS[20:]))
    return tmp_path


def parse(argv):
    parser = argparse.ArgumentParser(prog="memlayers")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_defaults():
    args = parse(["tokenize", "a.txt", "b", "--tokenizer", "t.json", "--out", "o"])
    assert (args.inputs, args.tokenizer, args.out) == (["a.txt", "b"], "t.json", "o")
    assert (args.text_field, args.workers, args.heldout_fraction, args.shard_tokens, args.seed) == (
        "text", None, 0.0, DEFAULT_SHARD_TOKENS, 0)
    with pytest.raises(SystemExit):
        parse(["tokenize", "--tokenizer", "t.json", "--out", "o"])  # no input


def test_tokenize_prints_one_summary_line(corpus, capsys):
    args = parse(["tokenize", str(corpus / "data"), "--tokenizer", str(corpus / "tokenizer.json"),
                  "--out", str(corpus / "out"), "--text-field", "body", "--workers", "2",
                  "--heldout-fraction", "0.25", "--shard-tokens", "100", "--seed", "3"])
    assert args.func(args) == 0
    line = capsys.readouterr().out
    index = json.loads((corpus / "out" / "index.json").read_text())
    shards = sum(len(split["shards"]) for split in index["splits"].values())
    tokens = sum(split["tokens"] for split in index["splits"].values())
    assert line.count("\n") == 1 and shards > 4
    assert re.fullmatch(rf"60 documents, {tokens:,} tokens \([\d,]+ held out\) in {shards} shards \(uint16\) "
                        rf"-> {re.escape(str(corpus / 'out'))}; [\d.]+ s, [\d,]+ tokens/s\n", line), line
    assert (index["text_field"], index["heldout_fraction"], index["seed"]) == ("body", 0.25, 3)
    assert args.func(args) == 0  # again: everything finished, skipped
    assert "2 unchanged sources skipped" in capsys.readouterr().out


def test_bad_input_is_one_data_error(corpus):
    args = parse(["tokenize", str(corpus / "data"), "--tokenizer", str(corpus / "tokenizer.json"),
                  "--out", str(corpus / "out"), "--workers", "1"])
    with pytest.raises(DataError, match=r"b\.jsonl, line 1: no 'text' field \(keys: body\)"):
        args.func(args)  # b.jsonl's field is "body"


def test_memlayers_main_reports_data_errors(corpus, capsys):
    from memlayers import cli

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "tokenize" not in commands:
        pytest.skip("memlayers.cli does not wire `tokenize` yet (add_parsers of memlayers.data.tokenize_cli)")
    code = cli.main(["tokenize", str(corpus / "data"), "--tokenizer", str(corpus / "tokenizer.json"),
                     "--out", str(corpus / "out"), "--shard-tokens", "0"])
    assert code == 2
    assert capsys.readouterr().err == "memlayers: data error: --shard-tokens must be >= 1, got 0\n"
