"""Data: synthetic fact worlds, a byte-level BPE tokenizer, reading text/JSONL files, packing."""

from memlayers.data.facts import (
    ATTRIBUTES,
    FactWorld,
    FactWorldConfig,
    Person,
    generate_world,
    write_world,
)
from memlayers.data.packing import BatchIterator, DocumentBatchIterator, pack_documents
from memlayers.data.text import (
    QA_SEPARATOR,
    DataError,
    iter_documents,
    qa_prompt,
    qa_text,
    read_documents,
    read_qa,
    write_jsonl,
    write_text_atomic,
)
from memlayers.data.tokenizer import Tokenizer

__all__ = [
    "ATTRIBUTES",
    "QA_SEPARATOR",
    "BatchIterator",
    "DocumentBatchIterator",
    "DataError",
    "FactWorld",
    "FactWorldConfig",
    "Person",
    "Tokenizer",
    "generate_world",
    "iter_documents",
    "pack_documents",
    "qa_prompt",
    "qa_text",
    "read_documents",
    "read_qa",
    "write_jsonl",
    "write_text_atomic",
    "write_world",
]
