"""Reading a corpus for `memlayers tokenize`: every format as the same documents, folders, and the
one-line DataError of each bad input."""

import bz2
import gzip
import hashlib
import json
import lzma
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memlayers.data.sources import Source, find_sources
from memlayers.data.text import DataError, iter_documents

DOCS = ["first document\nwith two lines", "second: héllo 東京 🚀", "third"]
TXT = "\n\n".join(DOCS) + "\n"
JSONL = "".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCS))
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def zstd(data: bytes) -> bytes:
    """zstd-compressed ``data`` (pyarrow's codec)."""
    return pa.Codec("zstd").compress(data, asbytes=True)


COMPRESS[".zst"] = zstd


def documents(path, field="text"):
    (source,) = find_sources([path])
    return list(source.documents(field))


def assert_error(call, *parts):
    """``call()`` raises a one-line DataError containing every one of ``parts``; its message."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, message
    return message


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_text_reads_as_the_plain_file(tmp_path, suffix):
    txt = tmp_path / f"a.txt{suffix}"
    txt.write_bytes(COMPRESS[suffix](TXT.encode()))
    jsonl = tmp_path / f"b.JSONL{suffix}"
    jsonl.write_bytes(COMPRESS[suffix](JSONL.encode()))
    assert documents(txt) == DOCS
    assert documents(jsonl) == DOCS
    assert list(iter_documents(jsonl)) == DOCS  # the text reader itself opens compressed files


def test_parquet_and_datasets_stream_their_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    many = [f"row {i}" for i in range(2500)]  # more than one batch of rows
    pq.write_table(pa.table({"body": many, "n": list(range(2500))}), tmp_path / "a.parquet", row_group_size=700)
    assert documents(tmp_path / "a.parquet", "body") == many
    dataset = datasets.Dataset.from_dict({"text": many})
    dataset.save_to_disk(tmp_path / "plain", max_shard_size="10KB")
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(tmp_path / "dict")
    (plain,) = find_sources([tmp_path / "plain"])
    assert plain.kind == "datasets" and len(plain.files()) > 3
    assert list(plain.documents("text")) == many
    assert plain.bytes_read() == plain.size()
    assert documents(tmp_path / "dict") == many  # the train split
    digest = hashlib.sha256()
    for file in plain.files():
        digest.update(f"{file.relative_to(plain.path).as_posix()} {hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    assert plain.sha256() == digest.hexdigest()
    assert plain.sha256() == Source(plain.path, "datasets").sha256()  # reading wrote nothing into it
    datasets.DatasetDict({"validation": dataset}).save_to_disk(tmp_path / "nosplit")
    assert_error(lambda: documents(tmp_path / "nosplit"), tmp_path / "nosplit", "without a 'train' split",
                 "splits: validation", tmp_path / "nosplit" / "validation")
    assert_error(lambda: documents(tmp_path / "plain", "body"), "no column 'body'", "columns: text", "--text-field")


def test_folders_expand_to_supported_files_sorted_by_path(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("b")
    (tmp_path / "corpus" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    (tmp_path / "corpus" / "sub" / "c.parquet").write_bytes(b"")
    (tmp_path / "corpus" / "notes.md").write_text("skipped")
    (tmp_path / "corpus" / "x.parquet.gz").write_text("skipped")
    (tmp_path / "z.txt").write_text("z")
    sources = find_sources([tmp_path / "z.txt", tmp_path / "corpus"])
    assert [(s.path.relative_to(tmp_path).as_posix(), s.kind) for s in sources] == [
        ("z.txt", "text"), ("corpus/a.jsonl.gz", "text"), ("corpus/b.txt", "text"), ("corpus/sub/c.parquet", "parquet")]
    assert all(s.path.is_absolute() for s in sources)


def test_progress_reaches_the_file_size(tmp_path):
    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n"
                                           for i in range(3000)).encode()))
    (source,) = find_sources([path])
    seen = []
    for _ in source.documents("text"):
        seen.append(source.bytes_read())
    assert seen == sorted(seen) and 0 < seen[0] < seen[-1] <= source.size() == path.stat().st_size
    assert source.bytes_read() == source.size()


def test_input_errors(tmp_path):
    assert_error(lambda: find_sources([tmp_path / "missing.txt"]), tmp_path / "missing.txt", "does not exist")
    (tmp_path / "a.csv").write_text("x")
    assert_error(lambda: find_sources([tmp_path / "a.csv"]), tmp_path / "a.csv", "unsupported file type '.csv'",
                 ".txt or .jsonl", ".parquet")
    (tmp_path / "a.parquet.gz").write_text("x")
    assert_error(lambda: find_sources([tmp_path / "a.parquet.gz"]), "unsupported file type '.parquet.gz'")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    assert_error(lambda: find_sources([tmp_path / "empty"]), tmp_path / "empty", "no file of a supported type")


def test_text_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "a.jsonl.gz"
    bad_json.write_bytes(gzip.compress(JSONL.encode() + b'{"text": "x",}\n'))
    assert_error(lambda: documents(bad_json), f"{bad_json}, line 4:", "not valid JSON")
    no_field = tmp_path / "b.jsonl.xz"
    no_field.write_bytes(lzma.compress(b'{"text": "x"}\n{"body": "y"}\n'))
    assert_error(lambda: documents(no_field), f"{no_field}, line 2:", "no 'text' field", "keys: body")
    not_string = tmp_path / "c.jsonl"
    not_string.write_text('{"text": ["x"]}\n')
    assert_error(lambda: documents(not_string), f"{not_string}, line 1:", "must be a string, got list")
    latin = tmp_path / "d.txt.bz2"
    latin.write_bytes(bz2.compress("ok\n\ncaf\xe9\n".encode("latin-1")))
    assert_error(lambda: documents(latin), f"{latin}, line 3:", "not valid UTF-8")


@pytest.mark.parametrize("suffix,data", [
    (".gz", b"this is not gzip at all"),
    (".gz", gzip.compress(TXT.encode() * 50, mtime=0)[:-30]),  # truncated
    (".xz", lzma.compress(TXT.encode())[:-20]),
    (".bz2", b"BZh9 not bzip2"),
    (".xz", b"not xz"),
    (".zst", b"\x28\xb5\x2f\xfd garbage garbage"),
], ids=["gz-garbage", "gz-truncated", "xz-truncated", "bz2-garbage", "xz-garbage", "zst-garbage"])
def test_corrupt_compressed_files(tmp_path, suffix, data):
    path = tmp_path / f"a.txt{suffix}"
    path.write_bytes(data)
    name = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}[suffix]
    assert_error(lambda: documents(path), path, f"corrupt {name} data", "re-download or recompress")


def test_parquet_errors(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), path)
    assert_error(lambda: documents(path), path, "no column 'text'", "columns: body, n", "--text-field")
    assert_error(lambda: documents(path, "n"), path, "column 'n' holds int64, not strings")
    pq.write_table(pa.table({"text": ["x", None]}), path)
    assert_error(lambda: documents(path), f"{path}, row 2:", "'text' is null")
    path.write_bytes(b"not parquet")
    assert_error(lambda: documents(path), path, "not a readable parquet file")


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "a.txt.zst").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for name in ("a.parquet", "a.txt.zst"):
        assert_error(lambda: documents(tmp_path / name), tmp_path / name, "needs pyarrow",  # noqa: B023
                     "pip install 'memlayers[data]'")
