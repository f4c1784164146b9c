"""score_continuations: one right-padded batch against one sequence at a time."""

import pytest
import torch
import torch.nn.functional as F

from memlayers.eval.loglikelihood import score_continuations
from memlayers.model import ModelConfig, Transformer


@torch.no_grad()
def _direct(model, sequence: list[int], n: int) -> tuple[float, bool]:
    logits = model(torch.tensor([sequence[:-1]])).logits[0]  # (T, V)
    log_probs = F.log_softmax(logits, dim=-1)[-n:]  # (n, V)
    wanted = torch.tensor(sequence[-n:])
    return float(log_probs.gather(-1, wanted[:, None]).sum()), bool((log_probs.argmax(-1) == wanted).all())


def test_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    config = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=23, max_seq_len=16, ffn_hidden_dim=48,
                         init_std=0.5, memory_layers=(1,))
    model = Transformer(config).double().eval()
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 23, (n,), generator=generator).tolist() for n in (17, 5, 9, 2)]
    n_scored = [3, 4, 1, 1]
    # a continuation the model itself predicts, so that some rows are greedy and some are not
    prompt = sequences[2][:-1]
    with torch.no_grad():
        sequences[2] = prompt + [int(model(torch.tensor([prompt])).logits[0, -1].argmax())]
    expected = [_direct(model, s, n) for s, n in zip(sequences, n_scored, strict=True)]
    assert any(g for _, g in expected) and not all(g for _, g in expected)
    got = score_continuations(model, sequences, n_scored, pad_id=7)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], rel=1e-12)
