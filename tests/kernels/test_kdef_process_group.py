"""``kdef_loss(..., process_group=...)``: the exam scores and batch means of a data-parallel
batch, with real gloo processes on the CPU.

Each rank holds a share of one batch and weighs its loss by its share's rows (``n_r W / N``, the
weight of any mean loss under DDP's average); the average of the ranks' gradients must be the
float64 reference gradient of the whole batch, and every rank's loss the whole batch's.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cetnet_kernels import kdef_loss, kdef_loss_reference

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rows: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    z = torch.randn(rows, K, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(rows, generator=g, dtype=torch.float64) < 0.4).double()
    return z, y


def _worker(rank: int, port: int, shares: list[int], K: int, dtype: str, bad_rank: int,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        z, y = _batch(sum(shares), K)
        lo = sum(shares[:rank])
        z = z[lo:lo + shares[rank]].to(getattr(torch, dtype)).requires_grad_()
        y = y[lo:lo + shares[rank]].clone()
        if rank == bad_rank:
            y[0] = 2.0
        record: dict = {}
        try:
            loss, teacher = kdef_loss(z, y, process_group=dist.group.WORLD)
        except ValueError as e:
            record["error"] = str(e)
        else:
            (loss * (shares[rank] * WORLD / sum(shares))).backward()
            grad = z.grad.double() / WORLD  # DDP's average over the ranks
            record.update(loss=loss.item(), grad=grad.tolist(), teacher=teacher.double().tolist())
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, shares: list[int], K: int = 3, dtype: str = "float64",
           bad_rank: int = -1) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), shares, K, dtype, bad_rank, str(tmp_path)),
             nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("shares, K", [([5, 5], 3), ([5, 2], 3), ([6, 0], 2), ([3, 4], 1)])
def test_the_ranks_gradients_average_to_the_whole_batchs(tmp_path, shares, K):
    ranks = _spawn(tmp_path, shares, K)
    z, y = _batch(sum(shares), K)
    z.requires_grad_()
    loss, teacher = kdef_loss_reference(z, y)
    loss.backward()
    for r in ranks:
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-12, abs=1e-15)
    grad = torch.tensor([row for r in ranks for row in r["grad"]],
                        dtype=torch.float64).reshape(-1, K)
    torch.testing.assert_close(grad, z.grad, rtol=1e-10, atol=1e-14)
    got = torch.tensor([t for r in ranks for t in r["teacher"]], dtype=torch.float64)
    torch.testing.assert_close(got, teacher.detach(), rtol=1e-12, atol=0)


def test_float32_shares_match_the_fused_kernel_on_the_whole_batch(tmp_path):
    ranks = _spawn(tmp_path, [9, 4], K=4, dtype="float32")
    z, y = _batch(13, 4)
    z = z.float().requires_grad_()
    loss, _ = kdef_loss(z, y, backend="cpu")
    loss.backward()
    grad = torch.tensor([row for r in ranks for row in r["grad"]]).reshape(-1, 4)
    torch.testing.assert_close(grad.float(), z.grad, rtol=1e-5, atol=1e-7)
    assert ranks[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_a_bad_label_on_one_rank_stops_every_rank(tmp_path):
    """The label check rides on the all-reduce: no rank waits for one that raised."""
    ranks = _spawn(tmp_path, [4, 4], bad_rank=1)
    assert ranks[1]["error"] == "kdef_loss: labels must lie in [0, 1]; labels[0] = 2.0"
    assert "another rank of the process group has one outside" in ranks[0]["error"]


def test_a_process_group_without_torch_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    z, y = _batch(4, 2)
    with pytest.raises(ValueError, match="process_group is given but torch.distributed is not "
                                         "initialized"):
        kdef_loss(z, y, process_group=object())
