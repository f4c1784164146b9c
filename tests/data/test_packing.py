"""Packing documents into rows and the resumable, epoch-permuted batch iterator."""

import pytest
import torch

from memlayers.data import BatchIterator, DataError, pack_documents
from memlayers.data.packing import iter_packed_rows

BOS, EOS = 1000, 1001


def docs_of(lengths):
    """Documents of distinct token values: doc i holds i*100, i*100 + 1, ... (no value repeats)."""
    return [list(range(i * 100, i * 100 + n)) for i, n in enumerate(lengths)]


def test_shapes_and_every_token_is_a_target_once():
    docs = docs_of([5, 17, 1, 30, 9])
    stream = [t for d in docs for t in [BOS, *d, EOS]]
    seq_len = 8
    rows = pack_documents(docs, seq_len, BOS, EOS)
    n_rows = (len(stream) - 1) // seq_len
    assert rows.shape == (n_rows, seq_len + 1) and rows.dtype == torch.long
    inputs, targets = rows[:, :-1], rows[:, 1:]
    assert targets.flatten().tolist() == stream[1 : n_rows * seq_len + 1]
    assert inputs.flatten().tolist() == stream[: n_rows * seq_len]
    # each row starts where the previous one's targets end
    assert torch.equal(rows[1:, 0], rows[:-1, -1])
    document_tokens = [t for t in targets.flatten().tolist() if t < BOS]
    assert len(document_tokens) == len(set(document_tokens))


def test_bos_eos_placement():
    rows = pack_documents([[5, 6], [7]], seq_len=6, bos_id=BOS, eos_id=EOS)
    assert rows.tolist() == [[BOS, 5, 6, EOS, BOS, 7, EOS]]
    assert pack_documents([[5, 6], [7]], seq_len=3, bos_id=None, eos_id=EOS).tolist() == [
        [5, 6, EOS, 7]
    ]
    assert pack_documents([[5, 6], [7], [8]], seq_len=2, bos_id=BOS, eos_id=None).tolist() == [
        [BOS, 5, 6],
        [6, BOS, 7],
        [7, BOS, 8],
    ]
    assert pack_documents([[5, 6, 7, 8]], seq_len=3, bos_id=None, eos_id=None).tolist() == [
        [5, 6, 7, 8]
    ]


def test_too_short_is_an_error():
    with pytest.raises(DataError, match=r"hold 5 tokens .* need at least 9"):
        pack_documents([[1, 2], [3]], seq_len=8, bos_id=None, eos_id=BOS)
    with pytest.raises(DataError, match="hold 0 tokens"):
        pack_documents([], seq_len=4, bos_id=None, eos_id=None)
    assert pack_documents([[1, 2], [3]], seq_len=4, bos_id=None, eos_id=BOS).shape == (1, 5)


def make_rows(n=10, seq_len=4):
    """Rows whose first token is the row index, so batches can be traced back to rows."""
    return torch.arange(n)[:, None] * 100 + torch.arange(seq_len + 1)  # (n, L + 1)


def row_ids(inputs):
    return (inputs[:, 0] // 100).tolist()


def test_batches_shift_and_cover_an_epoch_without_repeats():
    rows = make_rows(n=10)
    iterator = BatchIterator(rows, batch_size=3, seed=0)
    seen = []
    for _ in range(3):  # 10 rows / 3 = 3 full batches per epoch, 1 row dropped
        assert iterator.epoch == 0
        inputs, targets = next(iterator)
        assert inputs.shape == targets.shape == (3, 4)
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        seen += row_ids(inputs)
    assert iterator.epoch == 1
    assert len(seen) == len(set(seen)) == 9
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:9].tolist()
    assert seen == expected


def test_epoch_permutations_differ_and_seed_matters():
    rows = make_rows(n=12)

    def epochs(seed, n_epochs=3):
        iterator = BatchIterator(rows, batch_size=4, seed=seed)
        return [sum((row_ids(next(iterator)[0]) for _ in range(3)), []) for _ in range(n_epochs)]

    first = epochs(seed=5)
    assert first == epochs(seed=5)
    assert all(sorted(e) == list(range(12)) for e in first)
    assert len({tuple(e) for e in first}) == 3
    assert first != epochs(seed=6)


def test_resume_from_state_dict():
    rows = make_rows(n=10)
    iterator = BatchIterator(rows, batch_size=3, seed=7)
    for _ in range(7):
        next(iterator)
    state = iterator.state_dict()
    assert state == {"epoch": 2, "position": 3}
    rest = [next(iterator) for _ in range(5)]
    resumed = BatchIterator(rows, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    for (inputs, targets), (again_inputs, again_targets) in zip(
        rest, [next(resumed) for _ in range(5)], strict=True
    ):
        assert torch.equal(inputs, again_inputs) and torch.equal(targets, again_targets)
    fresh = BatchIterator(rows, batch_size=3, seed=7)
    assert not torch.equal(next(fresh)[0], rest[0][0])  # the state, not luck, made them equal


def test_iterator_errors():
    with pytest.raises(DataError, match="only 3 sequences for batch_size=4"):
        BatchIterator(make_rows(n=3), batch_size=4, seed=0)
    iterator = BatchIterator(make_rows(n=5), batch_size=2, seed=0)
    for bad in ({"epoch": 0}, {"epoch": -1, "position": 0}, {"epoch": 0, "position": 6}):
        with pytest.raises(ValueError, match="state"):
            iterator.load_state_dict(bad)


def test_document_batches_repack_every_epoch_and_resume():
    from memlayers.data import DocumentBatchIterator

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 50, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (40,), generator=g)]
    iterator = DocumentBatchIterator(docs, seq_len=8, bos_id=0, eos_id=1, batch_size=4, seed=5)
    first = iterator.epoch_rows().clone()
    n_batches = first.shape[0] // 4
    for _ in range(n_batches):
        next(iterator)
    assert iterator.epoch == 1
    second = iterator.epoch_rows()
    assert second.shape == first.shape and not torch.equal(second, first)  # a fresh document order
    for _ in range(3):
        next(iterator)
    state = iterator.state_dict()
    after = [next(iterator) for _ in range(n_batches + 2)]  # crosses into the next epoch
    resumed = DocumentBatchIterator(docs, seq_len=8, bos_id=0, eos_id=1, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(after, [next(resumed) for _ in range(n_batches + 2)], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("seq_len", [1, 3, 7])
def test_streamed_rows_equal_the_packed_ones(seq_len):
    generator = torch.Generator().manual_seed(seq_len)
    docs = [torch.randint(3, 50, (int(n),), generator=generator).tolist()
            for n in torch.randint(0, 12, (9,), generator=generator)]
    packed = pack_documents(docs, seq_len, bos_id=1, eos_id=2)
    streamed = torch.stack(list(iter_packed_rows(iter(docs), seq_len, bos_id=1, eos_id=2)))
    assert torch.equal(streamed, packed)
