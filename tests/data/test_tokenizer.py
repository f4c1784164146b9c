"""Tokenizer: byte-level BPE training, exact round trips, save/load, QA prompt/answer split."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from memlayers.data import DataError, FactWorldConfig, Tokenizer, generate_world, qa_prompt, qa_text

UNICODE = "naïve café — Zürich, 東京 and 🚀!\n\tTabs,  double  spaces, trailing space "


@pytest.fixture(scope="module")
def world():
    return generate_world(FactWorldConfig(n_people=50, seed=1, heldout_people=5))


@pytest.fixture(scope="module")
def tokenizer(world):
    return Tokenizer.train(world.training_documents(), vocab_size=300)


def test_trained_vocabulary(tokenizer):
    assert 259 < tokenizer.vocab_size <= 300
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    assert len(ids) == 3 and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False) == "<|bos|>"
    assert tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False) == "<|eos|>"
    assert tokenizer.decode([tokenizer.pad_id], skip_special_tokens=False) == "<|pad|>"


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["some text"], vocab_size=100)


def test_round_trip(tokenizer, world):
    texts = (
        world.training_documents() + world.heldout_documents() + [UNICODE, " leading", "", "a\n\nb"]
    )
    for text in texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    # training merged frequent pieces: the corpus is shorter in tokens than in bytes
    corpus = world.training_documents()
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(corpus))
    assert n_tokens < 0.8 * sum(len(doc.encode()) for doc in corpus)


def test_bos_eos_and_literal_special_tokens(tokenizer):
    ids = tokenizer.encode("hello", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode("hello")
    assert tokenizer.decode(ids) == "hello"
    # "<|eos|>" typed in a document is text, not the special id
    text = "the end <|eos|> is near"
    literal = tokenizer.encode(text)
    assert tokenizer.eos_id not in literal
    assert tokenizer.decode(literal) == text


def test_encode_batch_matches_encode(tokenizer, world):
    texts = world.training_documents()[:20] + [UNICODE]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    framed = tokenizer.encode_batch(texts[:2], bos=True, eos=True)
    assert framed == [tokenizer.encode(t, bos=True, eos=True) for t in texts[:2]]


def test_prompt_plus_answer_equals_qa_text(tokenizer, world):
    for qa in world.qa_pairs():
        question, answer = qa["question"], qa["answer"]
        split = tokenizer.encode(qa_prompt(question)) + tokenizer.encode(" " + answer)
        assert split == tokenizer.encode(qa_text(question, answer)), (question, answer)


def test_save_and_load(tokenizer, world, tmp_path):
    file = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    assert file == tmp_path / "tok" / "tokenizer.json"
    assert [p.name for p in file.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    folder_file = tokenizer.save(tmp_path / "folder")
    assert folder_file == tmp_path / "folder" / "tokenizer.json"
    for loaded in (Tokenizer.load(file), Tokenizer.load(tmp_path / "folder")):
        assert loaded.vocab_size == tokenizer.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_id,
        )
        for text in world.training_documents()[:20] + [UNICODE, "x <|bos|> y"]:
            assert loaded.encode(text, bos=True) == tokenizer.encode(text, bos=True)
            assert loaded.decode(loaded.encode(text)) == text


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="does not exist") as info:
        Tokenizer.load(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(DataError, match="does not exist") as info:
        Tokenizer.load(tmp_path)  # a folder without tokenizer.json
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model":\n  {"type": "BPE",,}\n}')
    with pytest.raises(DataError, match="not valid JSON") as info:
        Tokenizer.load(broken)
    assert str(broken) in str(info.value) and "line 2" in str(info.value)
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(DataError, match="not a Hugging Face tokenizer") as info:
        Tokenizer.load(foreign)
    assert str(foreign) in str(info.value)
    for error in ("does not exist", "not valid JSON", "not a Hugging Face"):
        assert "\n" not in error


def foreign_tokenizer(tmp_path, special: list[str]):
    """A tokenizer.json from another library: word-level vocab with the given special tokens."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    for token in special:
        vocab[token] = len(vocab)
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    path = tmp_path / "foreign.json"
    backend.save(str(path))
    return Tokenizer.load(path), vocab


def test_foreign_tokenizer_falls_back_to_its_end_token(tmp_path):
    tokenizer, vocab = foreign_tokenizer(tmp_path, ["<|endoftext|>"])
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.pad_id == vocab["<|endoftext|>"]
    assert tokenizer.encode("hello world", eos=True) == [1, 2, vocab["<|endoftext|>"]]


def test_foreign_tokenizer_with_bos_and_eos(tmp_path):
    tokenizer, vocab = foreign_tokenizer(tmp_path, ["<s>", "</s>"])
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        vocab["<s>"],
        vocab["</s>"],
        vocab["</s>"],
    )


def test_foreign_tokenizer_without_special_tokens(tmp_path):
    tokenizer, _ = foreign_tokenizer(tmp_path, [])
    assert tokenizer.bos_id is None and tokenizer.eos_id is None and tokenizer.pad_id is None
    assert tokenizer.encode("hello world") == [1, 2]
    with pytest.raises(ValueError, match="no bos/eos"):
        tokenizer.encode("hello", bos=True)
