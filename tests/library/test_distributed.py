"""Data-parallel training (docs/DISTRIBUTED.md) with real gloo processes on the CPU.

The requirement: a 2-rank run equals a 1-rank run with the same global batch. Each rank
trains on its contiguous half of every global batch, DDP averages the dense gradients, and
the fused embedding update all-gathers both halves and applies the global batch's update on
both ranks. Loss curve, validation/test metrics and embedding rows agree with the 1-rank run
to RTOL (the dense layers multiply half-batches, so float sums run in another order; measured
differences are ~1e-7), the two ranks' tables are bitwise identical, rank 0 alone writes the
run directory, and a 2-rank run resumes to the 1-rank result (from last.prev.pt: its last.pt is
cut in half first).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cetnet import distributed
from cetnet_kernels import MultiTableEmbedding
from cetnet.config import ConfigError
from cetnet.data import load_dataset
from cetnet.train import loop, runner
from cetnet.train.loop import shard_batches
from cetnet.train.rundir import read_json

from run_support import small_run_config, train_with_epoch_hook

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

#: Relative tolerance between a 2-rank and a 1-rank run (summation order differs).
RTOL = 1e-5
WORLD = 2


def _config(**model: object) -> dict:
    cfg = small_run_config(epochs=3, batch_size=64, eval_batch_size=256, patience=None,
                           log_every=5)
    # 967 train rows: the last batch of an epoch has 7 rows, shares of 4 and 3 (weighted)
    cfg["data"]["num_rows"] = 1209
    cfg["model"].update({"dnn": {"hidden": [16], "dropout": 0.0},
                         "dcnv2": {"cross_layers": 1, "hidden": [16], "dropout": 0.0},
                         "embedding_optimizer": "rowwise_adagrad"}, **model)
    cfg["backend"] = "cpu"
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(config: dict, out: Path, *, resume: bool = False, stop_after: int | None = None,
         record: Path | None = None) -> dict:
    """One rank's (or the single process's) run: the tables after every epoch go to
    ``record`` (per epoch, before the best model is loaded back)."""
    tables = {}

    def keep(model, epoch: int) -> None:
        tables[epoch] = model.embedding.weight.detach().clone()

    metrics = train_with_epoch_hook(config, out, keep, resume=resume, stop_after=stop_after)
    if record is not None:
        torch.save(tables, record)
    return metrics


def _run_one_thread(config: dict, out: Path, **kw: object) -> dict:
    """The single process's run, on one thread as each rank (summation order of the dense
    layers' products)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, out, **kw)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


def _writes_under(root: Path, events: list) -> None:
    """Records every write-like file operation under ``root`` (an audit hook)."""
    root_s = str(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or "r"), (args[2] or 0)
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if writing and str(os.fsdecode(args[0])).startswith(root_s):
                events.append((event, str(args[0])))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate",
                       "os.chmod") and args and str(args[0]).startswith(root_s):
            events.append((event, str(args[0])))

    sys.addaudithook(hook)


def _worker(rank: int, port: int, config: dict, out: str, resume: bool,
            stop_after: int | None, results: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    events: list = []
    if rank:
        _writes_under(Path(out), events)
    record = Path(results) / f"tables{rank}.pt"
    metrics = _run(config, Path(out), resume=resume, stop_after=stop_after, record=record)
    (Path(results) / f"rank{rank}.json").write_text(json.dumps(
        {"metrics": metrics, "writes": events}, default=str))


def _spawn(tmp_path: Path, name: str, config: dict, out: Path, *, resume: bool = False,
           stop_after: int | None = None) -> list[dict]:
    results = tmp_path / name
    results.mkdir()
    mp.spawn(_worker, args=(_free_port(), config, str(out), resume, stop_after, str(results)),
             nprocs=WORLD, join=True)
    return [dict(json.loads((results / f"rank{r}.json").read_text()),
                 tables=torch.load(results / f"tables{r}.pt")) for r in range(WORLD)]


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=RTOL, abs=1e-7)


def _assert_metrics_close(two: dict, one: dict) -> None:
    for split in ("fused", *[f"members.{m}" for m in one["members"]]):
        a, b = two, one
        for k in split.split("."):
            a, b = a[k], b[k]
        for m in ("auc", "gauc", "logloss"):
            assert _close(a[m], b[m]), (split, m, a[m], b[m])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The 1-rank reference run (no process group)."""
    tmp = tmp_path_factory.mktemp("single")
    assert not distributed.active() and "WORLD_SIZE" not in os.environ
    metrics = _run_one_thread(_config(), tmp / "run", record=tmp / "tables.pt")
    return {"metrics": metrics, "tables": torch.load(tmp / "tables.pt"), "dir": tmp / "run"}


def test_two_ranks_equal_one_rank_and_resume(single, tmp_path):
    out = tmp_path / "run"
    # a 2-rank run interrupted after epoch 2 (both ranks), then resumed by 2 ranks
    first = _spawn(tmp_path, "first", _config(), out, stop_after=2)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events")) == [
        ".lock", "best.pt", "config.yaml", "history.csv", "last.prev.pt", "last.pt", "train.log"]
    # last.pt cut in half: rank 0 chooses last.prev.pt (epoch 1), every rank reads it, and
    # epochs 2 and 3 are trained again
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[:len(data) // 2])
    second = _spawn(tmp_path, "second", _config(), out, resume=True)

    # rank 0 alone wrote the run directory, in both attempts
    for attempt in (first, second):
        assert attempt[1]["writes"] == [], attempt[1]["writes"][:5]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events")) == sorted(
        p.name for p in single["dir"].iterdir() if not p.name.startswith("events"))

    one = single["metrics"]
    two = read_json(out / "metrics.json")
    assert two["world_size"] == WORLD and two["environment"]["world_size"] == WORLD
    assert one["world_size"] == 1
    # every rank returns the same metrics
    assert second[0]["metrics"]["fused"] == second[1]["metrics"]["fused"]

    # the loss curve, the validation metrics of every epoch and the test metrics
    assert [h["epoch"] for h in two["history"]] == [1, 2, 3]
    for h2, h1 in zip(two["history"], one["history"]):
        assert _close(h2["train_loss"], h1["train_loss"]), (h2["train_loss"], h1["train_loss"])
        assert h2["lr"] == pytest.approx(h1["lr"], rel=1e-12)
        _assert_metrics_close(h2["valid"], h1["valid"])
    _assert_metrics_close(two, one)
    assert two["best_epoch"] == one["best_epoch"]
    assert two["train_samples"] == one["train_samples"]

    # embedding tables: identical on both ranks (bitwise), equal to the 1-rank run's
    assert sorted(second[0]["tables"]) == [2, 3]  # resumed from epoch 1
    for epoch, ranks in ((1, first), (2, first), (2, second), (3, second)):
        t0, t1 = ranks[0]["tables"][epoch], ranks[1]["tables"][epoch]
        assert torch.equal(t0, t1), f"epoch {epoch}: the ranks' tables differ"
        ref = single["tables"][epoch]
        assert torch.allclose(t0, ref, rtol=RTOL, atol=1e-7), \
            (epoch, float((t0 - ref).abs().max()))


def test_resume_on_another_world_size(single, tmp_path):
    # two ranks train epochs 1-2, one process resumes and finishes: the replicated tables and
    # the dense state load as they are, and the run equals the uninterrupted one-process run
    out = tmp_path / "run"
    _spawn(tmp_path, "first", _config(), out, stop_after=2)
    metrics = _run_one_thread(_config(), out, resume=True, record=tmp_path / "tables.pt")
    one = single["metrics"]
    assert metrics["world_size"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    for h, h1 in zip(metrics["history"], one["history"]):
        assert _close(h["train_loss"], h1["train_loss"]), (h["epoch"], h["train_loss"],
                                                           h1["train_loss"])
    _assert_metrics_close(metrics, one)
    tables = torch.load(tmp_path / "tables.pt")
    assert sorted(tables) == [3]
    assert torch.allclose(tables[3], single["tables"][3], rtol=RTOL, atol=1e-7)


def test_a_kdef_run_on_two_ranks_equals_one_process(tmp_path):
    """KDEF weights its members by exam scores over the batch: its loss takes them, and every
    batch mean, over the ranks' shares (an all-reduce in the forward and the backward), so a
    2-rank run equals one process on the global batches, whose last of each epoch (7 rows:
    shares of 4 and 3) weighs its shares by their rows. The single process runs the fused CPU
    kernel, the ranks the plain-PyTorch formulas."""
    cfg = _config(ensemble="kdef")
    cfg["train"].update(epochs=2)
    one = _run_one_thread(cfg, tmp_path / "one", record=tmp_path / "tables.pt")
    ranks = _spawn(tmp_path, "kdef", cfg, tmp_path / "run")
    two = read_json(tmp_path / "run" / "metrics.json")
    assert two["world_size"] == WORLD and not any("exam" in w for w in two["warnings"])
    assert ranks[0]["metrics"]["fused"] == ranks[1]["metrics"]["fused"]
    for h2, h1 in zip(two["history"], one["history"], strict=True):
        assert _close(h2["train_loss"], h1["train_loss"]), (h2["train_loss"], h1["train_loss"])
        _assert_metrics_close(h2["valid"], h1["valid"])
    _assert_metrics_close(two, one)
    tables = torch.load(tmp_path / "tables.pt")
    for epoch in (1, 2):
        t0, t1 = ranks[0]["tables"][epoch], ranks[1]["tables"][epoch]
        assert torch.equal(t0, t1), f"epoch {epoch}: the ranks' tables differ"
        assert torch.allclose(t0, tables[epoch], rtol=RTOL, atol=1e-7), \
            (epoch, float((t0 - tables[epoch]).abs().max()))


def test_batch_norm_statistics_are_rank_0s_when_scored_and_saved(tmp_path):
    """Each rank's last training step updates its own BatchNorm running statistics (DDP
    copies rank 0's only at the start of a forward): the validation scores mixed rank 1's
    statistics into the predictions, so `evaluate` of best.pt did not give metrics.json's
    scores. Every rank now takes rank 0's before it scores and before rank 0 saves."""
    from cetnet.train import evaluate_run

    cfg = _config()
    cfg["model"]["dnn"]["batch_norm"] = True
    cfg["train"].update(epochs=2, max_steps_per_epoch=4)
    ranks = _spawn(tmp_path, "bn", cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert ranks[0]["metrics"]["valid"] == ranks[1]["metrics"]["valid"] == saved["valid"]
    again = evaluate_run(tmp_path / "run", "valid", write=False)
    for m in ("auc", "gauc", "logloss"):
        assert again["fused"][m] == pytest.approx(saved["valid"]["fused"][m], rel=1e-9), m


def test_dense_embedding_gradients_are_averaged_by_ddp(tmp_path):
    """optimizer=None: the flat weight is an ordinary parameter whose gradient DDP averages."""
    cfg = _config(embedding_optimizer=None)
    cfg["train"]["epochs"] = 1
    one = _run_one_thread(cfg, tmp_path / "one", record=tmp_path / "one.pt")
    ranks = _spawn(tmp_path, "dense", cfg, tmp_path / "two")
    two = read_json(tmp_path / "two" / "metrics.json")
    for h2, h1 in zip(two["history"], one["history"]):
        assert _close(h2["train_loss"], h1["train_loss"]), (h2["train_loss"], h1["train_loss"])
    _assert_metrics_close(two, one)
    ref = torch.load(tmp_path / "one.pt")[1]
    assert torch.equal(ranks[0]["tables"][1], ranks[1]["tables"][1])
    assert torch.allclose(ranks[0]["tables"][1], ref, rtol=RTOL, atol=1e-7)


# ---------------------------------------------------------------- the embedding on its own
_B = 10  # global batch rows: 5 per rank
_DIMS = [4, 3]


def _embedding(optimizer: str) -> MultiTableEmbedding:
    torch.manual_seed(0)
    features = [("one", 50), ("seq", 30), ("bag", 40, "mean"), ("wbag", 20)]
    return MultiTableEmbedding(2, features, _DIMS, optimizer=optimizer, lr=0.1,
                               weight_decay=0.01, backend="cpu")


def _global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    bag_len = torch.randint(0, 4, (_B,), generator=g)
    wbag_len = torch.randint(0, 3, (_B,), generator=g)
    return {"one": torch.randint(0, 50, (_B,), generator=g),
            "seq": torch.randint(-1, 30, (_B, 5), generator=g),  # -1: padding
            "bag": (torch.randint(0, 40, (int(bag_len.sum()),), generator=g), bag_len),
            "wbag": (torch.randint(0, 20, (int(wbag_len.sum()),), generator=g), wbag_len,
                     torch.rand(int(wbag_len.sum()), generator=g)),
            "coef": [torch.randn(_B, 8, d, generator=g) for d in _DIMS]}


def _rows(batch: dict, lo: int, hi: int) -> tuple[dict, list]:
    """The ids of rows [lo, hi) of a global batch, and their loss coefficients."""
    ids = {"one": batch["one"][lo:hi], "seq": batch["seq"][lo:hi]}
    for name in ("bag", "wbag"):
        values, lengths, *psw = batch[name]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        a, b = int(offsets[lo]), int(offsets[hi])
        ids[name] = (values[a:b], offsets[lo:hi + 1] - a, *[w[a:b] for w in psw])
    return ids, [c[lo:hi] for c in batch["coef"]]


def _train_embedding(emb: MultiTableEmbedding, lo: int, hi: int, steps: int = 3) -> None:
    for step in range(steps):
        ids, coef = _rows(_global_batch(step), lo, hi)
        loss = sum((out * c).sum() for out, c in zip(emb(ids), coef)) / (hi - lo)
        loss.backward()


_OPTIMIZERS = ("rowwise_adagrad", "sgd")


def _embedding_worker(rank: int, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for optimizer in _OPTIMIZERS:
            emb = _embedding(optimizer).set_process_group(torch.distributed.group.WORLD)
            lo, hi = distributed.shard_range(_B)
            _train_embedding(emb, lo, hi)
            torch.save(emb.state_dict(), Path(results) / f"{optimizer}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_data_parallel_fused_update_is_the_global_batch_update(tmp_path):
    """Ids, sequences with padding, mean bags and weighted bags: each rank looks up half of
    every global batch; both ranks' tables (and Adagrad states) are bitwise those of one
    process updating on the global batch (the gradient of a mean over 5 rows, halved, is
    that of the mean over 10 rows exactly: scaling by 2 rounds nothing)."""
    mp.spawn(_embedding_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for optimizer in _OPTIMIZERS:
        single = _embedding(optimizer)
        _train_embedding(single, 0, _B)
        ranks = [torch.load(tmp_path / f"{optimizer}{r}.pt") for r in range(WORLD)]
        for key, ref in single.state_dict().items():
            assert torch.equal(ranks[0][key], ranks[1][key]), (optimizer, key)
            assert torch.equal(ranks[0][key], ref), \
                (optimizer, key, float((ranks[0][key] - ref).abs().max()))
        assert not torch.equal(ranks[0]["weight"], _embedding(optimizer).weight.detach())
        assert single.process_group is None


def test_shares_of_the_global_batches_are_the_one_process_batches(monkeypatch):
    """Concatenated in rank order, the ranks' shares are the batches of Split.batches."""
    split = load_dataset("synthetic", num_rows=300, seed=1).splits["train"]
    whole = list(split.batches(64, shuffle=True, seed=7))
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        parts.append(list(shard_batches(split, 64, seed=7)))
    assert len(whole) == len(parts[0])
    for i, batch in enumerate(whole):
        assert [p[i][1] for p in parts] == [len(batch)] * 3
        for k in batch.sparse:
            assert torch.equal(torch.cat([p[i][0].sparse[k] for p in parts]), batch.sparse[k])
        assert torch.equal(torch.cat([p[i][0].label for p in parts]), batch.label)


@pytest.mark.parametrize("n, world", [(10, 3), (64, 2), (2, 4), (0, 2)])
def test_shard_ranges_tile_the_rows_in_order(n, world):
    ranges = [distributed.shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_a_batch_size_the_world_size_does_not_divide_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = _config()
    with pytest.raises(ConfigError, match=r"train.batch_size = 64 .* divisible by the world "
                                          r"size 3"):
        runner.check_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_split_with_fewer_rows_than_ranks_is_refused_up_front(monkeypatch, tmp_path):
    """4 ranks and a 3-row valid split: refused by the check (and --dry-run), before anything
    is written, not after a whole epoch when the sharded evaluation finds no share for a
    rank."""
    from cetnet.train import TrainingError

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = _config()
    cfg["data"]["num_rows"] = 30  # 24 / 3 / 3 rows
    cfg["train"]["batch_size"] = 4
    with pytest.raises(TrainingError, match=r"split has 3 rows, fewer than the 4 ranks"):
        runner.check_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")
    runner.check_run(cfg, tmp_path / "run")  # one process: fine


def test_a_sum_loss_is_refused_in_a_data_parallel_run(monkeypatch, tmp_path):
    """The ranks' gradients are averaged: right for a mean loss only (a sum trained with half
    its gradient on 2 ranks, silently)."""
    cfg = _config()
    cfg["model"]["fusion"]["reduction"] = "sum"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="reduction: sum is not supported in a data-parallel"):
        runner.check_run(cfg, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "1")
    runner.check_run(cfg, tmp_path / "run")


def test_without_a_process_group_nothing_is_collective(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.active() and distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main()
    assert distributed.from_main(lambda: 5) == 5
    distributed.barrier()
    distributed.check_batch_size(7, 1)
    with distributed.process_group(torch.device("cpu")):
        assert not torch.distributed.is_initialized()
    model = loop._LossOf(torch.nn.Linear(2, 1))
    assert isinstance(model.model, torch.nn.Linear)
