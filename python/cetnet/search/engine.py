"""The study behind ``cetnet search``: Optuna samples, prunes and stores; cetnet trains.

Every trial is an ordinary run: the sampled config is validated, its cost counted
(:mod:`cetnet.search.cost`), then it trains with :func:`cetnet.train.run_training` in
``OUT/runs/<config key>/warmup`` (one epoch capped at the warm-up fraction of the training
rows) and, unless the pruner stops it there, ``OUT/runs/<config key>/full``. A run directory
that holds ``metrics.json`` is reused as it is; one that holds ``last.pt`` is resumed.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from cetnet import code_identity as code_id
from cetnet.config import ConfigError, validate_config
from cetnet.processes import pid_alive, process_space
from cetnet.search.cost import COST_VERSION, model_cost
from cetnet.search.proxies import SIGEO_WEIGHTS
from cetnet.search.report import write_outputs
from cetnet.search.space import (check_values, default_space_path, load_space, overridden_sets,
                                 sample_config)
from cetnet.train.runner import out_of_memory, train_or_reuse

__all__ = ["SearchError", "SearchOptions", "parse_objective", "open_storage", "run_search",
           "Progress", "progress_line", "SAMPLERS", "PRUNERS", "OBJECTIVES"]

SAMPLERS = ("random", "tpe", "predictor")
PRUNERS = ("median", "halving", "none")
OBJECTIVES = {"auc": ("auc",), "auc,cost": ("auc", "cost")}
#: What the pruner ranks a warmed-up trial by: its validation AUC, or the SiGeo-style score of
#: its warmed-up weights (cetnet.search.proxies); both are always recorded.
PROXIES = ("auc", "sigeo")
#: Seconds between a running trial's heartbeats, and after which a silent one is failed (and
#: retried with its parameters by another worker).
HEARTBEAT_S, GRACE_S = 30, 120
WARMUP_STEP = 1  # the intermediate value's step: the warm-up proxy


class SearchError(ConfigError):
    """A bad option or study state of ``cetnet search`` (one line, naming it)."""


class AllTrialsFailed(SearchError):
    """Every trial this invocation ran failed (its reports are written; trials.csv says why):
    the command exits non-zero rather than saying it wrote a search."""


@dataclass
class SearchOptions:
    out: Path
    dataset: str = "movielens-100k"
    space: str = "default"
    trials: int = 20
    objective: str = "auc"
    sampler: str = "tpe"
    pruner: str = "median"
    warmup_fraction: float = 0.25
    proxy: str = "auc"
    max_cost: float | None = None
    cost_weight: float = 0.0
    storage: str | None = None
    study: str = "cetnet-search"
    resume: bool = False
    seed: int = 0
    overrides: Sequence[str] = ()
    command: str = ""
    say: Callable[[str], None] = field(default=lambda text: print(text, flush=True))
    #: the weights of the SiGeo-style score's terms (zico, fisher_rao, loss)
    sigeo_weights: tuple[float, float, float] = SIGEO_WEIGHTS
    #: continue a study whose trials other code trained (another cetnet build or torch):
    #: without it such a resume is refused, as its trials would be ranked with new ones
    reuse_other_code: bool = False


def parse_objective(text: str) -> tuple[str, ...]:
    """``auc`` -> ("auc",); ``auc,cost`` -> ("auc", "cost"); else a SearchError."""
    key = ",".join(part.strip() for part in str(text).split(","))
    if key not in OBJECTIVES:
        raise SearchError(f"--objective must be {' or '.join(OBJECTIVES)}, got {text!r}")
    return OBJECTIVES[key]


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _driver_url(url: str) -> str:
    """``postgresql://`` names psycopg 3 in SQLAlchemy 2.1 (psycopg2 before): without psycopg
    installed but with psycopg2, the URL names psycopg2."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def open_storage(url: str) -> Any:
    """An Optuna RDB storage (any SQLAlchemy URL) with heartbeats; a URL that cannot be opened
    is a SearchError naming it (its password hidden)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(_driver_url(url), heartbeat_interval=HEARTBEAT_S,
                                  grace_period=GRACE_S,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                      max_retry=2))
            except Exception as e:  # sqlalchemy: a bad URL, no driver, no server, no database
                text = " ".join(str(e).split()) or type(e).__name__
                # two workers creating the tables of a new database at once: one loses the race
                # (a table that "already exists", a row of the schema version already there:
                # PostgreSQL's duplicate key, SQLite's UNIQUE constraint); the tables are there
                # when it tries again
                if any(race in text for race in ("already exists", "duplicate key",
                                                 "UNIQUE constraint failed")) and attempt < 2:
                    time.sleep(1.0 + attempt)
                    continue
                raise SearchError(f"--storage {_hide_password(url)}: cannot open it "
                                  f"({text[:200]})") from None
    raise AssertionError("unreachable")


def _sampler(name: str, seed: int, trials: int,
             sample: Callable[[Any], Any] | None = None) -> Any:
    import optuna

    if name == "predictor":  # sample: the space's define-by-run sampling, for the pool
        from cetnet.search.predictor import PredictorSampler

        return PredictorSampler(sample, seed=seed, n_startup=max(2, min(10, trials // 3)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        # constant_liar: concurrent workers do not all sample next to the same running trial
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, trials // 3)),
                                          constant_liar=True)
    raise SearchError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")


def _pruner(name: str) -> Any:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=WARMUP_STEP,
                                                      reduction_factor=2)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SearchError(f"--pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


def _base(options: SearchOptions) -> dict:
    from cetnet.reproduce.experiment import base_config

    try:
        return base_config(options.dataset, overrides=list(options.overrides))
    except ConfigError as e:
        raise SearchError(str(e).replace("reproduce: ", "")) from None


def _load_dataset(config: dict) -> Any:
    from cetnet.train import load_dataset

    data = dict(config["data"])
    return load_dataset(data.pop("name"), **data)


def warmup_config(config: dict, fraction: float, train_rows: int) -> dict:
    """One epoch on ``fraction`` of the training rows (``train.max_steps_per_epoch``), and no
    more steps than the config's own cap."""
    cfg = copy.deepcopy(config)
    t = cfg["train"]
    steps = max(1, math.ceil(fraction * train_rows / t["batch_size"]))
    t["epochs"], t["patience"] = 1, None
    cap = t.get("max_steps_per_epoch")
    if fraction < 1:
        t["max_steps_per_epoch"] = steps if cap is None else min(cap, steps)
    return cfg


def check_candidate(config: dict, schema: Any) -> None:
    """The checks a trial's config passes before it trains that need no data and no memory:
    the config's validation and the model builder's (on the meta device, whatever the
    model's size); a ConfigError names the key. What :func:`cetnet.search.space.check_values`
    runs on the space's values."""
    import torch

    from cetnet.train import build_model

    config = validate_config({**config, "name": "space-check"})
    try:
        with torch.device("meta"):
            build_model(config["model"], schema, backend=config["backend"])
    except (NotImplementedError, RuntimeError):
        pass  # a part that cannot be built on the meta device: the trial's own build checks it


def _setup(options: SearchOptions, space_text: str, device: str) -> dict:
    setup = {"dataset": options.dataset, "space": space_text, "objective": options.objective,
             "warmup_fraction": options.warmup_fraction, "overrides": list(options.overrides),
             # what a trial's FLOPs and warm-up loss measure: always saved, so that a study
             # measured otherwise (saved without it: version 1) is not resumed
             "cost_version": COST_VERSION,
             # the code that trains the trials on the base config's device
             # (cetnet.code_identity): another one does not continue the study unless asked
             "code": code_id.code_identity(device)}
    # keys added later are saved only when set: older studies resume as they were
    if options.proxy != "auc":
        setup["proxy"] = options.proxy
    if options.max_cost is not None:
        setup["max_cost"] = options.max_cost
    if options.cost_weight:
        setup["cost_weight"] = options.cost_weight
    if tuple(options.sigeo_weights) != SIGEO_WEIGHTS:
        setup["sigeo_weights"] = list(options.sigeo_weights)
    return setup


def objective_value(auc: float, flops: float, cost_weight: float) -> float:
    """The single objective with ``--cost-weight`` (DistDNAS's cost-aware objective in its
    simplest form): the validation AUC minus ``cost_weight * log10(FLOPs per sample)``."""
    if not cost_weight:
        return auc
    return auc - cost_weight * math.log10(max(flops, 1.0))


def _warmup_proxies(trial: Any, config: dict, dataset: Any, run_dir: Path,
                    say: Callable[[str], None], asked: bool,
                    weights: tuple[float, float, float] = SIGEO_WEIGHTS) -> float | None:
    """Records the SiGeo-style statistics of the warmed-up weights in ``run_dir/best.pt`` as
    the trial's attributes; returns the SiGeo score (None, with the reason recorded, when they
    cannot be computed)."""
    from cetnet.search.proxies import MAX_AUTO_WEIGHTS, sigeo_score, warmup_statistics

    try:  # asked (--proxy sigeo): whatever the model's size; else for models up to a size
        stats = warmup_statistics(config, dataset, run_dir / "best.pt",
                                  max_weights=None if asked else MAX_AUTO_WEIGHTS)
    except (ValueError, RuntimeError, OSError, MemoryError) as e:  # (a ConfigError is a
        # ValueError: a rebuild that does not fit in memory; so are the float64 sums)
        trial.set_user_attr("proxy_error", " ".join(str(e).split())[:200])
        say(f"trial {trial.number}: no SiGeo statistics ({' '.join(str(e).split())[:120]})")
        return None
    score = sigeo_score(stats, weights)
    for name, value in (("zico", stats["zico"]), ("fisher_rao", stats["fisher_rao"]),
                        ("neg_warmup_loss", -stats["loss"]), ("sigeo", score)):
        trial.set_user_attr(name, value)
    return score


def _requeue_interrupted(study: Any, say: Callable[[str], None]) -> None:
    """Trials interrupted (Ctrl-C) or left RUNNING by a dead process of this host are failed
    and their parameters queued again, once: the same config, hence the same run directory,
    whose finished warm-up is reused and whose training resumes from its last checkpoint.
    Trials of other hosts (another :func:`~cetnet.processes.process_space`: a container that
    shares this hostname is another host) are failed (and retried) by the heartbeat after
    GRACE_S seconds of silence."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = process_space()
    trials = study.get_trials(deepcopy=False)
    # retried already: by a resumer (retry_of), or by Optuna's heartbeat, whose copy lists the
    # trials it retries (a Ctrl-C'd worker that died before its FAIL was recorded leaves a
    # silent RUNNING trial marked interrupted: the heartbeat fails and retries it)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    retried |= {n for t in trials if _heartbeat_retry(t)
                for n in t.system_attrs.get("retry_history", [])}
    for t in trials:
        if t.number in retried:
            continue
        if t.state == TrialState.RUNNING:
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != host or not isinstance(pid, int) or pid_alive(pid):
                continue
            try:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:  # another resumer failed (and queued) it first
                continue
            why = f"its process ({pid}) is gone"
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            why = "it was interrupted"
        else:
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        say(f"trial {t.number}: {why}; queued again")


def _refuse_duplicate_retry(study: Any, trial: Any) -> None:
    """RunDirError (the trial fails at once, one line) when ``trial`` retries an interrupted
    trial that a trial of a lower number retries too: two resumers on other machines (sharing
    the storage, not the ``--out`` and its lock) can each queue it once."""
    retry_of = trial.user_attrs.get("retry_of")
    if retry_of is None:
        return
    trials = study.get_trials(deepcopy=False)  # (frozen: their system attributes are read)
    if any(t.number == trial.number and _heartbeat_retry(t) for t in trials):
        return  # Optuna's heartbeat retried a silent retry: it copies the attributes
    first = min(t.number for t in trials
                if t.user_attrs.get("retry_of") == retry_of and not _heartbeat_retry(t))
    if first != trial.number:
        from cetnet.train.rundir import RunDirError

        raise RunDirError(f"a second retry of trial {retry_of}: trial {first} retries it")


def _heartbeat_retry(trial: Any) -> bool:
    """Whether Optuna's heartbeat made ``trial`` (a FrozenTrial) as the retry of a silent one
    (it copies that trial's user attributes, ``retry_of`` included, and records
    ``failed_trial``)."""
    return "failed_trial" in trial.system_attrs


#: The lock file in ``--out`` that workers starting there take in turn while they open the
#: study (create it or check it, record its setup, queue interrupted trials again).
STUDY_LOCK = ".study.lock"
#: How long a worker that loaded a study without its setup waits for the worker that has just
#: created it to record it.
SETUP_WAIT_S = 30.0


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Holds ``out/.study.lock`` (``fcntl.flock``, waiting for it): workers starting in one
    ``--out`` open the study one at a time, so that listing, creating and recording its setup,
    and queuing interrupted trials again, are not interleaved. (Workers on other machines with
    their own ``--out`` and one shared storage are kept apart by the storage itself:
    :func:`claim_study`, and the duplicate-retry check of a trial.)"""
    fd = os.open(out / STUDY_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def claim_study(storage: Any, name: str, *, resume: bool, setup: dict, where: str,
                **create: Any) -> tuple[Any, dict | None]:
    """``(study, the setup it was started with, or None when this call created it)``.

    The study is created atomically (the storage refuses a second study of the name), so of two
    workers starting at once exactly one creates it and records ``setup``; the other, with
    ``resume``, loads it and waits up to :data:`SETUP_WAIT_S` for that setup (it compares
    against it), and without ``resume`` is refused (SearchError). ``create``: the keywords of
    ``optuna.create_study`` besides storage and name (directions, sampler, pruner)."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=False,
                                    **create)
    except optuna.exceptions.DuplicatedStudyError:
        if not resume:
            raise SearchError(f"study {name!r} already exists in {where}: add --resume to "
                              "continue it, or name another with --study") from None
    else:
        study.set_user_attr("setup", setup)
        return study, None
    study = optuna.load_study(storage=storage, study_name=name, sampler=create.get("sampler"),
                              pruner=create.get("pruner"))
    deadline = time.monotonic() + SETUP_WAIT_S
    while (saved := study.user_attrs.get("setup")) is None and time.monotonic() < deadline:
        time.sleep(0.2)  # created an instant ago by another worker, which records it next
    if saved is None:  # its creator died before recording it: this worker's setup it is
        study.set_user_attr("setup", setup)
    return study, saved


def _open_study(options: SearchOptions, objectives: tuple[str, ...], setup: dict, device: str,
                sample: Callable[[Any], Any] | None = None) -> Any:
    storage_url = options.storage or f"sqlite:///{(options.out / 'study.db').resolve()}"
    storage = open_storage(storage_url)
    names = [s.study_name for s in storage.get_all_studies()]
    exists = options.study in names
    others = [n for n in names if n != options.study]
    if options.storage is None and others and not exists:
        # one --out holds one study's reports (SEARCH.md, trials.csv, best_config.yaml)
        raise SearchError(f"{options.out} holds study {others[0]!r}: continue it with --study "
                          f"{others[0]} --resume, or give another --out")
    directions: list[Literal["maximize", "minimize"]] = \
        ["minimize" if i else "maximize" for i in range(len(objectives))]
    study, saved = claim_study(storage, options.study, resume=options.resume, setup=setup,
                               where=_hide_password(storage_url), directions=directions,
                               sampler=_sampler(options.sampler, options.seed, options.trials,
                                                sample),
                               pruner=_pruner(options.pruner))
    if saved is not None:
        measured = saved.get("cost_version", 1)  # saved without it: the first way
        if measured != setup.get("cost_version", measured):
            earlier = " (FLOPs without attention, the warm-up loss of the training " \
                "objective)" if measured == 1 else ""
            raise SearchError(f"study {options.study!r} was measured by another cetnet (cost "
                              f"version {measured}{earlier}, this one {COST_VERSION}): its "
                              "trials do not compare with new ones; start a new study (another "
                              "--out, or --study)")

        saved_code = saved.get("code")
        saved = {k: v for k, v in saved.items() if k != "code"}
        setup = {k: v for k, v in setup.items() if k != "code"}

        def full(d: dict) -> dict:  # a setup saved without the later keys: their defaults
            return {"proxy": "auc", "max_cost": None, "cost_weight": 0.0, **d}

        changed = setup_changes(full(saved), full(setup), study=study)
        if changed:
            raise SearchError(f"study {options.study!r} was started with another "
                              f"{', '.join(changed)}: continue it with the same options, or "
                              "name a new study with --study"
                              + setup_difference(full(saved), full(setup), changed))
        check_code(study, options.study, options, saved_code, device)  # (last: it records)
    reseed(study, lambda seed: _sampler(options.sampler, seed, options.trials, sample),
           options.seed)
    return study


def check_code(study: Any, name: str, options: SearchOptions, saved: Any, device: str) -> None:
    """SearchError when study ``name``'s trials were run by other code than this process's
    training on ``device`` (a config's setting; or by a cetnet that did not record its code),
    unless ``options.reuse_other_code``; records
    this code in the study's setup when it is continued (each trial records its own in
    ``code``)."""
    mine = code_id.code_identity(device)
    if not code_id.same_code(saved, device):
        if not options.reuse_other_code:
            raise SearchError(f"study {name!r} was run by other code "
                              f"({code_id.describe(saved)}; this is {code_id.describe(mine)}): "
                              "its trials would be ranked with new ones; start a new study "
                              "(another --out, or --study), or continue it with "
                              "--reuse-other-code")
        options.say(f"study {name!r}: continued by other code than its trials' "
                    f"({code_id.describe(saved)}; this is {code_id.describe(mine)}, "
                    "--reuse-other-code): trials.csv's code column names each trial's")
        study.set_user_attr("setup", {**study.user_attrs.get("setup", {}), "code": mine})


#: Setup keys a study started before they were recorded lacks: not compared then.
UNRECORDED_BEFORE = ("data_digest", "data_content")


class _TrialFailureFilter(logging.Filter):
    """Drops Optuna's log of a failed trial (a traceback of a known failure, or of Ctrl-C):
    the search says each failure in one line itself and records it in trials.csv."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.match(r"Trial \d+ failed", record.getMessage())


def quiet_trial_failures() -> None:
    """Optuna's logging at WARNING, without its per-failure tracebacks (idempotent)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logger = logging.getLogger("optuna")
    if not any(isinstance(f, _TrialFailureFilter) for f in logger.filters):
        logger.addFilter(_TrialFailureFilter())
    for handler in logger.handlers:  # records of optuna.* loggers reach these handlers
        if not any(isinstance(f, _TrialFailureFilter) for f in handler.filters):
            handler.addFilter(_TrialFailureFilter())


def setup_changes(saved: dict, setup: dict, *, study: Any = None) -> list[str]:
    """The keys of ``setup`` whose value differs from the study's ``saved`` one (the data
    keys only when the study recorded them). With ``study`` and no difference, the data keys
    a study of an earlier cetnet lacks are recorded into it now, so that later resumes
    compare them."""
    changed = [k for k in setup if not (k in UNRECORDED_BEFORE and k not in saved)
               and not _same_setting(k, saved.get(k), setup[k])]
    missing = {k: setup[k] for k in UNRECORDED_BEFORE if k in setup and k not in saved}
    if study is not None and not changed and missing:
        study.set_user_attr("setup", {**study.user_attrs.get("setup", saved), **missing})
    return changed


def _override_key(text: Any) -> str:
    return str(text).split("=", 1)[0].strip()


def _same_setting(key: str, saved: Any, given: Any) -> bool:
    """Whether a setup's ``key`` is unchanged. ``--set`` overrides are one setting in any
    order unless one's key repeats another's or lies under it (``train=...`` and
    ``train.lr=...``): the later of those wins, so their order is part of the setting."""
    if key != "overrides" or saved == given or not isinstance(saved, list) or \
            not isinstance(given, list):
        return saved == given
    keys = [_override_key(o) for o in given]
    independent = not any(a == b or b.startswith(a + ".")
                          for i, a in enumerate(keys) for j, b in enumerate(keys) if i != j)
    return independent and sorted(map(str, saved)) == sorted(map(str, given))


def setup_difference(saved: dict, setup: dict, changed: Sequence[str]) -> str:
    """`` (the study's overrides ['a=1']; given ['a=1', 'b=2'])``: what a refused resume
    would change, each value cut to 100 characters (a digest to its first 12)."""
    def shown(key: str, value: Any) -> str:
        text = str(value)[:12] if key in UNRECORDED_BEFORE and isinstance(value, str) \
            else repr(value)
        return text if len(text) <= 100 else text[:97] + "..."

    return " (" + "; ".join(f"the study's {k} {shown(k, saved.get(k))}, given "
                            f"{shown(k, setup.get(k))}" for k in changed) + ")"


def data_identity(base: dict, dataset: Any) -> dict:
    """What a study records of its data, besides ``--dataset`` and ``--set``, so that a resume
    on other data is refused: the dataset's encoding digest (its files' contents, through the
    vocabularies, statistics and features) and its rows' (an edited valid or test label).
    Not its paths: workers on other hosts, or a study moved with its data, mount them
    elsewhere."""
    digest = getattr(dataset, "encoding_digest", None)
    content = getattr(dataset, "content_digest", None)  # its rows: an edited label is other data
    return {**({"data_digest": digest()} if callable(digest) else {}),
            **({"data_content": content()} if callable(content) else {})}


def reseed(study: Any, make_sampler: Callable[[int], Any], seed: int) -> None:
    """A resumed study's sampler seeded with ``seed`` and the number of trials it holds: one
    seeded as at the study's start would draw the first trials' parameters again (each
    counted as a new finished trial, reusing their runs)."""
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler((seed + existing * 1_000_003) % 2**32)


def check_seed(seed: int) -> None:
    """SearchError unless ``seed`` is what Optuna's samplers take (an int in [0, 2**32))."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise SearchError(f"--seed must be an integer in [0, 2**32), got {seed!r}")


def check_study_name(name: str) -> None:
    """SearchError for an empty ``--study`` (it would be a second study beside the named one,
    overwriting its reports)."""
    if not isinstance(name, str) or not name.strip():
        raise SearchError(f"--study must be a non-empty name, got {name!r}")


class Progress:
    """An Optuna callback printing, after each trial, how many of the study's trials are
    finished and an ETA from the rate at which they finished since this invocation started
    (concurrent workers' trials count: they shorten the wait too). The ETA's clock starts
    after the trials whose runs were reused (seconds each): they say nothing of the rate."""

    def __init__(self, trials: int, done: int, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.trials, self.say, self.clock = trials, say, clock
        self.start = self.rate_start = clock()
        self.done_at_rate_start = done

    def __call__(self, study: Any, trial: Any) -> None:
        from optuna.trial import TrialState

        done = len(study.get_trials(deepcopy=False,
                                    states=(TrialState.COMPLETE, TrialState.PRUNED)))
        now = self.clock()
        if trial is not None and trial.user_attrs.get("reused") and \
                self.done_at_rate_start == done - 1:  # only reused trials so far: restart
            self.rate_start, self.done_at_rate_start = now, done
        self.say(progress_line(done, self.trials, done - self.done_at_rate_start,
                               now - self.start, rate_seconds=now - self.rate_start))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(done: int, trials: int, finished_here: int, elapsed: float,
                  rate_seconds: float | None = None) -> str:
    """``"progress: 7/20 trials finished, 5 min so far, about 9 min left"``; the ETA is the
    remaining trials at the rate of ``finished_here`` per ``rate_seconds`` (default
    ``elapsed``) seconds; none before one has finished."""
    line = f"progress: {min(done, trials)}/{trials} trials finished, {_duration(elapsed)} so far"
    if done >= trials:
        return line + ", done"
    rate_seconds = elapsed if rate_seconds is None else rate_seconds
    if finished_here > 0:
        return line + f", about {_duration((trials - done) * rate_seconds / finished_here)} left"
    return line


def run_search(options: SearchOptions) -> Any:
    """Runs (or continues) the study until it holds ``options.trials`` finished (complete or
    pruned) trials, then writes trials.csv, pareto.csv, SEARCH.md and the plot into
    ``options.out``. Returns the study."""
    import optuna
    from optuna.trial import TrialState

    objectives = parse_objective(options.objective)
    if not 0 <= options.warmup_fraction <= 1:
        raise SearchError(f"--warmup-fraction must be in [0, 1] (0: no warm-up), got "
                          f"{options.warmup_fraction}")
    if options.trials < 0:
        raise SearchError(f"--trials must be >= 0, got {options.trials}")
    if options.max_cost is not None and not (options.max_cost > 0 and
                                             math.isfinite(options.max_cost)):
        raise SearchError(f"--max-cost must be a positive number of FLOPs per sample, got "
                          f"{options.max_cost}")
    if not (options.cost_weight >= 0 and math.isfinite(options.cost_weight)):
        raise SearchError(f"--cost-weight must be >= 0, got {options.cost_weight}")
    if options.cost_weight and len(objectives) > 1:
        raise SearchError("--cost-weight folds the cost into one objective: use it with "
                          "--objective auc (auc,cost keeps the two on a Pareto front)")
    if options.proxy not in PROXIES:
        raise SearchError(f"--proxy must be one of {', '.join(PROXIES)}, got {options.proxy!r}")
    if options.sampler == "predictor" and len(objectives) > 1:
        raise SearchError("--sampler predictor optimizes one objective: use --objective auc "
                          "(or tpe / random for auc,cost)")
    check_seed(options.seed)
    check_study_name(options.study)
    space = load_space(options.space)
    space_path = options.space
    base = _base(options)
    # the space's base and sampled values win over --set (docs/SEARCH.md): a --set they
    # override would change nothing without a word
    for line in overridden_sets(space, options.overrides):
        print(f"warning: {line}", file=sys.stderr)
    # the data first: a dataset that fails to load must leave no study behind (a retry with
    # the data fixed would find one "started with other options")
    dataset = _load_dataset(base)
    train_rows = len(dataset.splits["train"])
    # every value of the space, before a study exists: a bad one would fail each trial
    # that samples it
    check_values(space, base, lambda config: check_candidate(config, dataset.schema),
                 str(default_space_path() if space_path in (None, "default") else space_path))
    options.out.mkdir(parents=True, exist_ok=True)
    quiet_trial_failures()
    with study_lock(options.out):
        study = _open_study(options, objectives,
                            {**_setup(options, repr(space), base["device"]),
                             **data_identity(base, dataset)}, base["device"],
                            lambda trial: sample_config(trial, space, base))
        if options.resume:
            _requeue_interrupted(study, options.say)
    multi = len(objectives) > 1
    prune = options.warmup_fraction > 0 and not multi and options.pruner != "none"

    from cetnet.train.loop import TrainingError
    from cetnet.train.rundir import RunDirError

    ran: list[int] = []  # the trials of this invocation

    def objective(trial: optuna.Trial) -> Any:
        ran.append(trial.number)
        try:
            try:
                return run_trial(trial)
            except (MemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                # training that does not fit in memory fails its trial, not the search
                raise TrainingError(f"out of memory: {' '.join(str(e).split())[:200]}") from e
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # --resume queues its parameters again
            raise
        except (TrainingError, RunDirError, ConfigError) as e:  # the trial fails, the study
            if "error" not in trial.user_attrs:  # goes on (run_trial said its invalid config)
                text = " ".join(str(e).split())
                trial.set_user_attr("error", text[:500])
                options.say(f"trial {trial.number}: failed: {text[:300]}")
            raise

    def run_trial(trial: optuna.Trial) -> Any:
        from cetnet.reproduce.experiment import config_key

        trial.set_user_attr("host", process_space())
        trial.set_user_attr("pid", os.getpid())
        code = code_id.code_tag(code_id.code_identity(base["device"]))
        trial.set_user_attr("code", code)
        if trial.user_attrs.get("interrupted"):  # copied by a heartbeat retry: this one is not
            trial.set_user_attr("interrupted", False)
        _refuse_duplicate_retry(study, trial)
        config = sample_config(trial, space, base)
        config["name"] = f"{options.study}-{trial.number}"
        try:
            config = validate_config(config)
            flops, params = model_cost(config, dataset)
        except ConfigError as e:
            trial.set_user_attr("error", " ".join(str(e).split()))
            options.say(f"trial {trial.number}: invalid config: {e}")
            raise
        key = config_key({**config, "name": ""})
        # runs are kept per code: a run another build trained is never reused as this one's
        run_root = options.out / "runs" / code / key
        trial.set_user_attr("flops", flops)
        trial.set_user_attr("params", params)
        trial.set_user_attr("run_dir", str(run_root))
        if options.max_cost is not None and flops > options.max_cost:
            # over the budget: never trained; pruned, so it counts as a finished trial
            trial.set_user_attr("over_max_cost", True)
            options.say(f"trial {trial.number}: {flops:,.0f} FLOPs/sample is over --max-cost "
                        f"{options.max_cost:,.0f}; not trained")
            raise optuna.TrialPruned()
        start, reused = time.perf_counter(), []
        if options.warmup_fraction > 0:
            metrics, hit = train_or_reuse(
                warmup_config(config, options.warmup_fraction, train_rows), run_root / "warmup")
            reused.append(hit)
            proxy = metrics["valid"]["fused"]["auc"]
            trial.set_user_attr("proxy_auc", proxy)
            sigeo = _warmup_proxies(trial, config, dataset, run_root / "warmup", options.say,
                                    asked=options.proxy == "sigeo",
                                    weights=options.sigeo_weights)
            ranked_by = sigeo if options.proxy == "sigeo" else proxy
            if not multi and ranked_by is not None:  # Optuna's pruners are single-objective
                trial.report(ranked_by, WARMUP_STEP)
            if prune and ranked_by is not None and trial.should_prune():
                trial.set_user_attr("seconds", time.perf_counter() - start)
                options.say(f"trial {trial.number}: pruned after the warm-up (proxy AUC "
                            f"{proxy:.4f}" + (f", SiGeo {sigeo:.2f}" if sigeo is not None
                                               else "") + f", {flops:,.0f} FLOPs/sample)")
                raise optuna.TrialPruned()
        metrics, hit = train_or_reuse(config, run_root / "full")
        reused.append(hit)
        valid = metrics["valid"]["fused"]
        trial.set_user_attr("valid_auc", valid["auc"])
        trial.set_user_attr("valid_gauc", valid["gauc"])
        trial.set_user_attr("valid_logloss", valid["logloss"])
        trial.set_user_attr("test_auc", metrics["fused"]["auc"])
        if metrics.get("train_samples_per_s"):  # the measured cost, beside FLOPs and params
            trial.set_user_attr("step_ms", 1000.0 * config["train"]["batch_size"]
                                / metrics["train_samples_per_s"])
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("reused", all(reused))
        options.say(f"trial {trial.number}: valid AUC {valid['auc']:.4f}, {flops:,.0f} "
                    f"FLOPs/sample{' (reused runs)' if all(reused) else ''}")
        if multi:
            return valid["auc"], flops
        value = objective_value(valid["auc"], flops, options.cost_weight)
        trial.set_user_attr("objective", value)
        return value

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if options.trials > done:
        progress = Progress(options.trials, done, options.say)
        study.optimize(objective, n_trials=options.trials - done, gc_after_trial=True,
                       catch=(ConfigError, TrainingError, RunDirError),
                       callbacks=[optuna.study.MaxTrialsCallback(options.trials,
                                                                 states=finished), progress])
    write_outputs(study, options.out, objectives, options.command or
                  f"cetnet search --space {space_path}", cost_weight=options.cost_weight)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    if ran and all(states.get(n) == TrialState.FAIL for n in ran):
        raise AllTrialsFailed(f"all {len(ran)} trial(s) of this run failed: see the error "
                              f"column of {options.out / 'trials.csv'}")
    return study


def main_command(argv: Sequence[str]) -> str:
    """The command line as it can be typed again."""
    import shlex

    return "cetnet search " + shlex.join(argv) if argv else "cetnet search"

