"""Reading a user's text and QA files, and the one-line DataError for each kind of bad input."""

import json

import pytest

from memlayers.data import (
    DataError,
    iter_documents,
    qa_prompt,
    qa_text,
    read_documents,
    read_qa,
    write_jsonl,
)
from memlayers.data.text import write_text_atomic


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def assert_error(call, path, *parts, line=None):
    """``call`` raises a one-line DataError naming ``path`` (and ``line``) and containing ``parts``."""
    with pytest.raises(DataError) as info:
        call(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    if line is not None:
        assert f"line {line}:" in message
    for part in parts:
        assert part in message, message
    return message


def test_qa_formats():
    assert qa_prompt("  Who? ") == "Question: Who?\nAnswer:"
    assert qa_text("Who?", " Ada ") == "Question: Who?\nAnswer: Ada"
    assert qa_text("Who?", "Ada").startswith(qa_prompt("Who?"))


def test_txt_paragraphs_are_documents(tmp_path):
    path = write(
        tmp_path / "a.txt", "\n\nfirst line\nsecond line\n\n\n  \nthird\n \t\nfourth, last\n"
    )
    assert read_documents(path) == ["first line\nsecond line", "third", "fourth, last"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert read_documents(crlf) == ["one\ntwo", "three"]


def test_jsonl_documents(tmp_path):
    rows = [{"text": "héllo\nworld", "id": 1}, {"text": "second"}, {"text": "東京 🚀"}]
    path = write(
        tmp_path / "a.jsonl",
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \n" + json.dumps(rows[2]),
    )
    assert read_documents(path) == ["héllo\nworld", "second", "東京 🚀"]
    body = write(tmp_path / "b.jsonl", '{"body": "x"}\n{"body": "y"}\n')
    assert read_documents(body, field="body") == ["x", "y"]


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"text": "line\nbreak \u2028 sep"}, {"text": "ünïcode"}]
    path = write_jsonl(tmp_path / "sub" / "out.jsonl", rows)
    assert read_documents(path) == [r["text"] for r in rows]
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3  # two lines and the final newline
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]


def test_file_level_errors(tmp_path):
    assert_error(read_documents, tmp_path / "missing.txt", "does not exist")
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    assert_error(read_documents, folder, "is a directory")
    assert_error(
        read_documents, write(tmp_path / "a.csv", "x\n"), "unsupported file type", ".txt or .jsonl"
    )
    assert_error(read_documents, write(tmp_path / "empty.txt", ""), "no documents")
    assert_error(read_documents, write(tmp_path / "blank.txt", "\n  \n\t\n"), "no documents")
    assert_error(read_documents, write(tmp_path / "empty.jsonl", "\n\n"), "no documents")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nstill ok\ncaf\xe9\n".encode("latin-1"))
    assert_error(read_documents, latin, "not valid UTF-8", line=3)


def test_jsonl_line_errors(tmp_path):
    good = '{"text": "fine"}\n'
    assert_error(
        read_documents,
        write(tmp_path / "a.jsonl", good + "\n" + '{"text": "x",}\n'),
        "not valid JSON",
        line=3,
    )
    assert_error(
        read_documents,
        write(tmp_path / "b.jsonl", good + '["text"]\n'),
        "expected a JSON object, got list",
        line=2,
    )
    message = assert_error(
        read_documents,
        write(tmp_path / "c.jsonl", good + '{"body": "x", "id": 3}\n'),
        "no 'text' field",
        line=2,
    )
    assert "body, id" in message
    assert_error(
        read_documents,
        write(tmp_path / "d.jsonl", good + good + '{"text": 5}\n'),
        "must be a string, got int",
        line=3,
    )
    assert_error(
        read_documents,
        write(tmp_path / "e.jsonl", good + '{"text": null}\n'),
        "must be a string",
        line=2,
    )


def test_read_qa(tmp_path):
    rows = [
        {"question": "Who?", "answer": "Ada", "person": "Ada Lovelace"},
        {"question": "When?", "answer": "1815"},
    ]
    path = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert read_qa(path) == rows


def test_read_qa_errors(tmp_path):
    assert_error(read_qa, tmp_path / "none.jsonl", "does not exist")
    assert_error(
        read_qa, write(tmp_path / "qa.txt", "Who? Ada\n"), "unsupported file type", ".jsonl"
    )
    assert_error(read_qa, write(tmp_path / "empty.jsonl", ""), "no question/answer pairs")
    ok = '{"question": "Q?", "answer": "A"}\n'
    assert_error(
        read_qa,
        write(tmp_path / "a.jsonl", ok + '{"question": "Q?"}\n'),
        "no 'answer' field",
        line=2,
    )
    assert_error(
        read_qa, write(tmp_path / "b.jsonl", '{"answer": "A"}\n'), "no 'question' field", line=1
    )
    assert_error(
        read_qa,
        write(tmp_path / "c.jsonl", ok + ok + '{"question": "Q?", "answer": 4}\n'),
        "'answer' must be a string",
        line=3,
    )
    assert_error(read_qa, write(tmp_path / "d.jsonl", ok + "Q? A\n"), "not valid JSON", line=2)


def test_documents_stream_one_at_a_time(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\nnot json\n', encoding="utf-8")
    documents = iter_documents(path)
    assert next(documents) == "first" and next(documents) == "second"  # read before the bad line is reached
    with pytest.raises(DataError, match=r"big.jsonl, line 3: not valid JSON"):
        next(documents)
    text = tmp_path / "notes.txt"
    text.write_bytes(b"one\r\nline two\r\n\r\n\r\nthree\r\n")
    assert list(iter_documents(text)) == ["one\nline two", "three"]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp's temp file is owner-only; the published file is readable as open(path, "w") makes it."""
    import os

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomic(tmp_path / "atomic.txt", "y")
    assert atomic.read_text() == "y"
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
