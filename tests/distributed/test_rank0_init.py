"""A model on the meta device on rank 1 gets rank 0's weights and buffers; a different model is refused
(two gloo processes, spawned here)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

from memlayers.distributed.rank0_init import any_rank_on_meta, has_meta, load_from_rank0


class Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Linear(4, width), nn.Linear(width, 2)
        self.register_buffer("freq", torch.arange(3.0) + 0.5, persistent=False)  # not in the state dict


def _rank(rank: int, init: str, width1: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        if rank == 0:
            model = Net(3)
        else:
            with torch.device("meta"):
                model = Net(width1)
        assert any_rank_on_meta(model) and has_meta(model) == (rank == 1)
        full = model.state_dict() if rank == 0 else None
        fully_shard(model)
        try:
            load_from_rank0(model, full, torch.device("cpu"))
        except ValueError as error:
            torch.save({"error": str(error)}, f"{out}.{rank}")
            return
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        torch.save({"state": state, "freq": model.freq.clone()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run(tmp_path, width1: int) -> list[dict]:
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_rank, args=(init, width1, str(tmp_path / "result")), nprocs=2, join=True)
    return [torch.load(tmp_path / f"result.{r}") for r in range(2)]


@pytest.mark.multiprocess
def test_a_meta_rank_gets_rank_0_s_weights_and_buffers(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    zero, one = run(tmp_path, width1=3)
    torch.manual_seed(0)
    expected = Net(3)
    for key, value in expected.state_dict().items():
        assert torch.equal(zero["state"][key], value) and torch.equal(one["state"][key], value), key
    assert torch.equal(one["freq"], expected.freq)


@pytest.mark.multiprocess
def test_a_rank_that_built_another_model_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    zero, one = run(tmp_path, width1=5)
    assert zero["error"] == one["error"]  # both ranks refuse, with the same line
    assert one["error"].startswith("rank 1 built a different model than rank 0 (here ('a.weight', 'torch.float32', (5, 4))")
    assert "build it alike on every rank" in one["error"]
