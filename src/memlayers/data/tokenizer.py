"""Tokenizer: byte-level BPE over Hugging Face ``tokenizers``, so any text round-trips exactly.

Train one on a corpus, or load any Hugging Face ``tokenizer.json``::

    tokenizer = Tokenizer.train(documents, vocab_size=8192)
    tokenizer.save("runs/facts/tokenizer.json")
    ids = Tokenizer.load("runs/facts").encode("Ada Lovelace was born in London.", bos=True)

Pre-tokenization splits before every space (GPT-2 style, no prefix space), so
no merge crosses the space that starts an answer and
``encode(qa_prompt(q)) + encode(" " + a) == encode(qa_text(q, a))``.
Special tokens that appear literally in text are encoded as ordinary text:
only ``bos=True`` / ``eos=True`` insert the special ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from memlayers.config import first_line
from memlayers.data.text import DataError, write_text_atomic

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
"""Special tokens of a trained tokenizer; they get ids 0, 1, 2."""

# Fallbacks for a foreign tokenizer.json without our special tokens (first one present wins).
_EOS_NAMES = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<bos>")
_PAD_NAMES = (PAD, "<pad>", "[PAD]")

FILE_NAME = "tokenizer.json"


class Tokenizer:
    """Text <-> token ids, with ``bos_id``, ``eos_id`` and ``pad_id``.

    A tokenizer trained here has ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``. One
    loaded from a foreign ``tokenizer.json`` that lacks them falls back to
    tokens it has: eos = the first of ``</s>``, ``<|endoftext|>``,
    ``<|end_of_text|>``, ``<eos>``; bos = ``<s>``, ``<|begin_of_text|>`` or
    ``<bos>``, else eos; pad = ``<pad>`` or ``[PAD]``, else eos. Ids with no
    such token are None (and ``encode(bos=True)`` then raises).
    """

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        self.backend.encode_special_tokens = True  # "<|eos|>" in user text is plain text
        eos = self._first_id(_EOS_NAMES)
        bos = self._first_id(_BOS_NAMES)
        pad = self._first_id(_PAD_NAMES)
        self._eos = eos
        self._bos = eos if bos is None else bos
        self._pad = eos if pad is None else pad

    def _first_id(self, names: tuple[str, ...]) -> int | None:
        """The id of the first of ``names`` in the vocabulary, or None."""
        for name in names:
            token_id = self.backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``texts``.

        The vocabulary holds the 3 special tokens, all 256 byte symbols and the
        learned merges (fewer than ``vocab_size`` if the corpus is small).
        """
        minimum = len(SPECIAL_TOKENS) + 256
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size must be >= {minimum} (3 special tokens + 256 bytes), got {vocab_size}"
            )
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or the one inside directory ``path``.

        Raises :class:`DataError` (one line naming the file) if it is missing,
        not JSON, or not a Hugging Face tokenizer.
        """
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        hint = "pass a tokenizer.json (or its folder) saved by Tokenizer.save or Hugging Face"
        if not file.is_file():
            raise DataError(f"{file}: tokenizer file does not exist; {hint}")
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            where = f", line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
            reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
            raise DataError(f"{file}{where}: not valid JSON ({reason}); {hint}") from None
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as error:  # the library raises a bare Exception
            raise DataError(f"{file}: not a Hugging Face tokenizer ({first_line(error)}); {hint}") from None
        return cls(backend)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically to ``path`` (a ``.json`` file, or a folder for one).

        Returns the file written.
        """
        path = Path(path)
        file = path if path.suffix == ".json" else path / FILE_NAME
        return write_text_atomic(file, self.backend.to_str(pretty=True))

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """``ids`` with the bos / eos id added where asked."""
        if (bos and self._bos is None) or (eos and self._eos is None):
            raise ValueError(
                "this tokenizer has no bos/eos token; encode with bos=False, eos=False"
            )
        return ([self._bos] if bos else []) + ids + ([self._eos] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally framed by ``bos_id`` / ``eos_id``."""
        return self._wrap(self.backend.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: list[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Token ids of each text (the library's parallel batch encoding)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; bos/eos/pad ids are dropped unless ``skip_special_tokens`` is False."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included); every id is < vocab_size."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id that starts a document (see the class docstring for foreign tokenizers)."""
        return self._bos

    @property
    def eos_id(self) -> int | None:
        """Id that ends a document."""
        return self._eos

    @property
    def pad_id(self) -> int | None:
        """Id used to pad batches (never a target)."""
        return self._pad

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
