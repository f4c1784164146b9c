"""torchrun worker for tests/distributed/test_eval_torchrun.py.

Every rank builds the same small memory model (same seed) twice: a reference
that stays in this process and a copy sharded with FSDP2 and memory
parallelism. It runs evaluation on both and writes what it saw to
``OUT/rank<r>.json``; the test compares. Nothing is asserted here, so a
failure shows its numbers; a rank that falls out of step hangs in a
collective and fails after the 60 s timeout.

    torchrun --nproc-per-node N worker_eval.py OUT MEMORY_PARALLEL
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from memlayers.data.text import qa_prompt
from memlayers.distributed import (
    ParallelConfig,
    build_mesh,
    init_distributed,
    parallelize,
    shutdown,
)
from memlayers.eval import evaluate_perplexity, evaluate_qa, generate
from memlayers.eval.generate import length_buckets
from memlayers.memory import MemoryConfig
from memlayers.model.config import ModelConfig
from memlayers.model.transformer import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from test_qa import ALPHABET, CharCodec, _random_pairs  # noqa: E402

MAX_NEW, BATCH = 8, 2
N_PAIRS, PAIRS_SEED = 11, 5


def pick_eos(model: Transformer, prompts: list[list[int]]) -> int:
    """The id whose first occurrence in the model's free-running answers falls at the most
    different steps: as EOS, it ends some answers early and others late or never."""
    free = generate(model, prompts, MAX_NEW)
    spread = {}
    for token in range(model.config.vocab_size):
        spread[token] = len({ids.index(token) if token in ids else MAX_NEW for ids in free})
    return max(spread, key=spread.get)


def count_forwards(model: torch.nn.Module) -> list[int]:
    """A one-element counter of ``model``'s forward calls."""
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def refusal(call) -> str | None:
    """The ValueError message ``call()`` raises (None when it returns)."""
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def main() -> None:
    out_dir, memory_parallel = Path(sys.argv[1]), int(sys.argv[2])
    init_distributed(timeout_s=60)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()

    codec = CharCodec()
    torch.manual_seed(0)
    config = ModelConfig(
        dim=32, n_layers=2, n_heads=2, vocab_size=codec.vocab_size, multiple_of=16, max_seq_len=40,
        init_std=0.3, memory_layers=(1,), memory=MemoryConfig(n_keys=8, heads=2, knn=4, k_dim=16, qk_norm=True),
    )
    reference = Transformer(config)
    model = Transformer(config)
    model.load_state_dict(reference.state_dict())
    parallel = ParallelConfig(memory_parallel=memory_parallel)
    parallelize(model, build_mesh(parallel, torch.device("cpu")), parallel)
    forwards = count_forwards(model)

    pairs = _random_pairs(N_PAIRS, seed=PAIRS_SEED)
    prompts = [codec.encode(qa_prompt(p["question"]), bos=True) for p in pairs]
    codec.eos_id = pick_eos(reference, prompts)
    stop = [codec.eos_id]
    result: dict = {"rank": rank, "world": world, "eos": codec.eos_id}

    # QA: the same pairs on every rank, which take turns at the batches; two gold answers
    # are what the model says, so that exact match is not 0
    said = [p["prediction"] for p in evaluate_qa(reference, codec, pairs, MAX_NEW, BATCH).predictions]
    for index in [i for i, text in enumerate(said) if text and set(text) <= set(ALPHABET)][:2]:
        pairs[index]["answer"] = said[index]
    one = evaluate_qa(reference, codec, pairs, MAX_NEW, BATCH)
    spread = evaluate_qa(model, codec, pairs, MAX_NEW, BATCH, progress=True)
    answers = generate(reference, prompts, MAX_NEW, stop_ids=stop)
    buckets = length_buckets([len(p) for p in prompts], BATCH)
    result["qa"] = {
        "one": [one.as_dict(), one.predictions],
        "spread": [spread.as_dict(), spread.predictions],
        "forwards": forwards[0],
        "batches": len(buckets),
        # the steps one process runs for each generation batch: until all its rows hit EOS
        "steps": [max(len(answers[i]) for i in bucket) for bucket in buckets],
        "cache_free_prompts": sum(len(p) + MAX_NEW > config.max_seq_len for p in prompts),
    }

    # generate(): each rank its own prompts, as many as its rank + 1, or none at all
    start = forwards[0]
    mine = prompts[rank * world : rank * world + rank + 1]
    result["generate"] = {
        "spread": generate(model, mine, MAX_NEW, stop_ids=stop, batch_size=BATCH),
        "one": generate(reference, mine, MAX_NEW, stop_ids=stop, batch_size=BATCH),
        "none": generate(model, [] if rank == 0 else mine, MAX_NEW, stop_ids=stop),
        "forwards": forwards[0] - start,
    }

    # perplexity: 5 rows in batches of 2, so the ranks have 2 and 1 batches
    rows = torch.randint(0, codec.vocab_size, (5, 13), generator=torch.Generator().manual_seed(7))
    result["perplexity"] = {
        "one": evaluate_perplexity(reference, rows, batch_size=BATCH),
        "spread": evaluate_perplexity(model, rows, batch_size=BATCH),
    }

    # bad input on one rank stops every rank with an error, and they stay in step
    bad_prompts = [[]] if rank == world - 1 else prompts[:1]
    own_pairs = pairs[:3] if rank == 0 else pairs[1:4]
    result["refused"] = {
        "generate": refusal(lambda: generate(model, bad_prompts, MAX_NEW)),
        "qa": refusal(lambda: evaluate_qa(model, codec, own_pairs, MAX_NEW, BATCH)),
        "after": generate(model, mine, MAX_NEW, stop_ids=stop) == result["generate"]["one"],
    }

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
