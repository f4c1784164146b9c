"""A corpus as sources, each a stream of documents: what ``memlayers tokenize`` reads.

A source is one of:

- a ``.txt`` or ``.jsonl`` file, plain or compressed (``.gz``, ``.bz2``, ``.xz``,
  ``.zst``), read exactly as :func:`memlayers.data.text.iter_documents` reads it;
- a ``.parquet`` file, whose string column ``field`` is streamed in record batches;
- a local Hugging Face ``datasets`` directory written by ``save_to_disk`` (of a
  ``DatasetDict``, its ``train`` split), streamed in batches.

An input folder that is not a datasets directory stands for every file inside
it (at any depth) with a supported suffix, sorted by path. pyarrow and datasets
are imported only when a file needs them. Every problem is a one-line
:class:`~memlayers.data.text.DataError` naming the file (and the line or row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from memlayers.config import first_line
from memlayers.data.text import (
    COMPRESSED_SUFFIXES,
    TEXT_SUFFIXES,
    DataError,
    file_sha256,
    file_type,
    import_optional,
    iter_documents,
)

DATASETS_MARKERS = ("state.json", "dataset_dict.json")
"""Files ``save_to_disk`` writes at the top of a ``Dataset`` / ``DatasetDict`` directory."""

BATCH_ROWS = 1000
"""Rows read at a time from a parquet file or a dataset."""

SUPPORTED = (".txt or .jsonl (plain or compressed: " + ", ".join(COMPRESSED_SUFFIXES)
             + "), .parquet, or a folder (a datasets directory, or one holding such files)")


def is_datasets_dir(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / marker).is_file() for marker in DATASETS_MARKERS)


def is_supported_file(path: Path) -> bool:
    """Whether ``path``'s name is a type :class:`Source` reads (``.parquet`` only uncompressed)."""
    kind, compression = file_type(path)
    return kind in TEXT_SUFFIXES or (kind == ".parquet" and not compression)


class Source:
    """One input of a corpus: a text/JSONL file (maybe compressed), a parquet file or a datasets directory.

    ``path`` is resolved; ``kind`` is ``"text"``, ``"parquet"`` or ``"datasets"``.
    While :meth:`documents` runs, :meth:`bytes_read` tells about how far into
    the source's bytes it is (for a progress bar).
    """

    def __init__(self, path: Path, kind: str):
        self.path = path
        self.kind = kind
        self._read = 0  # bytes of the source read so far; updated as documents are read

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, {self.kind!r})"

    def files(self) -> list[Path]:
        """The files the source is made of, sorted (more than one for a datasets directory)."""
        if self.kind != "datasets":
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())

    def size(self) -> int:
        """Bytes on disk, all files together."""
        return sum(file.stat().st_size for file in self.files())

    def sha256(self) -> str:
        """sha256 of the file's bytes; of a datasets directory, of each file's path and sha256."""
        if self.kind != "datasets":
            return file_sha256(self.path)
        digest = hashlib.sha256()
        for file in self.files():
            digest.update(f"{file.relative_to(self.path).as_posix()} {file_sha256(file)}\n".encode())
        return digest.hexdigest()

    def bytes_read(self) -> int:
        """About how many of the source's bytes :meth:`documents` has read so far."""
        return self._read

    def documents(self, field: str) -> Iterator[str]:
        """The documents, read one at a time; ``field`` is the JSON field or column holding the text.

        Raises :class:`DataError` for a bad line, row, column or corrupt data when it is reached.
        """
        reader = {"text": self._text, "parquet": self._parquet, "datasets": self._dataset}[self.kind]
        self._read = 0
        yield from reader(field)
        self._read = self.size()

    def _text(self, field: str) -> Iterator[str]:
        """A ``.txt`` / ``.jsonl`` file's documents; progress is the raw (compressed) file's position."""
        with self.path.open("rb") as raw:
            for document in iter_documents(self.path, field, file=raw):
                if not raw.closed:  # a zstd reader closes it at the end
                    self._read = raw.tell()
                yield document

    def _parquet(self, field: str) -> Iterator[str]:
        """The strings of a parquet file's column ``field``, streamed by record batch."""
        parquet = import_optional("pyarrow.parquet", self.path, "parquet files")
        import pyarrow

        try:
            file = parquet.ParquetFile(self.path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{self.path}: not a readable parquet file ({first_line(error)}); "
                            "re-download or rewrite it") from None
        column = file.schema_arrow.field(field) if field in file.schema_arrow.names else None
        _check_column(self.path, field, file.schema_arrow.names,
                      column is not None and (pyarrow.types.is_string(column.type)
                                              or pyarrow.types.is_large_string(column.type)),
                      column.type if column is not None else None)
        size, rows = self.size(), max(1, file.metadata.num_rows)
        row = 0
        try:
            for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    yield _not_null(self.path, row, field, text)
                self._read = size * row // rows
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{self.path}, row {row + 1}: corrupt parquet data ({first_line(error)}); "
                            "re-download or rewrite the file") from None

    def _dataset(self, field: str) -> Iterator[str]:
        """The strings of column ``field`` of a saved dataset (a DatasetDict's ``train`` split)."""
        datasets = import_optional("datasets", self.path, "a datasets directory")
        try:
            data = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError) as error:
            raise DataError(f"{self.path}: not a readable datasets directory ({first_line(error)}); "
                            "write it again with save_to_disk") from None
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                splits = ", ".join(data) or "none"
                raise DataError(f"{self.path}: a DatasetDict without a 'train' split (splits: {splits}); "
                                f"pass the folder of the split to read, e.g. {self.path / next(iter(data), 'SPLIT')}")
            data = data["train"]
        feature = data.features.get(field)
        _check_column(self.path, field, list(data.features),
                      isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"), feature)
        size, rows = self.size(), max(1, len(data))
        row = 0
        for batch in data.select_columns([field]).iter(batch_size=BATCH_ROWS):
            for text in batch[field]:
                row += 1
                yield _not_null(self.path, row, field, text)
            self._read = size * row // rows


def _check_column(path: Path, field: str, names: list[str], is_string: bool, kind: object) -> None:
    """Raise :class:`DataError` unless the table at ``path`` has a string column ``field``."""
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names) or 'none'}); "
                        "pass the column of text with --text-field")
    if not is_string:
        raise DataError(f"{path}: column {field!r} holds {kind}, not strings; "
                        "pass the column of text with --text-field")


def _not_null(path: Path, row: int, field: str, text: str | None) -> str:
    """``text``, which must not be null (a missing value in a string column)."""
    if text is None:
        raise DataError(f"{path}, row {row}: {field!r} is null; fill or drop the rows without text")
    return text


def find_sources(inputs: list[str | Path]) -> list[Source]:
    """The sources of the command line's inputs, in order; a folder (not a datasets directory)
    gives its supported files sorted by path.

    Raises :class:`DataError` for a missing input, a file of another type, or a folder with no
    supported file.
    """
    sources = []
    for given in inputs:
        path = Path(given)
        if not path.exists():
            raise DataError(f"{path}: does not exist; pass files or folders of text ({SUPPORTED})")
        if is_datasets_dir(path):
            sources.append(Source(path.resolve(), "datasets"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_supported_file(p))
            if not files:
                raise DataError(f"{path}: folder holds no file of a supported type; put {SUPPORTED} in it")
            sources.extend(_file_source(file) for file in files)
        elif not is_supported_file(path):
            kind, compression = file_type(path)
            raise DataError(f"{path}: unsupported file type {kind + compression or '(none)'!r}; use {SUPPORTED}")
        else:
            sources.append(_file_source(path))
    return sources


def _file_source(path: Path) -> Source:
    """The source of a supported file."""
    return Source(path.resolve(), "parquet" if file_type(path)[0] == ".parquet" else "text")
