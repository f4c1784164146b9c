"""Text formats shared by training data and evaluation, and reading a user's files.

Training text is a ``.txt`` file (documents separated by blank lines) or a
``.jsonl`` file (one JSON object per line with a string field, ``text`` by
default), either of them also compressed (``.txt.gz``, ``.jsonl.zst``, ...: see
:data:`COMPRESSED_SUFFIXES`). Question/answer sets are ``.jsonl`` files with string ``question``
and ``answer`` fields. Every problem with a file raises :class:`DataError`,
whose one-line message names the file, the line when there is one, what is
wrong and what to do, e.g.::

    data/train.jsonl, line 17: not valid JSON (Expecting ',' delimiter); write one JSON object per line
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from memlayers.config import first_line

QA_SEPARATOR = "\nAnswer:"

TEXT_SUFFIXES = (".txt", ".jsonl")
"""File types :func:`read_documents` reads."""

COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
"""Compressions a text file may have on top of its type (``notes.txt.gz``), and their names.
zstd is read with pyarrow (``pip install 'memlayers[data]'``), the others with the standard library."""


class DataError(ValueError):
    """A data file (or tokenized data) is missing, malformed or too small."""


def qa_prompt(question: str) -> str:
    """The prompt a model sees for a question; the answer follows after a space."""
    return f"Question: {question.strip()}{QA_SEPARATOR}"


def qa_text(question: str, answer: str) -> str:
    """A question and its answer as one training document."""
    return f"{qa_prompt(question)} {answer.strip()}"


def replace_atomic(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temp file over ``path`` in one step, with the permissions a plain
    ``open(path, "w")`` would give (``mkstemp`` makes files only their owner can read)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same folder and ``os.replace``.

    A reader never sees a half-written file: it finds the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        replace_atomic(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write ``records`` as JSON Lines (one object per line, UTF-8), atomically."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    return write_text_atomic(path, "".join(lines))


def import_optional(module: str, path: str | Path, what: str) -> ModuleType:
    """Import ``module`` (pyarrow, datasets: the ``data`` extra), or raise :class:`DataError`
    naming the file that needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise DataError(f"{path}: reading {what} needs {package}; pip install 'memlayers[data]'") from None


def file_type(path: str | Path) -> tuple[str, str]:
    """A file name's type and compression suffixes, lower case: ``a.JSONL.gz`` -> ``(".jsonl", ".gz")``,
    ``a.txt`` -> ``(".txt", "")``, ``a.gz`` -> ``("", ".gz")``."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else ""
    return (suffixes[-1] if suffixes else ""), compression


def open_decompressed(path: str | Path, file: BinaryIO) -> BinaryIO:
    """The bytes of ``file`` (the opened file ``path``), decompressed as ``path``'s suffix says;
    ``file`` itself when ``path`` is not compressed."""
    compression = file_type(path)[1]
    if compression == ".gz":
        return gzip.GzipFile(fileobj=file, mode="rb")
    if compression == ".bz2":
        return bz2.BZ2File(file)
    if compression == ".xz":
        return lzma.LZMAFile(file)
    if compression == ".zst":
        pyarrow = import_optional("pyarrow", path, "zstd-compressed files")
        return io.BufferedReader(pyarrow.CompressedInputStream(file, "zstd"))
    return file


def _check_file(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    """Raise :class:`DataError` unless ``path`` is an existing file of a known type (maybe compressed)."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist; pass the path of {what}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass the path of {what}")
    kind, compression = file_type(path)
    if kind not in suffixes:
        kinds = " or ".join(suffixes)
        raise DataError(
            f"{path}: unsupported file type {kind + compression or '(none)'!r}; use a {kinds} file"
        )


def _lines(path: Path, file: BinaryIO | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file (a leading BOM dropped, "\\r\\n" read as "\\n"),
    decompressed as its suffix says, read one line at a time from ``file`` (default: ``path`` opened)."""
    compression = COMPRESSED_SUFFIXES.get(file_type(path)[1])
    number = 0
    try:
        with ExitStack() as stack:
            if file is None:
                file = stack.enter_context(path.open("rb"))
            stream = open_decompressed(path, file)
            if stream is not file:
                stack.callback(stream.close)
            for number, raw in enumerate(stream, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}, line {number}: not valid UTF-8 text; save the file as UTF-8") from None
                yield number, line.replace("\r\n", "\n")  # Windows line ends read as "\n"
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        if compression and not (isinstance(error, OSError) and error.errno is not None):
            # a decompressor's complaint (they raise OSError without errno, EOFError or their own)
            where = f" after line {number}" if number else ""  # where the decompressor's read-ahead was, roughly
            raise DataError(f"{path}: corrupt {compression} data{where} ({first_line(error)}); "
                            "re-download or recompress the file") from None
        raise DataError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or first_line(error)})") from None


def _jsonl_records(path: Path, file: BinaryIO | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON Lines file, streamed."""
    for number, line in _lines(path, file):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({error.msg}); write one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}; "
                "write one object per line"
            )
        yield number, record


def _string_field(path: Path, number: int, record: dict[str, Any], field: str) -> str:
    """``record[field]``, which must exist and be a string."""
    if field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{path}, line {number}: no {field!r} field (keys: {keys}); add a string {field!r}"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(
            f"{path}, line {number}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def iter_documents(path: str | Path, field: str = "text", file: BinaryIO | None = None) -> Iterator[str]:
    """The documents of a ``.txt`` or ``.jsonl`` file, read one at a time (memory independent
    of the file's size); a compressed one (``a.jsonl.gz``) is decompressed as it is read.

    ``.txt``: documents are separated by one or more blank lines; each
    paragraph (inner newlines kept, outer whitespace stripped) is one document.
    ``.jsonl``: one JSON object per line whose string field ``field`` is a
    document; blank lines are skipped. ``file``: ``path`` already opened in
    binary mode to read from (e.g. one whose position a progress bar follows).
    Raises :class:`DataError` for a missing file, a directory or another file
    type at once, and for a bad line (or corrupt compressed data) when it is reached.
    """
    path = Path(path)
    _check_file(path, TEXT_SUFFIXES, "a .txt or .jsonl file of text")
    return _documents(path, field, file)


def _documents(path: Path, field: str, file: BinaryIO | None) -> Iterator[str]:
    """The documents of :func:`iter_documents`, streamed."""
    if file_type(path)[0] == ".jsonl":
        for number, record in _jsonl_records(path, file):
            yield _string_field(path, number, record, field)
        return
    paragraph: list[str] = []
    for _, line in _lines(path, file):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).strip()
            paragraph = []
    if paragraph:
        yield "".join(paragraph).strip()


def read_documents(path: str | Path, field: str = "text") -> list[str]:
    """Every document of a ``.txt`` or ``.jsonl`` file (:func:`iter_documents`); also raises
    :class:`DataError` for a file with no documents."""
    documents = [doc for doc in iter_documents(path, field) if doc]
    if not documents:
        raise DataError(f"{path}: contains no documents; add text to the file")
    return documents


def read_qa(path: str | Path) -> list[dict[str, Any]]:
    """Question/answer records from a ``.jsonl`` file with string ``question`` and ``answer`` fields.

    Other fields (e.g. ``person``, ``attribute``) are kept. Raises
    :class:`DataError` in the same cases as :func:`read_documents`.
    """
    path = Path(path)
    _check_file(path, (".jsonl",), 'a .jsonl file of {"question": ..., "answer": ...} lines')
    records = []
    for number, record in _jsonl_records(path):
        _string_field(path, number, record, "question")
        _string_field(path, number, record, "answer")
        records.append(record)
    if not records:
        raise DataError(f"{path}: contains no question/answer pairs; add one JSON object per line")
    return records
