"""``cetnet search --system``: the system settings of one fixed model, tuned for throughput.

CubicML (Meta) fits an ML model that predicts the training throughput of a job's system
settings from a few measured runs, and lets a search pick the settings it predicts fastest.
Here the model is the dataset config's (the paper's CETNet pair on MovieLens-100k, or ``--set``
overrides of it); a trial samples

- ``train.batch_size`` (256 ... 4096),
- ``threads``: torch's intra-op threads (1 ... the CPU count),
- ``backend``: ``auto`` (cetnet's fused kernels) or ``reference`` (plain PyTorch),
- ``model.embedding_optimizer``: ``rowwise_adagrad``, ``sgd`` or ``null`` (a dense gradient
  trained by Adam; the only choice of the reference backend, which has no fused optimizer),

and **measures** them on the config's device: ``steps`` training steps as the training loop
takes them (forward, backward with the fused update, ``train.grad_clip``, Adam) on a ring of
real batches after ``warmup`` untimed ones, as training samples per second, the median of
:data:`REPEATS` such runs.
The trials run in an Optuna study with the predictor-guided sampler
(:mod:`cetnet.search.predictor`): after a few random trials an ensemble of small MLPs, fit to
the measured log-throughputs, proposes the settings it predicts fastest (CubicML's loop).
Each proposal's prediction is recorded next to its measurement, and the report gives their
rank correlation: how far the predictor can be trusted.

Changing the embedding optimizer or the batch size changes what the model learns, not only
its speed: the report gives throughput, and the chosen settings deserve a training run
(``best_system.yaml``) before they are adopted.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from cetnet import code_identity as code_id

__all__ = ["SYSTEM_SPACE", "REPEATS", "STEPS", "WARMUP", "sample_system", "measure_repeats",
           "measure_throughput", "run_system_search"]

#: The system settings a trial samples (see the module docstring).
SYSTEM_SPACE: dict[str, list] = {
    "train.batch_size": [256, 512, 1024, 2048, 4096],
    "backend": ["auto", "reference"],
    "model.embedding_optimizer": ["rowwise_adagrad", "sgd", "null"],
}
#: Timed runs of ``steps`` steps per measurement, of which the median counts: on a shared
#: machine one run of 12 steps moves by tens of percent (the warm-up and the build are paid
#: once, so each repeat costs only its steps).
REPEATS = 3
#: Timed steps per run and untimed steps before the first, of each trial's measurement.
STEPS, WARMUP = 12, 3
#: How a trial is measured, recorded in the study's setup: 2 is the training loop's step
#: (gradient clipping included), the median of :data:`REPEATS` runs; 1 (a study saved
#: without it) one run without clipping. A study measured otherwise is not resumed: the
#: predictor would fit the two measures as one.
MEASUREMENT = 2


def batch_sizes(train_rows: int) -> list[int]:
    """The batch sizes of :data:`SYSTEM_SPACE` that fit in the train split (at least one full
    batch to time)."""
    return [b for b in SYSTEM_SPACE["train.batch_size"] if b <= train_rows]


def sample_system(trial: Any, base: Mapping[str, Any], train_rows: int,
                  max_threads: int | None = None) -> tuple[dict, int]:
    """``(config, threads)`` of one trial: ``base`` with the sampled settings."""
    config = copy.deepcopy(dict(base))
    batch = trial.suggest_categorical("train.batch_size", batch_sizes(train_rows))
    cpus = max(1, max_threads or os.cpu_count() or 1)
    threads = trial.suggest_int("threads", 1, cpus) if cpus > 1 else 1
    backend = trial.suggest_categorical("backend", SYSTEM_SPACE["backend"])
    optimizer = "null" if backend == "reference" else trial.suggest_categorical(
        "model.embedding_optimizer", SYSTEM_SPACE["model.embedding_optimizer"])
    config["train"] = {**config["train"], "batch_size": int(batch)}
    config["backend"] = backend
    config["model"] = {**config["model"],
                       "embedding_optimizer": None if optimizer == "null" else optimizer}
    return config, int(threads)


def measure_repeats(config: dict, dataset: Any, threads: int, *, steps: int = STEPS,
                    warmup: int = WARMUP, ring: int = 4, repeats: int = REPEATS) -> list[float]:
    """Training samples per second of ``config``'s model, ``repeats`` times: each ``steps``
    timed steps, after ``warmup`` untimed ones (once), on a ring of ``ring`` real batches of
    ``train.batch_size``, with ``threads`` torch threads (restored after). The model and the
    batches are on the config's device (``device``, resolved as training resolves it), and a
    step is the training loop's: forward, backward (with the embedding's fused update),
    ``train.grad_clip``, Adam."""
    from torch import nn

    from cetnet.train import build_model
    from cetnet.train.loop import check_backend, dense_optimizer, resolve_device

    batch_size = config["train"]["batch_size"]
    clip = config["train"].get("grad_clip")
    split = dataset.splits["train"]
    batches = []
    for b in split.batches(batch_size, shuffle=True, seed=0):
        if len(b) == batch_size:
            batches.append(b)
        if len(batches) == ring:
            break
    if not batches:
        raise ValueError(f"system search: the train split has fewer than train.batch_size="
                         f"{batch_size} rows")
    # the device the settings will train on: measured on the CPU, a best_system.yaml that
    # trains on a GPU would have been tuned for the wrong machine
    device = resolve_device(config.get("device", "auto"))
    check_backend(config["backend"], device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model(config["model"], dataset.schema, backend=config["backend"])
        model.to(device)
        model.train()
        params = list(model.dense_parameters())
        optimizer = dense_optimizer(params, config["train"]["lr"],
                                    config["train"]["weight_decay"])

        def step(i: int) -> None:  # as EpochRunner.train's step (its bookkeeping aside)
            batch = batches[i % len(batches)].to_device(device)  # copied every step, as there
            loss, _ = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # also applies the embedding's fused optimizer, if any
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()

        for i in range(warmup):
            step(i)
        speeds = []
        for _ in range(repeats):  # the median of a few: one burst of another job moves one
            _synchronize(device)
            start = time.perf_counter()
            for i in range(steps):
                step(i)
            _synchronize(device)  # a CUDA step has only been queued when step() returns
            speeds.append(steps * batch_size / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return speeds


def measure_throughput(config: dict, dataset: Any, threads: int, *, steps: int = STEPS,
                       warmup: int = WARMUP, ring: int = 4, repeats: int = REPEATS) -> float:
    """The median of :func:`measure_repeats`: training samples per second of ``config``."""
    return statistics.median(measure_repeats(config, dataset, threads, steps=steps,
                                             warmup=warmup, ring=ring, repeats=repeats))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(speeds: list[float]) -> str:
    """``"3 runs, 5,812-6,104"``: the measurements a trial's median is of."""
    return f"{len(speeds)} run{'s' if len(speeds) > 1 else ''}, " \
        f"{min(speeds):,.0f}-{max(speeds):,.0f}"


def _write_report(study: Any, out: Path, command: str) -> dict:
    from optuna.trial import TrialState

    from cetnet.atomic import write_text_atomic
    from cetnet.config import dump_config
    from cetnet.search.report import rank_correlation

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = sorted({n for t in done for n in t.params})
    # a trial of a study measured before the repeats has one measurement, no list
    runs = {t.number: t.user_attrs.get("samples_per_s_repeats") or [] for t in done}
    lines = ["number," + ",".join(names) + ",samples_per_s,predicted_samples_per_s,"
             "runs,min_samples_per_s,max_samples_per_s"]
    for t in done:
        pred = t.user_attrs.get("predicted_value")
        r = runs[t.number]
        lines.append(",".join([str(t.number), *(str(t.params.get(n, "")) for n in names),
                               f"{t.user_attrs['samples_per_s']:.1f}",
                               "" if pred is None else f"{math.exp(pred):.1f}",
                               str(len(r)) if r else "",
                               f"{min(r):.1f}" if r else "", f"{max(r):.1f}" if r else ""]))
    write_text_atomic(out / "system.csv", "\n".join(lines) + "\n")
    pairs = [(t.user_attrs["predicted_value"], t.value) for t in done
             if t.user_attrs.get("predicted_value") is not None]
    corr = rank_correlation([p for p, _ in pairs], [m for _, m in pairs])
    best = max(done, key=lambda t: t.value) if done else None
    device = study.user_attrs.get("setup", {}).get("device", "cpu")
    md = [f"# System search: {study.study_name}", "", "Command:", "", "```", command, "```", "",
          f"Measured on {device}: each trial's throughput is the median of {REPEATS} runs of "
          f"{STEPS} training steps (forward, backward with the embedding's fused update, "
          f"train.grad_clip, Adam), after {WARMUP} untimed steps; the runs' range is beside it.",
          ""]
    if best is not None:
        md += [f"Fastest: trial {best.number}, {best.user_attrs['samples_per_s']:,.0f} "
               f"training samples/s with "
               + ", ".join(f"{k} = {v}" for k, v in sorted(best.params.items()))
               + " (its config: best_system.yaml; no config key holds the thread count: "
               f"run it with OMP_NUM_THREADS={best.params.get('threads', 1)}).", ""]
        dump_config(best.user_attrs["config"], out / "best_system.yaml")
    md += ["| trial | " + " | ".join(names) + " | samples/s | runs | predicted |",
           "|---|" + "---|" * len(names) + "---:|---:|---:|"]
    for t in sorted(done, key=lambda t: -t.value):
        pred = t.user_attrs.get("predicted_value")
        r = runs[t.number]
        md.append(f"| {t.number} | " + " | ".join(str(t.params.get(n, "–")) for n in names)
                  + f" | {t.user_attrs['samples_per_s']:,.0f} | "
                  + (_spread(r) if r else "1 run") + " | "
                  + ("–" if pred is None else f"{math.exp(pred):,.0f}") + " |")
    md += ["", f"Predicted vs measured throughput of the {corr['n']} proposed trials: Kendall "
           f"tau {corr['kendall_tau']:.3f}, Spearman {corr['spearman']:.3f} (by {corr['by']}).",
           ""]
    write_text_atomic(out / "SYSTEM.md", "\n".join(md))
    return {"best": best, "correlation": corr}


def run_system_search(options: Any, say: Callable[[str], None] | None = None) -> Any:
    """The ``--system`` study of :class:`cetnet.search.engine.SearchOptions` ``options``:
    ``options.trials`` measured settings (the predictor proposes after the startup trials),
    then ``OUT/SYSTEM.md``, ``system.csv`` and ``best_system.yaml``. Returns the study."""
    import optuna

    from cetnet.config import ConfigError
    from cetnet.search.engine import (SearchError, _base, _hide_password, _load_dataset,
                                      _sampler, check_code, check_seed, check_study_name,
                                      claim_study, data_identity, open_storage, quiet_trial_failures,
                                      reseed, setup_changes, setup_difference, study_lock)
    from cetnet.train.loop import resolve_device

    say = say or options.say
    check_seed(options.seed)
    check_study_name(options.study)
    if options.trials < 1:
        raise SearchError(f"--trials must be >= 1 with --system, got {options.trials}")
    base = _base(options)
    try:  # one error line, not every trial failing on a device that is not there
        device = resolve_device(base.get("device", "auto"))
    except ConfigError as e:
        raise SearchError(f"--system: {e}") from None
    dataset = _load_dataset(base)
    rows = len(dataset.splits["train"])
    if not batch_sizes(rows):
        raise SearchError(f"--system: the train split has {rows} rows, fewer than the smallest "
                          f"batch size {SYSTEM_SPACE['train.batch_size'][0]}")
    options.out.mkdir(parents=True, exist_ok=True)
    quiet_trial_failures()
    storage_url = options.storage or f"sqlite:///{(options.out / 'system.db').resolve()}"
    name = f"{options.study}-system"
    sampler = _sampler(options.sampler, options.seed, options.trials,
                       lambda t: sample_system(t, base, rows))
    # the study remembers what it measures: the model, the data and the settings offered
    setup = {"dataset": options.dataset, "overrides": list(options.overrides),
             "batch_sizes": batch_sizes(rows), "cpus": os.cpu_count() or 1,
             **data_identity(base, dataset), "measurement": MEASUREMENT,
             # (speeds of other code, or of another device, do not compare)
             "code": code_id.code_identity(base.get("device", "auto"))}
    if device.type != "cpu":  # measured there; recorded only then, as studies before it resume
        setup["device"] = str(device)
    # the trial's value is log(samples/s): the predictor models log throughput, in which a
    # speed-up by a factor is the same step wherever it starts
    with study_lock(options.out):
        study, saved = claim_study(open_storage(storage_url), name, resume=options.resume,
                                   setup=setup, where=_hide_password(storage_url),
                                   direction="maximize", sampler=sampler)
    if saved is not None:
        # a study without the device was measured on the CPU, without the measurement: by
        # one run of steps without gradient clipping
        saved_code = saved.get("code")
        saved, now = ({"device": "cpu", "measurement": 1, **saved},
                      {"device": "cpu", **setup})
        saved.pop("code", None)
        now.pop("code")
        if saved["measurement"] != MEASUREMENT:
            raise SearchError(f"study {name!r} was measured by another cetnet (measurement "
                              f"{saved['measurement']}: one run of {STEPS} steps without "
                              f"gradient clipping; this one {MEASUREMENT}: the median of "
                              f"{REPEATS} runs of the training loop's step): the predictor "
                              "would fit both as one; start a new study (another --out, or "
                              "--study)")
        changed = setup_changes(saved, now, study=study)
        if changed:
            raise SearchError(f"study {name!r} was started with another {', '.join(changed)}: "
                              "continue it with the same options (and machine), or name a new "
                              "study with --study" + setup_difference(saved, now, changed))
        # (last: it records)
        check_code(study, name, options, saved_code, base.get("device", "auto"))
    reseed(study, lambda seed: _sampler(options.sampler, seed, options.trials,
                                        lambda t: sample_system(t, base, rows)), options.seed)

    def objective(trial: Any) -> float:
        config, threads = sample_system(trial, base, rows)
        try:
            speeds = measure_repeats(config, dataset, threads, steps=STEPS, warmup=WARMUP)
        except (RuntimeError, ValueError, MemoryError) as e:  # the trial fails, the study goes on
            text = " ".join(str(e).split())[:200] or type(e).__name__
            trial.set_user_attr("error", text)
            say(f"system trial {trial.number}: failed ({text})")
            raise
        speed = statistics.median(speeds)
        trial.set_user_attr("config", config)
        trial.set_user_attr("code", code_id.code_tag(code_id.code_identity(
            base.get("device", "auto"))))
        trial.set_user_attr("samples_per_s", speed)
        trial.set_user_attr("samples_per_s_repeats", speeds)  # how far the median can be trusted
        say(f"system trial {trial.number}: {speed:,.0f} samples/s (median of "
            f"{_spread(speeds)}; "
            + ", ".join(f"{k}={v}" for k, v in sorted(trial.params.items())) + ")")
        return math.log(speed)

    done = len(study.get_trials(deepcopy=False,
                                states=(optuna.trial.TrialState.COMPLETE,)))
    if options.trials > done:
        study.optimize(objective, n_trials=options.trials - done,
                       catch=(RuntimeError, ValueError, MemoryError))
    _write_report(study, options.out, options.command or "cetnet search --system")
    return study
