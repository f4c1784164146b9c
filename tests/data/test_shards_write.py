"""Writing token shards: the exact framed token stream, the same bytes for any worker count,
parts, the held-out split, uint32 vocabularies, resuming, and the one-line errors."""

import gzip
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from memlayers.data import shards_write
from memlayers.data.shards_write import is_heldout, token_dtype, write_shards
from memlayers.data.text import DataError
from memlayers.data.tokenizer import Tokenizer

WORDS = "ada lovelace was born in london and wrote the first program for the analytical engine".split()


def make_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + f" #{seed}-{i} é🚀" for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(make_docs(300, 99), vocab_size=300).save(path)
    return path


def write_corpus(folder, sizes=(120, 900, 250)):
    """Three sources (a .txt, a .jsonl.gz, a .parquet); their paths and documents."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [make_docs(n, seed) for seed, n in enumerate(sizes)]
    (folder / "a.txt").write_text("\n\n".join(docs[0]) + "\n", encoding="utf-8")
    (folder / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[1]).encode()))
    pq.write_table(pa.table({"text": docs[2]}), folder / "c.parquet")
    return [folder / "a.txt", folder / "b.jsonl.gz", folder / "c.parquet"], docs


def read_split(out, split):
    """A split's token stream (int64) and its shard entries, read as the contract says."""
    index = json.loads((out / "index.json").read_text())
    shards = index["splits"][split]["shards"]
    parts = [np.fromfile(out / s["file"], dtype=np.dtype(index["dtype"]).newbyteorder("<")) for s in shards]
    for part, shard in zip(parts, shards, strict=True):
        assert part.size == shard["tokens"]
    return (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)), shards


def framed(tokenizer, docs):
    return [tokenizer.encode(d, bos=tokenizer.bos_id is not None, eos=tokenizer.eos_id is not None) for d in docs]


def files(out):
    """Every file of ``out``: name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_shards_hold_the_framed_token_stream(tmp_path, tokenizer_file):
    paths, docs = write_corpus(tmp_path / "corpus")
    summary = write_shards([tmp_path / "corpus"], tokenizer_file, tmp_path / "out", workers=1,
                           shard_tokens=2000, progress=False)
    tokenizer = Tokenizer.load(tokenizer_file)
    expected = [ids for source in docs for ids in framed(tokenizer, source)]
    stream, shards = read_split(tmp_path / "out", "train")
    assert stream.tolist() == [t for ids in expected for t in ids]
    index = summary.index
    assert (index["format"], index["version"], index["dtype"], index["vocab_size"]) == (
        "memlayers-token-shards", 1, "uint16", tokenizer.vocab_size)
    assert (index["bos_id"], index["eos_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["documents"] == len(expected)
    assert index["splits"]["train"]["tokens"] == stream.size
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert index["tokenizer"] == {"file": "tokenizer.json",
                                  "sha256": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()}
    assert [s["path"] for s in index["sources"]] == [str(p.resolve()) for p in paths]
    for entry, path, source in zip(index["sources"], paths, docs, strict=True):
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["documents"] == len(source)
        assert entry["tokens"] == sum(map(len, framed(tokenizer, source)))
    assert index["text_field"] == "text" and index["heldout_fraction"] == 0.0 and index["seed"] == 0
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    # parts: whole documents, named by source and part, closed once they reach shard_tokens
    names = [s["file"] for s in shards]
    assert names[0] == "train-00000-00000.bin"
    assert {"train-00001-00000.bin", "train-00001-00001.bin", "train-00002-00000.bin"} <= set(names)
    assert names == sorted(names) and sum(s["documents"] for s in shards) == len(expected)
    lengths = iter(map(len, expected))
    for number, shard in enumerate(shards):
        sizes = [next(lengths) for _ in range(shard["documents"])]
        assert sum(sizes) == shard["tokens"]
        last_of_source = number + 1 == len(shards) or shards[number + 1]["file"].endswith("-00000.bin")
        assert shard["tokens"] - sizes[-1] < 2000 and (last_of_source or shard["tokens"] >= 2000)


def test_same_bytes_for_any_worker_count(tmp_path, tokenizer_file):
    write_corpus(tmp_path / "corpus")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        write_shards([tmp_path / "corpus"], tokenizer_file, out, workers=workers, heldout_fraction=0.2,
                     shard_tokens=3000, progress=False, chunk_documents=64)
        outs.append(files(out))
    assert outs[0] == outs[1]
    assert len([name for name in outs[0] if name.endswith(".bin")]) > 6


def test_heldout_split_is_deterministic_and_disjoint(tmp_path, tokenizer_file):
    _, docs = write_corpus(tmp_path / "corpus")
    tokenizer = Tokenizer.load(tokenizer_file)
    runs = {}
    for name, seed, chunk in (("a", 0, 100), ("b", 0, 1000), ("c", 1, 1000)):  # a and b: other chunks, same split
        index = write_shards([tmp_path / "corpus"], tokenizer_file, tmp_path / name, workers=1, seed=seed,
                             heldout_fraction=0.25, progress=False, chunk_documents=chunk).index
        runs[name] = {split: read_split(tmp_path / name, split)[0].tolist() for split in ("train", "heldout")}
        assert index["splits"]["heldout"]["documents"] + index["splits"]["train"]["documents"] == sum(map(len, docs))
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    held = [(s, i) for s, source in enumerate(docs) for i in range(len(source)) if is_heldout(0, s, i, 0.25)]
    assert 0.18 < len(held) / sum(map(len, docs)) < 0.32
    for split, chosen in (("heldout", True), ("train", False)):
        expected = [framed(tokenizer, [d])[0] for s, source in enumerate(docs) for i, d in enumerate(source)
                    if ((s, i) in set(held)) == chosen]
        assert runs["a"][split] == [t for ids in expected for t in ids]
    assert [is_heldout(5, 1, i, 0.5) for i in range(50)] == [is_heldout(5, 1, i, 0.5) for i in range(50)]
    assert not any(is_heldout(5, 1, i, 0.0) for i in range(200))


def test_uint32_for_a_vocabulary_over_65536(tmp_path):
    assert [token_dtype(n) for n in (300, 65535, 65536, 65537, 200_000)] == ["uint16"] * 3 + ["uint32"] * 2
    vocab = {f"w{i}": i for i in range(70_000)} | {"<s>": 70_000, "</s>": 70_001, "[UNK]": 70_002}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "big.json").write_text(backend.to_str())
    docs = ["w69999 w1 w65536", "w0 w70000 w12345"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    index = write_shards([tmp_path / "a.txt"], tmp_path / "big.json", tmp_path / "out", workers=1, progress=False).index
    assert index["dtype"] == "uint32" and index["vocab_size"] == 70_003
    stream, _ = read_split(tmp_path / "out", "train")
    assert stream.tolist() == [70_000, 69999, 1, 65536, 70_001, 70_000, 0, 70_002, 12345, 70_001]
    assert (tmp_path / "out" / "train-00000-00000.bin").stat().st_size == 4 * 10


def stamps(out):
    """inode and mtime of each shard file: unchanged when a rerun keeps the file."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.bin")}


def test_resume_skips_finished_sources_and_redoes_the_interrupted_one(tmp_path, tokenizer_file, monkeypatch):
    paths, _ = write_corpus(tmp_path / "corpus")
    args = dict(workers=1, heldout_fraction=0.1, shard_tokens=1500, progress=False, chunk_documents=100)
    write_shards(paths, tokenizer_file, tmp_path / "fresh", **args)

    encode = shards_write._Encoder.__call__

    def interrupted(self, texts, source, first):
        if source == 1 and first >= 300:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the second source
        return encode(self, texts, source, first)

    monkeypatch.setattr(shards_write._Encoder, "__call__", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(paths, tokenizer_file, out, **args)
    assert not (out / "index.json").exists()
    assert list(json.loads((out / "progress.json").read_text())["sources"]) == ["0"]
    assert (out / "train-00001-00000.bin").exists()  # a part of the interrupted source
    (out / "train-00001-00009.bin").write_bytes(b"stale")
    kept = {name: stamp for name, stamp in stamps(out).items() if "-00000-" in name}
    monkeypatch.setattr(shards_write._Encoder, "__call__", encode)

    summary = write_shards(paths, tokenizer_file, out, **args)
    assert summary.sources_skipped == 1
    assert {name: stamp for name, stamp in stamps(out).items() if "-00000-" in name} == kept
    assert files(out) == files(tmp_path / "fresh")  # the stale part is gone, the rest redone
    finished = stamps(out)
    again = write_shards(paths, tokenizer_file, out, **args)  # all finished: nothing redone
    assert again.sources_skipped == 3 and again.tokens_written == 0 and stamps(out) == finished
    assert files(out) == files(tmp_path / "fresh")


def test_a_changed_or_dropped_source_is_redone(tmp_path, tokenizer_file):
    paths, docs = write_corpus(tmp_path / "corpus")
    args = dict(workers=1, shard_tokens=1500, progress=False)
    out = tmp_path / "out"
    write_shards(paths, tokenizer_file, out, **args)
    before = stamps(out)
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(docs[0][:50]) + "\n", encoding="utf-8")
    summary = write_shards(paths, tokenizer_file, out, **args)
    assert summary.sources_skipped == 2
    after = stamps(out)
    assert all(after[name] == stamp for name, stamp in before.items() if "-00000-" not in name)
    assert after["train-00000-00000.bin"] != before["train-00000-00000.bin"]
    write_shards(paths, tokenizer_file, tmp_path / "fresh", **args)
    assert files(out) == files(tmp_path / "fresh")
    index = write_shards(paths[:2], tokenizer_file, out, **args).index  # the parquet file left out
    assert [s["path"] for s in index["sources"]] == [str(p.resolve()) for p in paths[:2]]
    assert not list(out.glob("train-00002-*")) and "2" not in json.loads((out / "progress.json").read_text())["sources"]


def test_rerun_with_other_settings_is_refused(tmp_path, tokenizer_file):
    paths, _ = write_corpus(tmp_path / "corpus", sizes=(20, 20, 20))
    out = tmp_path / "out"
    write_shards(paths, tokenizer_file, out, workers=1, progress=False)
    other = tmp_path / "other.json"
    Tokenizer.train(make_docs(100, 7), vocab_size=280).save(other)
    for change, word in ((dict(seed=1), "seed 0, now 1"), (dict(heldout_fraction=0.5), "heldout_fraction"),
                         (dict(text_field="body"), "text_field 'text', now 'body'"), (dict(tokenizer=other), "tokenizer_sha256")):
        kwargs = {"tokenizer": tokenizer_file, "workers": 1, "progress": False} | change
        with pytest.raises(DataError) as info:
            write_shards(paths, out=out, **kwargs)
        message = str(info.value)
        assert "\n" not in message and str(out) in message and word in message
        assert "use a new --out or delete" in message
    assert (out / "index.json").exists()  # a refused run changes nothing


def test_argument_and_input_errors(tmp_path, tokenizer_file):
    paths, _ = write_corpus(tmp_path / "corpus", sizes=(5, 5, 5))

    def error(*parts, inputs=paths, tokenizer=tokenizer_file, out=tmp_path / "out", **kwargs):
        with pytest.raises(DataError) as info:
            write_shards(inputs, tokenizer, out, **({"workers": 1, "progress": False} | kwargs))
        message = str(info.value)
        assert "\n" not in message
        for part in parts:
            assert str(part) in message, message

    error("--shard-tokens must be >= 1, got 0", shard_tokens=0)
    error("--heldout-fraction must be in [0, 1), got 1.0", heldout_fraction=1.0)
    error("--heldout-fraction must be in [0, 1), got -0.1", heldout_fraction=-0.1)
    error("--workers must be >= 1, got 0", workers=0)
    (tmp_path / "file").write_text("x")
    error(tmp_path / "file", "is a file", "--out", out=tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    error(tmp_path / "busy", "not empty", "new or empty directory", out=tmp_path / "busy")
    error(tmp_path / "none.json", "tokenizer file does not exist", tokenizer=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    error(tmp_path / "bad.json", "not valid JSON", tokenizer=tmp_path / "bad.json")
    error(tmp_path / "missing.txt", "does not exist", inputs=[paths[0], tmp_path / "missing.txt"])
    (tmp_path / "a.csv").write_text("x")
    error(tmp_path / "a.csv", "unsupported file type '.csv'", inputs=[tmp_path / "a.csv"])
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    error("no documents", tmp_path / "blank.txt", inputs=[tmp_path / "blank.txt", tmp_path / "empty.jsonl"],
          out=tmp_path / "empty")
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    error(f"{tmp_path / 'c.jsonl'}, line 2:", "must be a string", inputs=[tmp_path / "c.jsonl"], out=tmp_path / "c")
    assert not (tmp_path / "out").exists()  # bad arguments and inputs are found before anything is written
