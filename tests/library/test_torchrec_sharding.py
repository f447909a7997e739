"""``embedding: torchrec``: member tables sharded by TorchRec's DistributedModelParallel.

Real processes (``torch.multiprocessing.spawn``, gloo on the CPU), real TorchRec and FBGEMM
(fbgemm-gpu-cpu): sharded lookups equal the unsharded ones for each sharding the CPU offers,
one training step of 2 ranks equals the 1-process step on the same global batch (loss and
updated rows), and a 2-rank training run equals the 1-process run, checkpoints its tables
with torch.distributed.checkpoint, resumes on the same world size and is evaluated in one
process from its checkpoint; a run resumed on another world size (1 -> 2 -> 1 processes) equals
the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from cetnet.config import ConfigError
from cetnet.models.torchrec_front import torchrec_available

from run_support import small_run_config, train_with_epoch_hook

pytestmark = [
    pytest.mark.skipif(torchrec_available() is not None,
                       reason=f"TorchRec/FBGEMM not installed ({torchrec_available()})"),
    pytest.mark.skipif(not torch.distributed.is_available()
                       or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is needed"),
]

WORLD = 2
RTOL = 1e-5


def _config(**train: object) -> dict:
    cfg = small_run_config(epochs=3, batch_size=64, eval_batch_size=256, patience=None,
                           log_every=5, **train)
    cfg["data"]["num_rows"] = 1209  # 967 train rows: a remainder batch of 7 rows (4 + 3)
    cfg["model"].update({"dnn": {"hidden": [16], "dropout": 0.0},
                         "dcnv2": {"cross_layers": 1, "hidden": [16], "dropout": 0.0},
                         "embedding_optimizer": "rowwise_adagrad", "embedding_lr": 0.05})
    cfg["backend"] = "cpu"
    cfg["embedding"] = "torchrec"
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _model_and_data(config: dict):
    from cetnet.train import runner

    config = runner.validate_config(config)
    return runner.build_run(config)


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


# -- lookups ------------------------------------------------------------------------------

def _lookup_worker(rank: int, port: int, sharding: str, results: str) -> None:
    _env(rank, port)
    import torch.distributed as dist

    from cetnet.train import sharded

    dist.init_process_group("gloo")
    try:
        dataset, model = _model_and_data(_config(embedding_sharding=sharding))
        model.eval()
        unsharded = copy.deepcopy(model)
        run = sharded.shard(model, torch.device("cpu"), sharding)
        batch = dataset.splits["train"].take(slice(rank * 50, rank * 50 + 37 + rank))
        with torch.no_grad():
            got, want = model.front(batch), unsharded.front(batch)
        err = max(max(float((g.fields - w.fields).abs().max()),
                      *(float((g.sequences[n] - w.sequences[n]).abs().max())
                        for n in w.sequences)) for g, w in zip(got, want))
        full = sharded.gather_tables(model)
        table_err = max(float((full[k] - v).abs().max())
                        for k, v in unsharded.front.state_dict().items())
        kinds = sorted({str(ps.sharding_type) for plan in run.plan.plan.values()
                        for ps in plan.values()})
        Path(results, f"rank{rank}.json").write_text(json.dumps(
            {"err": err, "table_err": table_err, "kinds": kinds}))
        dist.barrier()  # both ranks done talking before either tears its group down
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding, kinds", [
    ("table_wise", {"table_wise"}),
    ("column_wise", {"column_wise"}),
    # the planner's choice: table-wise bags; row-wise is what it gives sequences
    ("auto", None),
])
def test_sharded_lookups_equal_unsharded(tmp_path, sharding, kinds):
    _spawn(_lookup_worker, sharding, str(tmp_path))
    for r in range(WORLD):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["err"] <= 1e-6, out  # mean pooling: one rounding of the division
        assert out["table_err"] == 0.0, out  # the built tables copied into the shards
        if kinds is not None:
            assert set(out["kinds"]) == kinds, out
        else:
            assert set(out["kinds"]) <= {"table_wise", "row_wise", "column_wise"}, out


def _column_blocks(optimizer: str, sharding: str, world: int) -> dict[str, int]:
    """Table -> the number of column blocks the planner cuts it into, for a 256-wide model on
    ``world`` CPU ranks (the plan alone: no process group)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from cetnet.train import sharded

    cfg = _config(embedding_sharding=sharding)
    cfg["model"].update(embedding_dim=256, embedding_optimizer=optimizer)
    _, model = _model_and_data(cfg)
    sharders, compute, constraints = sharded._sharders_and_constraints(
        sharded._front(model), torch.device("cpu"), sharding)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=compute), constraints=constraints)
    plan = planner.plan(model, sharders)
    return {name: len({s.shard_offsets[1] for s in ps.sharding_spec.shards})
            for module_plan in plan.plan.values() for name, ps in module_plan.items()
            if str(ps.sharding_type) == "column_wise"}


@pytest.mark.parametrize("sharding, world", [("column_wise", 1), ("auto", 8)])
def test_row_wise_adagrad_tables_are_never_cut_into_column_blocks(sharding, world):
    # its accumulator is per row (the mean of g^2 over the row): one per 128-column block
    # made each block's update its own, 2 % off the whole row's, and the result depended on
    # the plan (auto cut 4 tables in two on 8 ranks, none on 2)
    whole = _column_blocks("rowwise_adagrad", sharding, world)
    assert set(whole.values()) <= {1}, whole  # (auto places them table-wise then)
    if sharding == "column_wise":
        assert len(whole) == 12  # every table of the 2 members
    # SGD's per-element update may be cut: the planner does, in both settings
    assert set(_column_blocks("sgd", sharding, world).values()) == {2}


def test_a_run_saved_with_row_wise_adagrad_in_column_blocks_says_why_it_cannot_resume(
        tmp_path, monkeypatch):
    # runs of before cut 256-wide tables into 128-column blocks, each with its own Adagrad
    # accumulator: their state does not load into whole-row shards (a bare size mismatch)
    from cetnet.train import sharded
    from cetnet.train.checkpoint import CheckpointError

    cfg = _config(embedding_sharding="column_wise")
    cfg["model"]["embedding_dim"] = 256
    monkeypatch.setattr(sharded, "_whole_rows", lambda front, dim: None)  # the old plan
    _train(cfg, tmp_path / "run", stop_after=1)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"saved per column block of a table .* start it "
                                              r"again \(--overwrite\)"):
        _train(cfg, tmp_path / "run", resume=True)


# -- one training step --------------------------------------------------------------------

def _step(model, run, batch, params, lr=0.01):
    optimizer = torch.optim.SGD(params, lr=lr)
    loss, _ = run(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def _step_worker(rank: int, port: int, results: str) -> None:
    _env(rank, port)
    import torch.distributed as dist

    from cetnet import distributed
    from cetnet.train import sharded

    dist.init_process_group("gloo")
    try:
        dataset, model = _model_and_data(_config())
        run = sharded.shard(model, torch.device("cpu"))
        lo, hi = distributed.shard_range(64)
        batch = dataset.splits["train"].take(slice(lo, hi))
        loss = _step(model, run, batch, model.dense_parameters())
        total = torch.tensor([loss * len(batch)], dtype=torch.float64)
        dist.all_reduce(total)
        tables = sharded.gather_tables(model)
        dense = {k: v for k, v in sharded.dense_state(model).items()}
        if rank == 0:
            torch.save({"loss": float(total) / 64, "tables": tables, "dense": dense},
                       Path(results, "two.pt"))
        dist.barrier()  # both ranks done talking before either tears its group down
    finally:
        dist.destroy_process_group()


def test_one_step_of_two_ranks_equals_the_one_process_step(tmp_path):
    from cetnet.train import sharded

    dataset, model = _model_and_data(_config())
    before = {k: v.clone() for k, v in model.front.state_dict().items()}
    run = sharded.shard(model, torch.device("cpu"))
    try:
        loss = _step(model, run, dataset.splits["train"].take(slice(0, 64)),
                     model.dense_parameters())
        tables = sharded.gather_tables(model)
        dense = sharded.dense_state(model)
    finally:
        run.close()
    _spawn(_step_worker, str(tmp_path))
    two = torch.load(tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(loss, rel=RTOL)
    moved = 0
    for k, v in tables.items():
        assert torch.allclose(two["tables"][k], v, rtol=RTOL, atol=1e-7), \
            (k, float((two["tables"][k] - v).abs().max()))
        moved += int((v != before[k]).any(dim=1).sum())
    assert moved > 50  # the step updated rows (the fused row-wise Adagrad ran)
    for k, v in dense.items():
        assert torch.allclose(two["dense"][k], v, rtol=RTOL, atol=1e-7), k


# -- training runs, checkpoints, resume ---------------------------------------------------

@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The one-process runs on one thread, as each rank (the order of the dense sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(config: dict, out: Path, *, resume: bool = False,
           stop_after: int | None = None) -> dict:
    """A run (1 process, or this rank's) and its whole tables after every epoch."""
    from cetnet.train import sharded

    tables = {}

    def keep(model, epoch: int) -> None:
        tables[epoch] = sharded.gather_tables(model)  # a collective

    metrics = train_with_epoch_hook(config, out, keep, resume=resume, stop_after=stop_after)
    return {"metrics": metrics, "tables": tables}


def _train_worker(rank: int, port: int, out: str, resume: bool, stop_after: int | None,
                  results: str) -> None:
    _env(rank, port)
    got = _train(_config(), Path(out), resume=resume, stop_after=stop_after)
    torch.save(got, Path(results, f"rank{rank}.pt"))


def _spawn_train(tmp_path: Path, name: str, out: Path, **kw) -> list[dict]:
    results = tmp_path / name
    results.mkdir()
    _spawn(_train_worker, str(out), kw.get("resume", False), kw.get("stop_after"), str(results))
    return [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=RTOL, abs=1e-7)


def test_two_rank_sharded_run_equals_one_process_resumes_and_evaluates(tmp_path):
    from cetnet.train.checkpoint import LAST
    from cetnet.train.rundir import read_json
    from cetnet.train.runner import evaluate_run

    with _one_thread():
        one = _train(_config(), tmp_path / "one")

    out = tmp_path / "two"
    first = _spawn_train(tmp_path, "first", out, stop_after=2)
    folders = {p.name.rsplit("-", 1)[0]: p for p in (out / "tables").iterdir()}
    assert sorted(folders) == ["best-e2", "last-e1", "last-e2"]  # each with its write's token
    assert all((folders[n] / ".metadata").is_file() for n in ("last-e1", "last-e2"))
    # a last.pt whose tables folder is gone: the resume falls back to last.prev.pt (epoch 1)
    import shutil

    shutil.rmtree(folders["last-e2"])
    second = _spawn_train(tmp_path, "second", out, resume=True)

    two = read_json(out / "metrics.json")
    ref = one["metrics"]
    assert two["world_size"] == WORLD
    plan = two["embedding_plan"]  # 2 members x (5 pooled + 1 sequence) tables
    assert sorted(plan) == sorted(f"m{k}_{t}" for k in (0, 1)
                                  for t in ("f0", "f1", "f2", "f3", "f4", "s0"))
    assert all(p["sharding"] in ("table_wise", "row_wise", "column_wise")
               and set(p["ranks"]) <= {0, 1} for p in plan.values()), plan
    assert [h["epoch"] for h in two["history"]] == [1, 2, 3]
    for h2, h1 in zip(two["history"], ref["history"]):
        assert _close(h2["train_loss"], h1["train_loss"]), (h2["train_loss"], h1["train_loss"])
        assert _close(h2["valid"]["fused"]["auc"], h1["valid"]["fused"]["auc"])
    for m in ("auc", "gauc", "logloss"):
        assert _close(two["fused"][m], ref["fused"][m]), (m, two["fused"][m], ref["fused"][m])
    # the tables after every epoch: the same on both ranks, equal to the 1-process run's
    assert sorted(second[0]["tables"]) == [2, 3]
    for epoch, ranks in ((1, first), (2, first), (2, second), (3, second)):
        for k, v in ranks[0]["tables"][epoch].items():
            assert torch.equal(v, ranks[1]["tables"][epoch][k])
            assert torch.allclose(v, one["tables"][epoch][k], rtol=RTOL, atol=1e-7), \
                (epoch, k, float((v - one["tables"][epoch][k]).abs().max()))
    # one process reads the 2-rank checkpoint (DCP: its shards into whole tables)
    again = evaluate_run(out, write=False)
    for m in ("auc", "gauc", "logloss"):
        assert again["fused"][m] == pytest.approx(two["fused"][m], rel=1e-6)
    last = evaluate_run(out, checkpoint=LAST, write=False)
    assert last["epoch"] == 3
    # export (torch.export cannot trace TorchRec's lookups): the tables go into a fused
    # front, and the program predicts as the TorchRec model does
    from cetnet import serve

    program = serve.load_exported(serve.export_run(out, tmp_path / "m.pt2"))
    run = serve.load_run(out)
    test = run.dataset.splits["test"]
    for rows in (1, 7, len(test)):
        batch = test.take(torch.arange(rows))
        with torch.no_grad():
            served = program.module()(*serve.batch_inputs(batch))
            eager = run.model(batch)
        torch.testing.assert_close(served["prob"], eager.prob, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(served["logits"], eager.logits, rtol=1e-4, atol=1e-5)
    # a shard file gone (its .metadata still there): one CheckpointError naming the folder
    from cetnet.train.checkpoint import CheckpointError

    from cetnet.train.checkpoint import load_checkpoint

    folder = load_checkpoint(out / "best.pt")["tables"]  # tables/best-e<best epoch>-<token>
    shards = list((out / folder).glob("*.distcp"))
    assert shards
    for shard_file in shards:
        shard_file.unlink()
    with pytest.raises(CheckpointError, match=rf"{folder}: cannot load the tables \("):
        evaluate_run(out, write=False)


def _kdef_config() -> dict:
    cfg = _config()
    cfg["train"]["epochs"] = 1
    cfg["model"].update(ensemble="kdef")
    return cfg


def _kdef_worker(rank: int, port: int, out: str, results: str) -> None:
    _env(rank, port)
    torch.save(_train(_kdef_config(), Path(out)), Path(results, f"rank{rank}.pt"))


def test_a_two_rank_sharded_kdef_run_equals_one_process(tmp_path):
    """KDEF's exam scores are taken over the ranks' shares with TorchRec's tables too (the
    sharded path never went through data_parallel, which set them for the fused embedding
    only: the ranks' tables were ~1e-4 off the one-process run's)."""
    with _one_thread():
        one = _train(_kdef_config(), tmp_path / "one")
    results = tmp_path / "kdef"
    results.mkdir()
    _spawn(_kdef_worker, str(tmp_path / "two"), str(results))
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    two = ranks[0]["metrics"]
    for m in ("auc", "logloss"):
        assert _close(two["fused"][m], one["metrics"]["fused"][m]), m
    assert _close(two["history"][0]["train_loss"], one["metrics"]["history"][0]["train_loss"])
    for k, v in ranks[0]["tables"][1].items():
        assert torch.allclose(v, one["tables"][1][k], rtol=RTOL, atol=1e-7), \
            (k, float((v - one["tables"][1][k]).abs().max()))


def test_resume_on_another_world_size(tmp_path):
    # One process trains epoch 1, two ranks resume it for epoch 2, one process finishes: DCP
    # reshards the tables and the fused optimizer's state on load, and the run equals the
    # uninterrupted one-process run (the ranks' shares concatenate to its batches).
    with _one_thread():
        one = _train(_config(), tmp_path / "one")
        out = tmp_path / "run"
        _train(_config(), out, stop_after=1)
        two = _spawn_train(tmp_path, "two", out, resume=True, stop_after=2)
        rest = _train(_config(), out, resume=True)
    assert sorted(two[0]["tables"]) == [2] and sorted(rest["tables"]) == [3]
    for k, v in two[0]["tables"][2].items():  # the two ranks agree (whole tables gathered)
        assert torch.equal(v, two[1]["tables"][2][k]), k
    metrics, ref = rest["metrics"], one["metrics"]
    assert metrics["world_size"] == 1
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    for h, h1 in zip(metrics["history"], ref["history"]):
        assert _close(h["train_loss"], h1["train_loss"]), (h["epoch"], h["train_loss"],
                                                           h1["train_loss"])
        assert _close(h["valid"]["fused"]["auc"], h1["valid"]["fused"]["auc"]), h["epoch"]
    for m in ("auc", "gauc", "logloss"):
        assert _close(metrics["fused"][m], ref["fused"][m]), m
    for epoch, tables in ((2, two[0]["tables"]), (3, rest["tables"])):
        for k, v in tables[epoch].items():
            assert torch.allclose(v, one["tables"][epoch][k], rtol=RTOL, atol=1e-7), \
                (epoch, k, float((v - one["tables"][epoch][k]).abs().max()))


def test_one_process_run_overwrite_and_the_model_after_fit(tmp_path):
    """A 1-process TorchRec run: --overwrite replaces it (tables/ included), and the model
    ``fit`` leaves behind predicts without the run's private process group, as the
    checkpoint does."""
    import torch.distributed as dist

    from cetnet.train.evaluate import evaluate
    from cetnet.train.runner import evaluate_run, run_training

    cfg = _config()
    cfg["train"]["epochs"] = 1
    out = tmp_path / "run"
    run_training(cfg, out, quiet=True, plots=False)
    assert (out / "tables").is_dir()
    from cetnet.train import runner

    models = []
    build = runner._build
    runner._build = lambda c, s: models.append(build(c, s)) or models[-1]
    try:
        _, metrics = run_training(cfg, out, overwrite=True, quiet=True, plots=False)
    finally:
        runner._build = build
    assert not dist.is_initialized()
    dataset = _model_and_data(cfg)[0]
    after = evaluate(models[0], dataset.splits["test"], batch_size=256)
    assert after["fused"]["auc"] == pytest.approx(metrics["fused"]["auc"], rel=1e-6)
    again = evaluate_run(out, write=False)
    assert again["fused"]["auc"] == pytest.approx(metrics["fused"]["auc"], rel=1e-6)
    # export checks the fused twin it traces: tables left behind are an error, not a program
    from cetnet import serve
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront

    tables_into = TorchRecEmbeddingFront.tables_into
    TorchRecEmbeddingFront.tables_into = lambda self, front: None  # type: ignore[method-assign]
    try:
        with pytest.raises(ConfigError, match="the fused twin of the TorchRec model predicts "
                                              "otherwise"):
            serve.export_run(out, tmp_path / "m.pt2")
        from cetnet.cli import main  # the command: one line, status 2

        assert main(["export", str(out), str(tmp_path / "m.pt2")]) == 2
    finally:
        TorchRecEmbeddingFront.tables_into = tables_into  # type: ignore[method-assign]
    assert not (tmp_path / "m.pt2").exists()


def test_an_epoch_trained_again_never_replaces_a_folder_a_checkpoint_names(tmp_path,
                                                                          monkeypatch):
    """A resume that falls back to last.prev.pt trains an epoch again: its tables went into
    the folder of the same name, which last.pt of the first attempt still named, so a later
    resume paired that attempt's dense weights with the other attempt's tables (0.107 apart
    in the reviewer's run). Every write is a folder of its own now."""
    from cetnet.train import checkpoint, loop, sharded

    cfg = _config()
    out = tmp_path / "run"
    _train(cfg, out, stop_after=2)
    first = checkpoint.load_checkpoint(out / "last.pt")["tables"]
    (out / first / ".metadata").unlink()  # last.pt's folder incomplete: resumes fall back
    files = {p.name: p.read_bytes() for p in (out / first).iterdir()}

    def lost(*args, **kwargs):  # the second attempt dies before its last.pt is written
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "save_last", lost)
    with pytest.raises(KeyboardInterrupt):
        _train({**cfg, "train": {**cfg["train"], "lr": 0.002}}, out, resume=True)
    monkeypatch.undo()
    epoch2 = [p.name for p in (out / sharded.TABLES_DIR).iterdir()
              if p.name.split("-")[:2] == ["last", "e2"]]
    assert len(epoch2) == 2, epoch2  # the first attempt's and the second's
    assert {p.name: p.read_bytes() for p in (out / first).iterdir()} == files  # untouched
    warned: list[str] = []
    _, path = checkpoint.load_last(out, warn=warned.append)
    assert path.name == checkpoint.LAST_PREV and "incomplete" in warned[0]  # not paired


def test_mixed_member_dims_with_sequences_match_the_fused_front():
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront

    cfg = _config()
    cfg["embedding"] = "cetnet"
    cfg["model"]["embedding_dim"] = [8, 4]
    dataset, fused = _model_and_data(cfg)
    front = TorchRecEmbeddingFront.from_front(fused.front)
    assert sorted(front.sequence_tables) == ["d4", "d8"]  # one collection per dim
    emb = fused.front.embedding
    with torch.no_grad():
        for k in range(2):
            for i, f in enumerate(front.fields):
                front.tables.embedding_bags[front.key(k, i)].weight.copy_(emb.table(k, f.name))
            for i, f in enumerate(front.sequences):
                front.sequence_tables[f"d{front.dims[k]}"].embeddings[
                    front.key(k, i, "s")].weight.copy_(emb.table(k, f.name))
    batch = dataset.splits["train"].take(slice(0, 50))
    for got, want in zip(front(batch), fused.front(batch)):
        assert torch.allclose(got.fields, want.fields, atol=1e-6)
        for n in want.sequences:
            assert torch.equal(got.sequences[n], want.sequences[n])


@pytest.mark.parametrize("dims, shared", [([8, 4], False), ([4, 4], True)])
def test_torchrec_tables_copied_into_the_fused_front_look_up_alike(dims, shared):
    """tables_into: the TorchRec front's tables in a fused front (what export needs), mixed
    dims with sequences, and one shared set; a front of other dims is refused."""
    cfg = _config()
    cfg["model"]["embedding_dim"] = dims
    if shared:
        cfg["model"].update(ensemble="kdef", shared_embedding=True)
    dataset, torchrec_model = _model_and_data(cfg)
    _, fused = _model_and_data({**cfg, "embedding": "cetnet"})
    front = torchrec_model.front
    assert front.num_sets == (1 if shared else 2)
    torchrec_model.front.tables_into(fused.front)
    batch = dataset.splits["train"].take(slice(0, 50))
    with torch.no_grad():
        for got, want in zip(fused.front(batch), front(batch)):
            assert torch.allclose(got.fields, want.fields, atol=1e-6)
            for n in want.sequences:
                assert torch.equal(got.sequences[n], want.sequences[n])
    _, other = _model_and_data({**cfg, "embedding": "cetnet",
                                "model": {**cfg["model"],
                                          "embedding_dim": [8, 8] if shared else [4, 8]}})
    with pytest.raises(ValueError, match="tables_into: the fronts differ"):
        front.tables_into(other.front)


# -- errors -------------------------------------------------------------------------------

def test_row_wise_pooled_tables_on_a_cpu_are_one_error():
    from cetnet.train import sharded

    _, model = _model_and_data(_config())
    with pytest.raises(ConfigError, match=r"train.embedding_sharding=row_wise: TorchRec does "
                                          r"not shard pooled .* on cpu"):
        sharded.shard(model, torch.device("cpu"), "row_wise")
    import torch.distributed as dist

    assert not dist.is_initialized()  # no process group left behind


def test_dry_run_refuses_a_sharding_torchrec_does_not_offer_here(tmp_path, capsys):
    """--dry-run checks the sharding as the run would (before, it said all was well and the
    run failed when it built DistributedModelParallel)."""
    from cetnet.cli import main
    from cetnet.config import dump_config

    cfg = _config()
    cfg["train"]["embedding_sharding"] = "row_wise"
    dump_config(cfg, tmp_path / "c.yaml")
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cetnet train: error: config: train.embedding_sharding=row_wise: "
                          "TorchRec does not shard pooled"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()
    cfg["train"]["embedding_sharding"] = "table_wise"
    dump_config(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--dry-run"]) == 0


def test_torchrec_needs_a_fused_embedding_optimizer():
    cfg = _config()
    cfg["model"]["embedding_optimizer"] = None
    with pytest.raises(ConfigError, match="embedding: torchrec needs a fused embedding "
                                          "optimizer"):
        _model_and_data(cfg)


def test_torchrec_refuses_the_fused_embeddings_bounds_check_option():
    cfg = _config()
    cfg["model"]["embedding_bounds_check"] = "off"
    with pytest.raises(ConfigError, match="model.embedding_bounds_check applies to the fused"):
        _model_and_data(cfg)


def test_an_unknown_embedding_or_sharding_is_one_error():
    from cetnet.config import validate_config

    with pytest.raises(ConfigError, match="embedding"):
        validate_config({**_config(), "embedding": "fbgemm"})
    cfg = _config()
    cfg["train"]["embedding_sharding"] = "grid"
    with pytest.raises(ConfigError, match="train.embedding_sharding"):
        validate_config(cfg)


def test_a_fused_checkpoint_does_not_load_into_a_torchrec_model(tmp_path):
    from cetnet.train.checkpoint import CheckpointError
    from cetnet.train.sharded import load_model_state

    cfg = _config()
    cfg["embedding"] = "cetnet"
    _, fused = _model_and_data(cfg)
    _, model = _model_and_data(_config())
    with pytest.raises(CheckpointError, match="names no tables folder"):
        load_model_state(model, {"model": fused.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="holds TorchRec tables"):
        load_model_state(fused, {"model": {}, "tables": "tables/best-e1"}, tmp_path / "best.pt")


def test_a_tables_folder_that_cannot_be_written_is_one_error_line(tmp_path, monkeypatch,
                                                                  capsys):
    """DCP wraps a write failure (a full disk) in its CheckpointException, a BaseException:
    it went past every handler as a traceback with exit status 1. It is now one line naming
    the folder, exit status 2, as when last.pt cannot be written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from cetnet.cli import main
    from cetnet.config import dump_config

    def full_disk(*args, **kwargs):
        raise CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    cfg = _config()
    cfg["train"].update(epochs=1, max_steps_per_epoch=2)
    path = tmp_path / "c.yaml"
    dump_config(cfg, path)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet",
                 "--no-plots"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cetnet train: error")]
    assert len(lines) == 1 and "cannot write the tables (OSError: [Errno 28] No space" in lines[0]
    assert "Traceback" not in err


def test_a_rank_lost_while_tables_load_is_not_called_a_bad_checkpoint(tmp_path, monkeypatch):
    """A collective failure inside DCP's load (another rank died) was reported as "cannot load
    the tables", a CheckpointError, which a job would take for a damaged run and start over;
    it now reaches the runner, which says a rank failed. A real load failure is still one."""
    import torch.distributed.checkpoint as dcp

    from cetnet.train.checkpoint import CheckpointError
    from cetnet.train.sharded import load_tables

    _, model = _model_and_data(_config())
    folder = tmp_path / "tables" / "last-e1"
    folder.mkdir(parents=True)

    def lost(*args, **kwargs):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection reset by peer")

    monkeypatch.setattr(dcp, "load", lost)
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        load_tables(model, folder)

    def bad(*args, **kwargs):
        raise ValueError("Missing key in checkpoint state_dict: tables.front.x")

    monkeypatch.setattr(dcp, "load", bad)
    with pytest.raises(CheckpointError, match="cannot load the tables \\(ValueError: Missing"):
        load_tables(model, folder)
