"""Packing tokenized documents into fixed-length rows, and a resumable batch iterator.

Documents are framed as ``[bos] + ids + [eos]`` and concatenated into one
stream, which is cut into non-overlapping windows of ``seq_len`` tokens, each
extended by the next token: a row is ``(seq_len + 1,)``, its inputs are
``row[:-1]`` and its targets ``row[1:]``, and every stream token after the
first is a target exactly once (up to the dropped final partial window).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

import torch

from memlayers.data.text import DataError


def pack_documents(
    docs: list[list[int]], seq_len: int, bos_id: int | None, eos_id: int | None
) -> torch.Tensor:
    """Pack token-id documents into a long tensor ``(n_sequences, seq_len + 1)``.

    ``bos_id`` / ``eos_id`` frame each document when not None. Raises
    :class:`DataError` if the stream is shorter than ``seq_len + 1`` tokens.
    """
    _check_seq_len(seq_len)
    stream = array("q")
    for framed in _framed(docs, bos_id, eos_id):
        stream += framed
    n_tokens = len(stream)
    if n_tokens < seq_len + 1:
        raise DataError(
            f"the documents hold {n_tokens} tokens (bos/eos included) but sequences of seq_len={seq_len} "
            f"need at least {seq_len + 1}; add text or lower seq_len"
        )
    n_rows = (n_tokens - 1) // seq_len
    flat = torch.frombuffer(stream, dtype=torch.long)[: n_rows * seq_len + 1]  # (n_rows * L + 1,)
    rows = flat.unfold(0, seq_len + 1, seq_len)  # (n_rows, L + 1), overlapping views
    return rows.clone()  # a copy that owns its memory


class BatchIterator:
    """Endless ``(inputs, targets)`` batches, each ``(batch_size, L)``, from rows ``(n, L + 1)``.

    Every epoch visits the rows in a fresh permutation drawn from
    ``torch.Generator().manual_seed(seed + epoch)``; batches never straddle
    epochs (the last partial batch of an epoch is dropped). ``state_dict()``
    is ``{"epoch", "position"}`` (position = rows of this epoch's permutation
    already yielded); a new iterator over the same rows and seed given that
    state by ``load_state_dict`` continues with exactly the same batches.
    """

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int):
        if rows.dim() != 2 or rows.shape[1] < 2:
            raise ValueError(
                f"rows must be (n, seq_len + 1) with seq_len >= 1, got shape {tuple(rows.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rows.shape[0] < batch_size:
            raise DataError(
                f"only {rows.shape[0]} sequences for batch_size={batch_size}; "
                "add text, lower seq_len or lower the batch size"
            )
        self.rows = rows  # (n, L + 1)
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = 0
        self._position = 0
        self._order: torch.Tensor | None = None  # permutation of the current epoch, (n,)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (= number of completed epochs)."""
        return self._epoch

    def epoch_rows(self) -> torch.Tensor:
        """The rows of the current epoch, ``(n, L + 1)``."""
        return self.rows

    def _permutation(self) -> torch.Tensor:
        """The row order of the current epoch, ``(n,)``."""
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self._epoch)
            self._order = torch.randperm(self.epoch_rows().shape[0], generator=generator)  # (n,)
        return self._order

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._permutation()[self._position : self._position + self.batch_size]  # (B,)
        batch = self.epoch_rows()[index]  # (B, L + 1)
        self._position += self.batch_size
        if self._position + self.batch_size > self.epoch_rows().shape[0]:  # no full batch left: next epoch
            self._epoch, self._position, self._order = self._epoch + 1, 0, None
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, L), (B, L)

    def state_dict(self) -> dict[str, int]:
        """Where the iterator stands: ``{"epoch": int, "position": int}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a ``state_dict()`` of an iterator over the same rows and seed."""
        epoch, position = state.get("epoch"), state.get("position")
        n = self.rows.shape[0]
        if not (
            isinstance(epoch, int)
            and epoch >= 0
            and isinstance(position, int)
            and 0 <= position <= n
        ):
            raise ValueError(
                f"batch iterator state must be {{'epoch': int >= 0, 'position': 0..{n}}}, got {state!r}"
            )
        self._epoch, self._position, self._order = epoch, position, None
        if self._position + self.batch_size > n:  # saved with another batch size at an epoch's end
            self._epoch, self._position = self._epoch + 1, 0


class DocumentBatchIterator(BatchIterator):
    """Like :class:`BatchIterator`, but the documents are shuffled and re-packed every epoch.

    With fixed packing a document always sits after the same neighbours, and a
    small model trained for many epochs learns those row-specific contexts
    instead of the documents themselves (a fact is then predicted from the text
    before it in the row, and not from a fresh prompt). Each epoch here packs
    the documents in the order of ``torch.randperm`` seeded by ``seed`` and the
    epoch, so batches stay a pure function of ``(seed, epoch, position)`` and
    resume exactly.
    """

    def __init__(
        self,
        docs: list[list[int]],
        seq_len: int,
        bos_id: int | None,
        eos_id: int | None,
        batch_size: int,
        seed: int,
    ):
        self.docs = docs
        self.seq_len, self.bos_id, self.eos_id = seq_len, bos_id, eos_id
        self._rows_epoch = -1
        super().__init__(pack_documents(docs, seq_len, bos_id, eos_id), batch_size, seed)

    def epoch_rows(self) -> torch.Tensor:
        """The current epoch's rows, packed from a fresh document order."""
        if self._rows_epoch != self._epoch:
            generator = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + self._epoch)
            order = torch.randperm(len(self.docs), generator=generator).tolist()
            self.rows = pack_documents([self.docs[i] for i in order], self.seq_len, self.bos_id, self.eos_id)
            self._rows_epoch = self._epoch
        return self.rows


def iter_packed_rows(
    docs: Iterable[list[int]], seq_len: int, bos_id: int | None, eos_id: int | None
) -> Iterator[torch.Tensor]:
    """The rows of :func:`pack_documents`, each ``(seq_len + 1,)``, made as the documents arrive:
    memory is one row plus one document, whatever the data's size (the final partial window
    is dropped, as there)."""
    _check_seq_len(seq_len)
    stream, start = array("q"), 0  # rows are cut from stream[start:]
    for framed in _framed(docs, bos_id, eos_id):
        stream += framed
        while len(stream) - start >= seq_len + 1:
            yield torch.tensor(stream[start : start + seq_len + 1], dtype=torch.long)  # (L + 1,)
            start += seq_len  # the row's last token starts the next one
        if start > len(stream) // 2:  # drop what was cut, amortised O(1) per token
            del stream[:start]
            start = 0


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")


def _framed(docs: Iterable[list[int]], bos_id: int | None, eos_id: int | None) -> Iterator[array]:
    """Each document's ids as an int64 array, framed by ``bos_id`` / ``eos_id`` when not None."""
    head = array("q", [] if bos_id is None else [bos_id])
    tail = array("q", [] if eos_id is None else [eos_id])
    for ids in docs:
        yield head + array("q", ids) + tail
