"""Slot statistics over a text file: streamed batches, diagnostics, tokens of the top slots, the plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from memlayers.continual.slot_report import (
    collect_from_file,
    diagnostics,
    plot_slot_stats,
    text_batches,
    tokens_reading,
    top_readers,
)
from memlayers.continual.slot_stats import collect_slot_stats, memory_layout
from memlayers.data.packing import pack_documents

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slot_stats import _batches, _model  # noqa: E402


def _encode(text: str) -> list[int]:
    """A toy tokenizer: one id per character, inside the tiny model's vocabulary of 37."""
    return [3 + ord(c) % 34 for c in text]


def _write_docs(path: Path, n: int) -> list[str]:
    docs = [f"document {i}: " + "abcdefghij"[i % 10] * (3 + i % 7) for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return docs


def test_streamed_file_batches_are_the_packed_rows(tmp_path):
    docs = _write_docs(tmp_path / "bg.jsonl", 23)
    batches = list(text_batches(tmp_path / "bg.jsonl", _encode, 1, 2, seq_len=6, batch_size=4))
    rows = pack_documents([_encode(d) for d in docs], 6, 1, 2)[:, :-1]  # (n, L) inputs
    assert [b.shape[0] for b in batches[:-1]] == [4] * (len(batches) - 1) and 1 <= batches[-1].shape[0] <= 4
    assert torch.equal(torch.cat(batches), rows)


def test_file_statistics_equal_those_of_the_same_batches(tmp_path):
    _write_docs(tmp_path / "bg.jsonl", 23)
    model = _model()
    from_file = collect_from_file(model, tmp_path / "bg.jsonl", _encode, 1, 2, seq_len=6, batch_size=4,
                                  max_batches=3, progress=False)
    batches = list(text_batches(tmp_path / "bg.jsonl", _encode, 1, 2, seq_len=6, batch_size=4))[:3]
    direct = collect_slot_stats(model, batches, progress=False)
    assert from_file.n_batches == 3 and from_file.n_tokens == 3 * 4 * 6
    assert all(torch.equal(from_file.reads[k], direct.reads[k]) for k in direct.reads)
    assert from_file.metadata["data"].endswith("bg.jsonl") and len(from_file.metadata["data_sha256"]) == 64
    assert model.training is False  # left in the mode it was in


def test_diagnostics_match_the_counts():
    stats = collect_slot_stats(_model(), _batches(6), progress=False)
    report = diagnostics(stats, top=3)
    for name, layer in report.items():
        total = stats.reads[name].sum(0)
        assert layer["reads"] == int(total.sum()) and layer["slots"] == total.numel()
        assert layer["dead_fraction"] == pytest.approx(int((total == 0).sum()) / total.numel())
        assert 0 < layer["kl_uniform"] < math.log(total.numel())
        assert len(layer["kl_uniform_per_head"]) == stats.reads[name].shape[0]
        reads = [s["reads"] for s in layer["top_slots"]]
        assert reads == sorted(reads, reverse=True) and reads[0] == int(total.max())
        assert all(int(total[s["slot"]]) == s["reads"] for s in layer["top_slots"])


def test_tokens_reading_a_slot_equal_a_hand_count():
    model, batches = _model(), _batches(3)
    stats = collect_slot_stats(model, batches, progress=False)
    name = next(iter(stats.reads))
    slot = int(stats.reads[name].sum(0).argmax())
    found = tokens_reading(model, batches, {name: [slot]}, top=100)[name][slot]
    layer = dict(model.named_modules())[name]
    expected: dict[int, int] = {}
    seen: list[torch.Tensor] = []
    handle = layer.search.register_forward_hook(lambda m, i, out: seen.append(out[1]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
            hits = (seen.pop() == slot).any(-1).any(-1)  # (B, L)
            for token in batch[hits].tolist():
                expected[token] = expected.get(token, 0) + 1
    handle.remove()
    assert dict(found) == expected and sum(expected.values()) > 0


def test_plot_has_a_panel_per_layer(tmp_path):
    stats = collect_slot_stats(_model(), _batches(4), progress=False)
    image = matplotlib.image.imread(plot_slot_stats(stats, tmp_path / "slots.png"))
    assert image.shape[1] > 1.8 * image.shape[0]  # two layers side by side
    assert image[..., :3].std() > 0.05


def test_top_readers_equal_a_hand_count():
    model = _model()
    generator = torch.Generator().manual_seed(4)
    documents = [torch.randint(0, 37, (int(n),), generator=generator).tolist() for n in (5, 9, 3, 12, 7)]
    stats = collect_slot_stats(model, [torch.tensor([d[:10]]) for d in documents], progress=False)
    (table,) = stats.batches
    rows = stats.batches[table].topk(3).indices
    found = top_readers(model, documents, {table: rows}, seq_len=10, top=2)[table]
    layer_searches = [layer.search for layer, _ in memory_layout(model).values()]
    seen: list[torch.Tensor] = []
    handles = [s.register_forward_hook(lambda m, i, out: seen.append(out[1])) for s in layer_searches]
    for row in rows.tolist():
        hand = []
        for index, ids in enumerate(documents):
            seen.clear()
            with torch.no_grad():
                model(torch.tensor([ids[:10]]))
            count = sum(int((indices == row).sum()) for indices in seen)
            if count:
                hand.append((index, count))
        assert found[row] == sorted(hand, key=lambda x: (-x[1], x[0]))[:2] and found[row]
    for handle in handles:
        handle.remove()
