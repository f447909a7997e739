"""The experiment: jobs (row x seed x grid point), their cached results, and the selection of
the grid point on validation.

Each job's result is a JSON file ``<out>/results/<key>.json`` where ``key`` hashes the job's
resolved config (everything but its ``name``): the same config is never trained twice, and an
interrupted experiment continues where it stopped (a job interrupted mid-training resumes from
its run directory's ``last.pt``). A result also records the code that trained it
(:func:`cetnet.code_identity.code_identity`): one of other code is trained again (the old result
and run kept under ``<out>/superseded/``) unless ``reuse_other_code``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from cetnet.atomic import write_text_atomic
from cetnet import code_identity as code_id
from cetnet.config import (ConfigError, apply_overrides, load_config, paper_config_path,
                           validate_config)
from cetnet.reproduce.rows import (ROWS, SINGLE_ROWS, Row, check_model, embedding_parameter_count,
                                   member_kinds, row_config, row_spec, scaled_single_model)

__all__ = ["GRIDS", "RESULT_VERSION", "Job", "Experiment", "base_config", "config_key",
           "grid_points", "select"]

RESULT_VERSION = 1

#: The tuning grids: train.lr x model.embedding_lr (``small``: 2 x 2 around the defaults).
GRIDS: dict[str, dict[str, list[float]]] = {
    "none": {},
    "small": {"train.lr": [1.0e-3, 3.0e-3], "model.embedding_lr": [0.02, 0.05]},
}


def grid_points(grid: str | Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The points of a grid (a name of :data:`GRIDS` or ``{dotted key: values}``), each a dict
    ``{dotted key: value}``; ``none`` is one empty point (the base config's values)."""
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ConfigError(f"reproduce: --grid must be one of {', '.join(GRIDS)}, got "
                              f"{grid!r}")
        grid = GRIDS[grid]
    points: list[dict[str, float]] = [{}]
    for key, values in grid.items():
        if key not in ("train.lr", "model.embedding_lr"):
            raise ConfigError(f"reproduce: grid key {key!r}: the grid tunes train.lr and "
                              "model.embedding_lr")
        points = [{**p, key: v} for p in points for v in values]
    return points


def base_config(dataset: str = "movielens-100k", *, config: str | Path | None = None,
                overrides: Sequence[str] = (), split: str | None = None) -> dict:
    """The config every row starts from: the packaged CETNet of the paper's pair, DHEN +
    InterFormer (:func:`cetnet.config.paper_config_path`; or ``config``), its data
    section replaced by ``dataset`` (``movielens-100k``, ``synthetic`` or a BARS dataset YAML,
    the other data options then dropped), ``split`` for MovieLens, then ``overrides``
    (``KEY=VALUE``, e.g. ``train.epochs=3``, ``data.num_rows=5000``)."""
    cfg = load_config(paper_config_path() if config is None else config)
    data = dict(cfg["data"])
    if dataset in ("movielens-100k", "movielens"):
        if data.get("name") != "movielens-100k":
            data = {"name": "movielens-100k"}
    elif dataset == "synthetic":
        data = {"name": "synthetic"}
    elif dataset.endswith((".yaml", ".yml")):
        if not Path(dataset).is_file():
            raise FileNotFoundError(f"reproduce: --dataset {dataset}: no such BARS dataset YAML")
        data = {"name": "bars", "config": str(Path(dataset).resolve())}
    else:
        raise ConfigError(f"reproduce: --dataset must be movielens-100k, synthetic or a BARS "
                          f"dataset YAML, got {dataset!r}")
    if split is not None:
        if data["name"] != "movielens-100k":
            raise ConfigError("reproduce: --split is an option of movielens-100k")
        data["split"] = split
    cfg["data"] = data
    return validate_config(apply_overrides(cfg, list(overrides)))


def config_key(config: Mapping[str, Any], trainer: str = "cetnet") -> str:
    """A hash of the resolved config without its ``name`` and of who trains it, when that is
    not cetnet (20 hex digits)."""
    body = {k: v for k, v in config.items() if k != "name"}
    # keys added since results were first cached: at their defaults they leave the key as it was
    if body.get("embedding") == "cetnet":
        del body["embedding"]
    train = body.get("train")
    if isinstance(train, dict) and train.get("embedding_sharding") == "auto":
        body["train"] = {k: v for k, v in train.items() if k != "embedding_sharding"}
    if trainer != "cetnet":
        body["_trainer"] = trainer
    text = json.dumps([RESULT_VERSION, body], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Job:
    row: str
    seed: int
    point: int
    grid: dict[str, float]
    config: dict
    key: str

    def label(self) -> str:
        g = " ".join(f"{k.split('.')[-1]}={v:g}" for k, v in self.grid.items())
        return f"{self.row} seed {self.seed}" + (f" [{g}]" if g else "")


_R = TypeVar("_R", bound=Mapping[str, Any])


def _grid_overrides(point: Mapping[str, float]) -> tuple[dict, dict]:
    train = {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith("train.")}
    model = {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith("model.")}
    return train, model


def _trainer_reads(point: Mapping[str, float]) -> dict[str, float]:
    """The keys of a grid point a peer trainer (FuxiCTR) reads: ``train.*`` only."""
    return {k: v for k, v in point.items() if k.startswith("train.")}


def select(results: Sequence[_R]) -> _R | None:
    """The result with the best validation fused AUC (of its best epoch); failed results and
    NaN AUCs never win; ties go to the earlier grid point. None when none finished."""
    best, best_auc = None, -math.inf
    for r in sorted(results, key=lambda r: r["point"]):
        if r.get("error"):
            continue
        a = r["metrics"]["valid"]["fused"]["auc"]
        if a is not None and math.isfinite(a) and a > best_auc:
            best, best_auc = r, a
    return best


@dataclass
class Experiment:
    """Rows x seeds x grid points on one base config, cached under ``out``."""

    base: dict
    #: the rows as given (names or :class:`Row` s); their names once built (see ``specs``)
    rows: list[str | Row]
    seeds: list[int]
    grid: str | Mapping[str, Sequence[float]] = "small"
    out: Path = Path("runs/reproduce")
    scaled_arch: str = "auto"
    keep_checkpoints: bool = False
    retry_failed: bool = False
    #: reuse cached results trained by other code (another cetnet build, another torch) instead
    #: of training them again; the report then names every result's code
    reuse_other_code: bool = False
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))
    _schema: Any = None
    _data_digest: str | None = None
    _content_digest: str | None = None
    scaled: dict | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.points = grid_points(self.grid)
        #: row name -> its :class:`Row` (registered rows by name, a study's rows as given)
        self.specs = {(spec := row_spec(r)).name: spec for r in self.rows}
        self.rows = list(self.specs)

    # -- datasets and rows ------------------------------------------------------------------
    @property
    def schema(self) -> Any:
        if self._schema is None:
            self._load_data()
        return self._schema

    def _load_data(self) -> None:
        from cetnet.train import load_dataset  # registered (plugin) datasets too

        data = dict(self.base["data"])
        dataset = load_dataset(data.pop("name"), **data)
        self._schema = dataset.schema
        digest = getattr(dataset, "encoding_digest", None)
        self._data_digest = digest() if callable(digest) else None
        content = getattr(dataset, "content_digest", None)
        self._content_digest = content() if callable(content) else None

    def check_data(self, write: bool = True) -> None:
        """ConfigError when the results cached in ``out`` for this data section were trained
        on other data than the dataset now (its files replaced or edited under the same paths:
        the cached runs would be reused as if they were of this data); else records the
        dataset's digests there (``data.json``, one per data section: another section is
        another key, nothing of it is reused) with ``write``. The rows' digest
        (:meth:`~cetnet.data.CTRDataset.content_digest`: a changed test label is other data)
        is compared where it was recorded; an ``--out`` of an earlier cetnet has only the
        encoding's, which is compared then, and the rows' is added."""
        if self._schema is None:
            self._load_data()
        digest = self._data_digest
        if digest is None:
            return
        path = self.out / "data.json"
        section = json.dumps(self.base["data"], sort_keys=True, default=str)
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        saved = saved if isinstance(saved, dict) else {}
        def recorded(key: str) -> dict[str, str]:
            value = saved.get(key)
            return value if isinstance(value, dict) else {}

        digests, contents = recorded("digests"), recorded("contents")
        content = self._content_digest
        if section in digests and (digests[section] != digest or (
                section in contents and content is not None and contents[section] != content)):
            raise ConfigError(f"reproduce: the results cached in {self.out} were trained on "
                              f"other data than the dataset now (were its files replaced or "
                              f"edited?): give another --out, or remove {self.out}")
        if write and (section not in digests or (content is not None
                                                  and section not in contents)):
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"digests": {**digests, section: digest}}
            if content is not None or contents:
                record["contents"] = {**contents, **({section: content} if content else {})}
            write_text_atomic(path, json.dumps(record, indent=1) + "\n")

    def result_path(self, key: str) -> Path:
        return self.out / "results" / f"{key}.json"

    def read_result(self, key: str) -> dict | None:
        path = self.result_path(key)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("version") != RESULT_VERSION or data.get("key") != key:
            return None
        if data.get("error") and self.retry_failed:
            return None
        if not self.reuse_other_code and not self._same_code(data.get("code"), data.get("row")):
            return None
        return data

    def other_code_results(self, jobs: Sequence[Job]) -> dict[str, int]:
        """``{description of the code: count}`` of the cached results of ``jobs`` (valid
        otherwise) trained by other code than this process's."""
        found: dict[str, int] = {}
        for job in jobs:
            try:
                data = json.loads(self.result_path(job.key).read_text())
            except (OSError, ValueError):
                continue
            if (isinstance(data, dict) and data.get("version") == RESULT_VERSION
                    and data.get("key") == job.key
                    and not self._same_code(data.get("code"), job.row)):
                what = code_id.describe(data.get("code"))
                found[what] = found.get(what, 0) + 1
        return found

    def _peer(self, row: Any) -> bool:
        """Whether ``row`` (a name; None: none) is trained by FuxiCTR."""
        spec = (self.specs.get(row) or ROWS.get(row)) if isinstance(row, str) else None
        return spec is not None and spec.trainer == "fuxictr"

    def _code(self, row: str | None = None) -> dict[str, str]:
        """This process's code identity, training on the base config's device (the rows share
        it): a result of another device is other code; a peer row's names FuxiCTR's version."""
        code = code_id.code_identity(self.base["device"])
        return {**code, **code_id.fuxictr_identity()} if self._peer(row) else code

    def _same_code(self, code: Any, row: str | None) -> bool:
        return code_id.same_code(code, self.base["device"], fuxictr=self._peer(row))

    def _started_path(self, key: str) -> Path:
        """Where the code that started a job's run is recorded while it trains."""
        return self.out / "started" / f"{key}.json"

    def _recorded_code(self, path: Path) -> Any:
        """The ``code`` a result or started record holds (None: none recorded, unreadable)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data.get("code") if isinstance(data, dict) else None

    def _supersede(self, job: Job) -> None:
        """Moves what other code left of ``job`` to ``<out>/superseded/<code>/``, so that this
        code trains it from the start and nothing is lost: a cached result of other code and
        its run directory (whose finished ``metrics.json`` would be reused), or a run that
        other code started and was interrupted (resuming it would finish one run with two
        codes; a run of a cetnet that did not record its code counts as other code). With
        ``reuse_other_code`` an interrupted run of other code is resumed instead."""
        path, run_dir = self.result_path(job.key), self.out / "runs" / job.key
        code = self._recorded_code(path if path.exists() else self._started_path(job.key))
        if not (path.exists() or run_dir.exists()) or self._same_code(code, job.row) or \
                (self.reuse_other_code and not path.exists()):
            return
        from cetnet.train.rundir import RunLock

        where = self.out / "superseded" / code_id.code_tag(code)
        with contextlib.ExitStack() as held:
            if run_dir.is_dir():  # RunDirBusy while another process trains it: not moved
                held.enter_context(RunLock(run_dir))
            for src, dst in ((run_dir, where / "runs" / job.key),
                             (path, where / "results" / path.name)):
                if src.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if dst.exists():  # an older copy of the same identity's result
                        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                    src.replace(dst)

    def _scaled_arch(self) -> str:
        """The architecture scaled_single widens: ``scaled_arch``, or with ``auto`` the best
        single architecture by mean validation AUC over the seeds finished so far: among the
        study's single rows (``dnn``, ``dcnv2``, ``dhen``, ``interformer``), or the base
        config's members when the study has none (their results in this ``--out``'s cache, if
        an earlier run trained them); the first CETNet member when none has results (a user widens the best model they have, not only a member of the ensemble)."""
        if self.scaled_arch != "auto":
            return self.scaled_arch
        members = member_kinds(self.base["model"].get("members") or ["dhen", "interformer"])
        candidates = [r for r in self.rows if r in SINGLE_ROWS] or \
            [kind for kind in dict.fromkeys(members) if kind in SINGLE_ROWS]
        scores = {}
        for kind in candidates:
            chosen = [self.chosen(kind, s) for s in self.seeds]
            vals = [c["metrics"]["valid"]["fused"]["auc"] for c in chosen if c]
            if vals:
                scores[kind] = sum(vals) / len(vals)
        if scores:
            return max(scores, key=scores.__getitem__)
        return members[0]

    def resolve_scaled(self) -> dict:
        if self.scaled is None:
            kind = self._scaled_arch()
            self.scaled = scaled_single_model(self.base, self.schema, kind)
            self.log(f"scaled_single: {kind} at embedding dim {self.scaled['dim']}: "
                     f"{self.scaled['num_parameters']:,} parameters (the cetnet row's "
                     f"{self.scaled['target']:,})")
        return self.scaled

    def jobs(self, row: str) -> list[Job]:
        """The runs of ``row`` (one per seed and grid point); a row outside the study (a
        member trained alone, which scaled_single reads from the cache) is a registered one."""
        extra = self.resolve_scaled()["model"] if row == "scaled_single" else None
        spec = self.specs.get(row) or row_spec(row)
        out = []
        for seed in self.seeds:
            for i, point in self._points_of(spec.trainer):
                train, model = _grid_overrides(point)
                model = {**(extra or {}), **model}
                cfg = row_config(self.base, spec, seed=seed, train=train, model=model)
                shown = point if spec.trainer == "cetnet" else _trainer_reads(point)
                out.append(Job(row, seed, i, dict(shown), cfg, config_key(cfg, spec.trainer)))
        return out

    def _points_of(self, trainer: str) -> list[tuple[int, dict[str, float]]]:
        """``(index, point)`` of the grid points ``trainer`` tells apart: FuxiCTR trains its
        tables with its Adam at ``train.lr`` and never reads ``model.embedding_lr``, so points
        differing only there are one run (the first stands for them: it was run twice, and the
        row's tuning time counted twice)."""
        if trainer == "cetnet":
            return list(enumerate(self.points))
        seen: list[dict[str, float]] = []
        out = []
        for i, point in enumerate(self.points):
            if _trainer_reads(point) not in seen:
                seen.append(_trainer_reads(point))
                out.append((i, point))
        return out

    def num_parameters(self, row: str) -> int:
        return check_model(self.jobs(row)[0].config, self.schema)

    # -- running ----------------------------------------------------------------------------
    def run_job(self, job: Job) -> dict:
        """Trains one job (resuming its run directory if it was interrupted) and stores its
        result; a TrainingError / ConfigError is stored as a failed result."""
        from cetnet.train.loop import TrainingError
        from cetnet.train.runner import train_or_reuse

        run_dir = self.out / "runs" / job.key
        params = check_model(job.config, self.schema)
        self._supersede(job)
        started = self._started_path(job.key)
        mine = self._code(job.row)
        if run_dir.exists():
            # resumed (or read back): the code that started it, which is this one unless
            # --reuse-other-code kept another's run (its result then counts as that code's)
            begun = self._recorded_code(started)
        else:  # a run starts now: recorded before it can leave anything behind
            started.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(started, json.dumps({"code": mine}) + "\n")
            begun = mine
        start = time.perf_counter()
        result: dict[str, Any] = {"version": RESULT_VERSION, "key": job.key, "row": job.row,
                                  "code": begun,
                                  "seed": job.seed, "point": job.point, "grid": job.grid,
                                  "num_parameters": params,
                                  "embedding_parameters": embedding_parameter_count(
                                      job.config, self.schema),
                                  "config": job.config}
        try:
            if self.specs[job.row].trainer == "fuxictr":
                from cetnet.reproduce.peers import train_fuxictr

                # cetnet's count of this config is not FuxiCTR's model: FuxiCTR counts it
                result["num_parameters"] = None
                metrics = train_fuxictr(job.config, job.config["model"]["members"][0], run_dir)
                result["num_parameters"] = metrics.get("num_parameters")
            else:
                metrics = train_or_reuse(job.config, run_dir)[0]
        except (TrainingError, ConfigError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
            self.log(f"  failed: {result['error']}")
        else:
            result["metrics"] = {k: metrics[k] for k in
                                 ("fused", "members", "fusion_weights", "valid", "best_epoch",
                                  "epochs_completed", "stopped_early", "train_seconds",
                                  "train_samples", "warnings") if k in metrics}
            result["metrics"]["history"] = [
                {"epoch": h["epoch"], "train_loss": h["train_loss"],
                 "valid_auc": h["valid"]["fused"]["auc"]} for h in metrics.get("history", [])]
            abundance = None if self.specs[job.row].trainer != "cetnet" else \
                self._abundance(job, run_dir)
            if abundance is not None:
                result["metrics"]["abundance"] = abundance
        result["wall_seconds"] = time.perf_counter() - start
        self.result_path(job.key).parent.mkdir(parents=True, exist_ok=True)
        if not self._same_code(begun, job.row):
            result["finished_by"] = mine  # a run of other code, resumed by this one
        write_text_atomic(self.result_path(job.key), json.dumps(result, indent=1) + "\n")
        started.unlink(missing_ok=True)  # the result records the code now
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        return result

    def _abundance(self, job: Job, run_dir: Path) -> dict[str, dict[str, float]] | None:
        """Information abundance of every table of the run's best model (``best.pt``), or
        None when the checkpoint is gone (a result recovered from ``metrics.json``)."""
        from cetnet.models.build import build_model
        from cetnet.train.checkpoint import BEST, CheckpointError, load_checkpoint

        if not (run_dir / BEST).exists():
            return None
        if job.config.get("embedding") == "torchrec":
            self.log("  no abundance: the tables of an embedding: torchrec run are sharded "
                     "(information abundance reads cetnet's fused tables)")
            return None
        try:
            state = load_checkpoint(run_dir / BEST, keys=("model",))["model"]
        except CheckpointError as e:
            self.log(f"  no abundance: {e}")
            return None
        model = build_model(job.config["model"], self.schema, backend=job.config["backend"])
        model.load_state_dict(state)
        return model.information_abundance()

    def run_order(self) -> list[str]:
        """The rows in the order given, except that scaled_single comes after every single row
        (its architecture is chosen from their validation AUCs)."""
        order = [r for r in self.specs if r != "scaled_single"]
        if "scaled_single" in self.rows:
            singles = [i for i, r in enumerate(order) if r in SINGLE_ROWS]
            at = max(self.rows.index("scaled_single"), singles[-1] + 1 if singles else 0)
            order.insert(min(at, len(order)), "scaled_single")
        return order

    def run(self, dry_run: bool = False) -> dict[str, list[dict]]:
        """Runs every job not yet cached (rows in order: scaled_single after the single
        rows it is chosen from); returns ``{row: [results]}``."""
        order = self.run_order()
        self.check_data(write=not dry_run)
        # count what is left (scaled_single's jobs are known once its arch is chosen)
        done: dict[str, list[dict]] = {r: [] for r in order}
        total = pending_est = 0
        for row in order:
            if row == "scaled_single" and self.scaled_arch == "auto":
                total += len(self.seeds) * len(self.points)
                pending_est += len(self.seeds) * len(self.points)
                continue
            jobs = self.jobs(row)
            total += len(jobs)
            pending_est += sum(self.read_result(j.key) is None for j in jobs)
        peers = any((self.specs.get(r) or row_spec(r)).trainer != "cetnet" for r in order)
        self.log(f"reproduce: {len(order)} rows x {len(self.seeds)} seeds x "
                 f"{len(self.points)} grid points"
                 + (" (FuxiCTR rows: their distinct train.lr)" if peers and
                    len(self._points_of("fuxictr")) < len(self.points) else "")
                 + f" = {total} runs, ~{pending_est} to train, cached in {self.out}")
        self._say_other_code(order)
        trained, spent, k = 0, 0.0, 0
        for row in order:
            for job in self.jobs(row):
                k += 1
                cached = self.read_result(job.key)
                if cached is not None:
                    done[row].append(cached)
                    continue
                if dry_run:
                    self.log(f"[{k}/{total}] {job.label()}: to train ({job.key})")
                    continue
                left = pending_est - trained
                eta = "" if not trained else f", ETA {_hms(spent / trained * left)}"
                self.log(f"[{k}/{total}] {job.label()}: training ({left} left{eta})")
                result = self.run_job(job)
                trained += 1
                spent += result["wall_seconds"]
                if "metrics" in result:
                    m = result["metrics"]
                    self.log(f"  valid AUC {m['valid']['fused']['auc']:.4f} | test AUC "
                             f"{m['fused']['auc']:.4f} in {result['wall_seconds']:.0f}s")
                done[row].append(result)
        self.log(f"reproduce: trained {trained} runs in {_hms(spent)}; "
                 f"{total - trained} were cached" if not dry_run else "reproduce: dry run")
        return done

    def _say_other_code(self, order: Sequence[str]) -> None:
        jobs = [j for row in order if not (row == "scaled_single" and self.scaled_arch == "auto")
                for j in self.jobs(row)]
        other = self.other_code_results(jobs)
        if not other:
            return
        n = sum(other.values())
        codes = "; ".join(f"{c}: {k}" for c, k in other.items())
        self.log(f"reproduce: {n} cached result{'s' if n > 1 else ''} trained by other code "
                 f"than this one ({code_id.describe(self._code())}): {codes}; "
                 + ("reused (--reuse-other-code): the report names each result's code"
                    if self.reuse_other_code else
                    f"trained again (the old ones kept in {self.out / 'superseded'}; "
                    "--reuse-other-code reuses them)"))

    def chosen(self, row: str, seed: int) -> dict | None:
        """The selected grid point's result for (row, seed), from the cache."""
        return select([r for r in (self.read_result(j.key) for j in self._jobs_cached(row))
                       if r is not None and r["seed"] == seed])

    def _jobs_cached(self, row: str) -> list[Job]:
        if row == "scaled_single" and self.scaled is None:
            return []
        return self.jobs(row)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s"
