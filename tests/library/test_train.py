"""cetnet.train: fit, early stopping, the run directory, checkpoints and exact resume, the lr
schedule (and the warning of a warm-up as long as the run).

The dataset and model come from the ``train_config`` fixture (tests/conftest.py)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import cetnet_kernels
from cetnet.train import BEST, LAST, LRSchedule, load_checkpoint, run_training, save_checkpoint
from cetnet.train.rundir import read_json

METRIC_KEYS = {"auc", "gauc", "logloss"}
TIMING_KEYS = ("train_seconds", "train_samples_per_s")


def test_fit_learns_and_writes_the_run_directory(train_config, tmp_path):
    run_dir, metrics = run_training(train_config(epochs=3), tmp_path / "run", quiet=True)
    for name in ("config.yaml", "metrics.json", BEST, LAST, "curves.png", "members_auc.png"):
        assert (run_dir / name).is_file(), name
    on_disk = read_json(run_dir / "metrics.json")
    assert set(on_disk["fused"]) == METRIC_KEYS
    members = on_disk["members"]
    assert list(members) == ["dnn", "dcnv2"]
    assert all(set(m) == METRIC_KEYS for m in members.values())
    assert set(on_disk["fusion_weights"]) == set(members)
    assert sum(on_disk["fusion_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert on_disk["train_samples_per_s"] > 0 and on_disk["train_samples"] > 0
    history = on_disk["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(set(h["valid"]["fused"]) == METRIC_KEYS for h in history)
    # it learns the planted signal
    assert history[-1]["valid"]["fused"]["logloss"] < history[0]["valid"]["fused"]["logloss"]
    assert on_disk["fused"]["auc"] > 0.6 and on_disk["fused"]["gauc"] > 0.55
    best = max(history, key=lambda h: h["valid"]["fused"]["auc"])
    assert on_disk["best_epoch"] == best["epoch"] and on_disk["valid"] == best["valid"]


def test_early_stopping_on_a_flat_validation_auc(train_config, tmp_path):
    # lr 0: nothing changes, so the validation AUC never improves after epoch 1
    _, metrics = run_training(train_config(epochs=10, lr=0.0, patience=2), tmp_path / "run",
                              quiet=True, plots=False)
    assert metrics["stopped_early"] is True
    assert metrics["epochs_completed"] == 3 and metrics["best_epoch"] == 1


def test_max_steps_per_epoch_caps_training(train_config, tmp_path):
    cfg = train_config(epochs=1, max_steps_per_epoch=2, batch_size=64)
    _, metrics = run_training(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["train_samples"] == 128


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


FUSED = pytest.mark.skipif(not cetnet_kernels.build_info()["cpu"],
                           reason="the fused embedding optimizer needs cetnet_kernels._C")


@pytest.mark.parametrize("embedding_optimizer", [None, pytest.param("rowwise_adagrad",
                                                                    marks=FUSED)])
def test_resume_gives_identical_metrics(train_config, tmp_path, embedding_optimizer):
    cfg = train_config(epochs=2, patience=None)  # cosine + warm-up, dropout, shuffling
    if embedding_optimizer is not None:  # its row state must travel in the checkpoint
        cfg["model"]["embedding_optimizer"] = embedding_optimizer
        cfg["backend"] = "auto"
    straight, _ = run_training(cfg, tmp_path / "straight", quiet=True, plots=False)

    class Interrupt(Exception):
        pass

    def interrupt(epoch: int, entry: dict) -> None:
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_training(cfg, tmp_path / "resumed", quiet=True, plots=False,
                     on_epoch_end=interrupt)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert load_checkpoint(tmp_path / "resumed" / LAST)["epoch"] == 1
    resumed, _ = run_training(cfg, tmp_path / "resumed", resume=True, quiet=True, plots=False)

    a, b = read_json(straight / "metrics.json"), read_json(resumed / "metrics.json")
    assert _without_timing(a) == _without_timing(b)  # exact, not approximate
    sa, sb = load_checkpoint(straight / LAST)["model"], load_checkpoint(resumed / LAST)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_without_a_checkpoint_is_an_error(train_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_training(train_config(), tmp_path / "empty", resume=True, quiet=True)


def test_checkpoints_load_with_weights_only(train_config, tmp_path):
    run_dir, _ = run_training(train_config(epochs=1), tmp_path / "run", quiet=True,
                              plots=False)
    last = torch.load(run_dir / LAST, weights_only=True)
    assert {"model", "optimizer", "schedule", "rng", "epoch", "best_metric", "history"} <= \
        set(last)
    assert isinstance(last["rng"]["torch"], torch.Tensor)
    best = torch.load(run_dir / BEST, weights_only=True)
    assert best["epoch"] == 1 and "front.embedding.weight" in best["model"]


def test_progress_bars_show_live_loss_and_auc(train_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are off when not a tty
    run_training(train_config(epochs=1, log_every=2), tmp_path / "run", plots=False)
    captured = capsys.readouterr()
    assert "loss=" in captured.err and "auc=" in captured.err
    assert "epoch 1/1: train loss" in captured.out and "fused" in captured.out


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"w": torch.arange(3), "epoch": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(3), "epoch": 2}, path)
    monkeypatch.undo()
    kept = load_checkpoint(path)
    assert kept["epoch"] == 1 and torch.equal(kept["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["ck.pt"]  # the temp file is gone


def test_lr_schedule_shapes():
    p = torch.nn.Parameter(torch.zeros(1))

    def lrs(kind: str, steps: int, per_epoch: int = 0, metrics=(), **kw) -> list[float]:
        s = LRSchedule(torch.optim.SGD([p], lr=1.0), kind, 1.0, total_steps=steps, **kw)
        out, m = [], iter(metrics)
        for i in range(steps):
            out.append(s.step())
            if per_epoch and (i + 1) % per_epoch == 0:
                s.epoch_end(next(m, 0.5))
        return out

    warm = lrs("constant", 6, warmup_steps=4)
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lrs("cosine", 11, warmup_steps=1, min_lr_ratio=0.1)
    assert cos[1] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * 0.9)))
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    assert lrs("step", 6, per_epoch=2, step_epochs=1, gamma=0.5) == [1, 1, .5, .5, .25, .25]
    plateau = lrs("plateau", 8, per_epoch=2, metrics=[0.6, 0.6, 0.6, 0.6],
                  plateau_factor=0.1, plateau_patience=1)
    assert plateau == pytest.approx([1, 1, 1, 1, 1, 1, 0.1, 0.1])


def test_a_warmup_at_least_the_runs_steps_is_warned_about_at_the_start(train_config, tmp_path,
                                                                         capsys):
    """train.warmup_steps >= epochs x steps per epoch ended the run with the lr still rising,
    without a word: one warning line naming the key and the total, when training starts (not
    for epochs the step cap cuts short: a quick look or a search's warm-up, on purpose)."""
    from cetnet.train.loop import warmup_warning

    t = {"epochs": 3, "warmup_steps": 100, "lr_schedule": "cosine"}
    assert warmup_warning(t, 16) == (
        "train.warmup_steps=100 is at least the run's 48 optimizer steps (3 epoch(s) x 16): the "
        "learning rate is still warming up when training ends (it reaches train.lr at the last "
        "step at best) (no cosine decay); lower train.warmup_steps")
    assert warmup_warning({**t, "warmup_steps": 48}, 16) is not None  # full lr at the last step
    assert warmup_warning({**t, "warmup_steps": 47}, 16) is None
    assert warmup_warning({**t, "warmup_steps": 0}, 16) is None
    assert "cosine" not in warmup_warning({**t, "lr_schedule": "constant"}, 16)
    # 2400 train rows in batches of 600: 4 steps
    for warmup, capped, warned in ((100, None, True), (4, None, True), (3, None, False),
                                   (100, 2, False), (100, 4, True)):
        cfg = train_config(epochs=1, batch_size=600, warmup_steps=warmup,
                           max_steps_per_epoch=capped)
        _, metrics = run_training(cfg, tmp_path / f"run{warmup}-{capped}", quiet=True,
                                  plots=False)
        err = capsys.readouterr().err
        steps = 2 if capped == 2 else 4
        line = (f"warning: train.warmup_steps={warmup} is at least the run's {steps} optimizer "
                f"steps (1 epoch(s) x {steps})")
        assert err.count(line) == (1 if warned else 0), (warmup, capped, err)
        assert err.count("warning:") == err.count(line)  # nothing else, and once
        assert metrics["warnings"] == []  # said when training starts, not a result's warning


def test_a_resume_with_more_epochs_continues_on_the_longer_cosine():
    """What the README says of `--resume --epochs N`: the schedule of the new total, so the
    lr goes up where the run resumes (not the run of N epochs from the start)."""
    p = torch.nn.Parameter(torch.zeros(1))
    short = LRSchedule(torch.optim.SGD([p], lr=1.0), "cosine", 1.0, total_steps=10)
    for _ in range(5):
        short.step()
    longer = LRSchedule(torch.optim.SGD([p], lr=1.0), "cosine", 1.0, total_steps=20)
    longer.load_state_dict(short.state_dict())
    assert short.lr() == pytest.approx(0.5) and longer.lr() == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 5 / 20))) and longer.lr() > short.lr()


def test_a_one_row_remainder_batch_is_skipped_with_batch_norm(train_config, tmp_path):
    cfg = train_config(epochs=1, batch_size=2399, warmup_steps=0)  # 2400 train rows: 2399 + 1
    cfg["model"]["members"] = ["dnn"]
    cfg["model"]["dnn"] = {"hidden": [16], "batch_norm": True}
    _, metrics = run_training(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["train_samples"] == 2399


@pytest.mark.parametrize("name", ["base_lr", "min_lr_ratio", "gamma", "plateau_factor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True])
def test_lr_schedule_refuses_non_finite_rates(name, bad):
    p = torch.nn.Parameter(torch.zeros(1))
    kwargs = {"base_lr": 1.0, name: bad}
    with pytest.raises(ValueError, match=f"LRSchedule: {name} must be a finite number >= 0"):
        LRSchedule(torch.optim.SGD([p], lr=1.0), "cosine", kwargs.pop("base_lr"),
                   total_steps=10, **kwargs)


def test_a_gpu_run_skips_the_embedding_check_its_splits_made(train_config):
    """On a CUDA device, fit() runs its steps with bounds checking off in the fused embeddings
    whose ids its Splits have checked (the default check could never fire there, and on a GPU
    it is a synchronization per lookup), and puts the model's setting back afterwards, also
    when the block raises. Anything else keeps its check: an explicit
    model.embedding_bounds_check, a CPU device, a split that is not a cetnet Split, an
    embedding with another vocabulary size than the splits' or another mode than "error".
    (The context only sets a module attribute: tested here with a CUDA device object.)"""
    from cetnet.data import load_dataset
    from cetnet.models import build_model
    from cetnet.train.loop import ids_checked_by_the_splits
    from cetnet_kernels import MultiTableEmbedding

    cfg = train_config()
    data = dict(cfg["data"])
    dataset = load_dataset(data.pop("name"), **data)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def checks(model):
        return [m.bounds_check for m in model.modules() if isinstance(m, MultiTableEmbedding)]

    def inside(model, config=cfg, splits=dataset.splits, device=cuda):
        with ids_checked_by_the_splits(model, config, splits, device):
            return checks(model)

    model = build_model(cfg["model"], dataset.schema, backend="reference")
    assert checks(model) == ["error"]
    assert inside(model) == ["off"] and checks(model) == ["error"]
    with pytest.raises(RuntimeError, match="boom"):
        with ids_checked_by_the_splits(model, cfg, dataset.splits, cuda):
            raise RuntimeError("boom")
    assert checks(model) == ["error"]
    explicit = {**cfg, "model": {**cfg["model"], "embedding_bounds_check": "error"}}
    assert inside(model, config=explicit) == ["error"]
    assert inside(model, device=cpu) == ["error"]

    class OwnSplit:  # a registered dataset's own split: batches() and a length only
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split)

        def batches(self, *a, **kw):
            return self.split.batches(*a, **kw)

    own = {**dataset.splits, "valid": OwnSplit(dataset.splits["valid"])}
    assert inside(model, splits=own) == ["error"]
    emb = next(m for m in model.modules() if isinstance(m, MultiTableEmbedding))
    emb.bounds_check = "warn"
    assert inside(model) == ["warn"]
    other = train_config()
    other["data"] = {**other["data"], "num_items": 150}  # other vocabulary sizes
    data = dict(other["data"])
    bigger = load_dataset(data.pop("name"), **data)
    model = build_model(cfg["model"], bigger.schema, backend="reference")
    assert inside(model) == ["error"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_default_cuda_training_step_never_waits_for_the_device(tmp_path, train_config):
    """A default `cetnet train` run on a GPU (fused embedding with row-wise Adagrad, CETNet
    head, Adam) waits for the device at set-up, evaluation and checkpoints, not at every step:
    under CUDA's sync debug mode ('warn': a warning per synchronizing call), a run of 12 steps
    warns as often as one of 4 (everything else being the same)."""
    import warnings

    def waits(steps: int) -> int:
        cfg = train_config(epochs=1, max_steps_per_epoch=steps, log_every=10**6)
        cfg.update(device="cuda", backend="auto")
        cfg["model"]["embedding_optimizer"] = "rowwise_adagrad"
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_training(cfg, tmp_path / f"run{steps}", quiet=True, plots=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in seen)

    waits(2)  # (first run in the process: kernels loaded, caches filled, once)
    few, many = waits(4), waits(12)
    assert many == few, f"{many - few} waits in 8 more steps"


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_training_run_reads_the_device_no_more_in_12_steps_than_in_4(tmp_path, train_config,
                                                                       backend):
    """The CPU suite's view of the GPU test above: what a run dispatches that would make a GPU
    host wait (tests/helpers.py: value reads, boolean masks, nonzero, copies to the host,
    tolist ...), outside the data pipeline (its tensors stay on the host in a GPU run), is the
    same for 12 steps as for 4: no step waits. On the C++ kernels and on the Triton ones
    (interpreted here, the host code a GPU runs), bounds check off as a GPU run has it."""
    from cetnet_kernels import available_backends
    from helpers import synchronizing_ops

    if backend != "auto" and backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not available on the CPU here")

    def waits(steps: int) -> list[str]:
        cfg = train_config(epochs=1, max_steps_per_epoch=steps, log_every=10**6)
        cfg["backend"] = backend
        cfg["model"].update(embedding_optimizer="rowwise_adagrad", embedding_bounds_check="off")
        return synchronizing_ops(
            lambda: run_training(cfg, tmp_path / f"run{steps}", quiet=True, plots=False),
            host_code=("cetnet/data/",))

    # (first run in the process: caches filled once, e.g. the layout constants the Triton ops
    # upload; eager Triton calls run below the dispatcher, so the mode sees their inner ops)
    waits(2)
    few, many = waits(4), waits(12)
    assert sorted(many) == sorted(few), [op for op in many if many.count(op) > few.count(op)]


def test_batch_size_one_trains_every_step_of_a_model_without_batch_norm(train_config, tmp_path):
    # a remainder batch of one row is skipped only for BatchNorm, which cannot train on it:
    # with batch_size 1 every step was skipped after the first (one row trained per epoch)
    cfg = train_config(epochs=1, batch_size=1, max_steps_per_epoch=20)
    _, metrics = run_training(cfg, tmp_path / "run", quiet=True, plots=False)
    assert metrics["train_samples"] == 20


def _with_batch_norm(cfg: dict) -> dict:
    for member in ("dnn", "dcnv2"):
        cfg["model"][member]["batch_norm"] = True
    return cfg


def test_a_one_row_remainder_batch_is_trained_unless_the_model_has_batch_norm(train_config,
                                                                            tmp_path):
    # one batch of the whole split gives its size; one row less as the batch size leaves a
    # remainder batch of one row
    _, first = run_training(train_config(epochs=1, batch_size=4096), tmp_path / "all",
                            quiet=True, plots=False)
    rows = first["train_samples"]
    cfg = train_config(epochs=1, batch_size=rows - 1)
    _, plain = run_training(cfg, tmp_path / "plain", quiet=True, plots=False)
    assert plain["train_samples"] == rows
    _, normed = run_training(_with_batch_norm(train_config(epochs=1, batch_size=rows - 1)),
                             tmp_path / "bn", quiet=True, plots=False)
    assert normed["train_samples"] == rows - 1


def test_batch_norm_with_one_row_a_batch_is_one_config_error(train_config, tmp_path):
    from cetnet.config import ConfigError
    from cetnet.train.runner import check_run

    cfg = _with_batch_norm(train_config(epochs=1, batch_size=1))
    for attempt in (lambda: check_run(cfg, tmp_path / "dry"),
                    lambda: run_training(cfg, tmp_path / "run", quiet=True, plots=False)):
        with pytest.raises(ConfigError, match=r"train.batch_size = 1 .*BatchNorm.*>= 2"):
            attempt()
    assert not (tmp_path / "run" / LAST).exists()


def test_batch_norm_with_a_one_row_train_split_is_refused_before_training():
    # the first batch is never skipped: a one-row split failed with torch's BatchNorm error
    from cetnet.models.layers import MLP
    from cetnet.train.loop import TrainingError, check_batch_rows

    model = MLP(3, [4], 1, batch_norm=True)
    check_batch_rows(model, 8, 1, train_rows=2)
    with pytest.raises(TrainingError, match="the train split has 1 row.*BatchNorm"):
        check_batch_rows(model, 8, 1, train_rows=1)
    with pytest.raises(TrainingError, match="3 row.*on each of the 2 ranks"):
        check_batch_rows(model, 8, 2, train_rows=3)
    check_batch_rows(MLP(3, [4], 1), 1, 1, train_rows=1)  # no BatchNorm: any row count


def test_the_train_loss_of_a_sum_reduction_is_a_mean_per_row(train_config, tmp_path):
    # lr 0: both runs score the same model; the sum loss was reported batch_size times larger
    losses = []
    for reduction in ("mean", "sum"):
        cfg = train_config(epochs=1, lr=0.0, batch_size=64, max_steps_per_epoch=5)
        cfg["model"]["fusion"]["reduction"] = reduction
        _, metrics = run_training(cfg, tmp_path / reduction, quiet=True, plots=False)
        losses.append(metrics["history"][0]["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
