"""Run configuration: a YAML file plus dotted ``key=value`` overrides, checked before a run.

A config has these top-level keys:

- ``name``: the run's name (the run directory is ``runs/<name>-<timestamp>`` by default).
- ``data``: ``{name: <dataset>, <option>: <value>, ...}``; the options go to
  ``cetnet.data.load_dataset(name, **options)`` as they are, but for one: a relative
  ``data.config`` (the dataset YAML the ``bars`` dataset reads) written in a config file is
  the file of that name next to the config file when there is one (made absolute, so that the
  run directory's ``config.yaml`` names it from anywhere), else relative to the working
  directory; a ``data.config=PATH`` override is relative to the working directory.
- ``model``: the ``model:`` section of docs/MODEL_LIBRARY.md, passed to ``build_model`` as it is.
- ``train``: the training settings of :data:`TRAIN_DEFAULTS` (checked here: unknown keys and
  wrong types are errors).
- ``backend``: the kernel backend for ``build_model`` (``"auto"`` or ``"reference"``).
- ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).
- ``embedding``: who holds the member tables: ``"cetnet"`` (default: the fused multi-table
  embedding, replicated on every rank of a data-parallel run) or ``"torchrec"`` (TorchRec
  embedding modules, sharded over the ranks by ``DistributedModelParallel``; docs/DISTRIBUTED.md).

``data`` and ``model`` are open sections (their keys are checked by the dataset and the model
builder); everything else is closed: a key that is not listed is an error, so a typo in an
override fails before any training.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cetnet.atomic import write_text_atomic
from cetnet.messages import shorten

__all__ = ["ConfigError", "TRAIN_DEFAULTS", "TOP_LEVEL_KEYS", "EMBEDDINGS", "EMBEDDING_SHARDINGS",
           "Spec", "INT64_MAX", "SEED_RANGE", "DEFAULT_CONFIG", "PAPER_CONFIG",
           "default_config_path", "paper_config_path", "load_config", "parse_value",
           "apply_overrides", "validate_config", "check_device", "dump_config", "read_yaml",
           "resolve_data_config"]

DEFAULT_CONFIG = "cetnet_ml100k.yaml"
#: CETNet as the paper pairs it (DHEN + InterFormer): the base of ``cetnet reproduce`` and
#: ``cetnet search``, whose rows and trials are defined by it (the default config is what the
#: evidence chose, and may change again)
PAPER_CONFIG = "cetnet_dhen_interformer_ml100k.yaml"
TOP_LEVEL_KEYS = ("name", "data", "model", "train", "backend", "device", "embedding")
#: ``embedding``: the fused tables of cetnet_kernels, or TorchRec's sharded ones.
EMBEDDINGS = ("cetnet", "torchrec")
#: ``train.embedding_sharding`` (``embedding: torchrec``): the shardings the planner may choose.
EMBEDDING_SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise")
OPEN_SECTIONS = ("data", "model")
LR_SCHEDULES = ("constant", "cosine", "step", "plateau")

#: Every ``train:`` key and its default. ``None`` means "off" where the spec allows it.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,                # at most this many passes over the train split
    "batch_size": 1024,
    "eval_batch_size": 4096,
    "lr": 1e-3,                  # Adam on the dense parameters
    "weight_decay": 0.0,         # Adam's L2 term
    "lr_schedule": "cosine",     # constant | cosine | step | plateau (see cetnet.train.schedule)
    "warmup_steps": 0,           # linear warm-up (lr/warmup_steps up to lr), in optimizer steps
    "min_lr_ratio": 0.0,         # cosine: the final lr as a fraction of lr
    "step_epochs": 1,            # step: multiply the lr by gamma every step_epochs epochs
    "gamma": 0.5,
    "plateau_factor": 0.5,       # plateau: multiply the lr by this when validation AUC stalls
    "plateau_patience": 0,       # ... for more than this many epochs
    "patience": 2,               # early stopping on validation fused AUC; null: never stop early
    "seed": 0,
    "max_steps_per_epoch": None,  # cap for smoke runs; null: the whole train split
    "grad_clip": None,           # max global L2 norm of the dense gradients; null: no clipping
    "log_every": 20,             # steps between progress-bar updates of the live loss/AUC
    "embedding_sharding": "auto",  # embedding: torchrec: auto (the planner picks per table
                                   # among table_wise, row_wise, column_wise) or one of them
}


INT64_MAX = 2**63 - 1
#: What ``torch.manual_seed`` accepts (negative seeds are remapped by torch).
SEED_RANGE = (-2**63, 2**64 - 1)


@dataclass(frozen=True)
class Spec:
    """The type and range of a config value: ``kind`` int, float, str or bool (a bool is never
    an int or a float here, although Python makes it one); floats must be finite; ``minimum``
    / ``maximum`` bound numbers (inclusive; ``above=True`` makes the minimum exclusive,
    ``below=True`` the maximum); ints
    are at most :data:`INT64_MAX` unless ``maximum`` says otherwise; ``choices`` lists the
    strings allowed; ``why`` is said after a range error."""

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    below: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""

    def check(self, key: str, value: Any) -> Any:
        """``value`` coerced (int -> float, integral float -> int) and checked; ConfigError
        naming ``key`` otherwise."""
        return _check_value(key, value, self)


_TRAIN_SPECS: dict[str, Spec] = {
    "epochs": Spec(int, 1), "batch_size": Spec(int, 1), "eval_batch_size": Spec(int, 1),
    "lr": Spec(float, 0), "weight_decay": Spec(float, 0),
    "lr_schedule": Spec(str, choices=LR_SCHEDULES), "warmup_steps": Spec(int, 0),
    "min_lr_ratio": Spec(float, 0, 1), "step_epochs": Spec(int, 1), "gamma": Spec(float, 0),
    "plateau_factor": Spec(float, 0, 1), "plateau_patience": Spec(int, 0),
    "patience": Spec(int, 1, nullable=True), "seed": Spec(int, *SEED_RANGE),
    "max_steps_per_epoch": Spec(int, 1, nullable=True),
    "grad_clip": Spec(float, 0, above=True, nullable=True), "log_every": Spec(int, 1),
    "embedding_sharding": Spec(str, choices=EMBEDDING_SHARDINGS),
}
assert _TRAIN_SPECS.keys() == TRAIN_DEFAULTS.keys()


class ConfigError(ValueError):
    """An invalid config file, override or value (the message names the key)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and refuses a
    float literal that float64 cannot hold: ``1e-400`` would silently read as 0.0 (a
    temperature of 0) and ``1e400`` as inf."""


class _NumberRangeError(yaml.constructor.ConstructorError):
    """A float literal beyond float64 (raised while parsing, named with its line)."""


_INF_LITERAL = re.compile(r"[-+]?\.(?:inf|Inf|INF)")


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    text = str(node.value)
    mantissa = re.split(r"[eE]", text)[0]
    if value == 0.0 and re.search(r"[1-9]", mantissa):
        raise _NumberRangeError(None, None, f"{shorten(text)} is too small for a float64 (it "
                                            "would read as 0.0)", node.start_mark)
    if math.isinf(value) and not _INF_LITERAL.fullmatch(text):
        raise _NumberRangeError(None, None, f"{shorten(text)} is too large for a float64 (it "
                                            "would read as inf; .inf is infinity)",
                                node.start_mark)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Any:
    """A mapping, refusing a key given twice: YAML keeps the last silently (a second ``train:``
    block would replace the first whole, a second ``lr:`` the first value). Merge keys
    (``<<: *base``) may still be overridden."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node)
        except TypeError:  # an unhashable key: SafeLoader's own error follows
            continue
        if first is not key_node:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {shorten(str(key), 40)} is given twice in one mapping "
                f"(first on line {first.start_mark.line + 1}); YAML would silently keep the "
                "last", key_node.start_mark)
    return yaml.SafeLoader.construct_yaml_map(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: ``line L, column C: problem``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping (with :class:`_Loader`'s number rules); ConfigError naming the file
    (and the line) when it is not UTF-8 YAML holding a mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text)") from None
    except ValueError as e:  # int() refuses literals of more than sys.get_int_max_str_digits()
        raise ConfigError(f"{path}: not a readable number: {str(e).split(';')[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parses an override's value as YAML: ``3`` -> int, ``0.5``/``1e-3`` -> float,
    ``true``/``false`` -> bool, ``null``/``~`` -> None, ``[a, 2]`` -> list, ``{k: v}`` -> dict;
    anything else stays a string. A number float64 cannot hold (``1e-400``, ``1e400``) or an
    integer too long to parse is a ConfigError, not a silent 0.0 / inf."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except _NumberRangeError as e:
        raise ConfigError(e.problem) from None
    except yaml.YAMLError:
        return text
    except ValueError as e:  # int() refuses literals of more than sys.get_int_max_str_digits()
        raise ConfigError(f"not a readable number: {str(e).split(';')[0]}") from None


def default_config_path() -> Path:
    """The packaged default config of ``cetnet train`` (CETNet on MovieLens-100k)."""
    return Path(str(resources.files("cetnet") / "configs" / DEFAULT_CONFIG))


def paper_config_path() -> Path:
    """The packaged config of CETNet as the paper pairs it (DHEN + InterFormer on
    MovieLens-100k): the base config of ``cetnet reproduce`` and ``cetnet search``."""
    return Path(str(resources.files("cetnet") / "configs" / PAPER_CONFIG))


def _split_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {shorten(item)}: expected KEY=VALUE with a dotted KEY, "
                          "e.g. train.epochs=3")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {shorten(item)}: empty component in key {shorten(key)}")
    try:
        return parts, parse_value(value)
    except ConfigError as e:
        raise ConfigError(f"override {shorten(item)}: {e}") from None


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Returns a copy of ``config`` with ``a.b.c=value`` overrides applied, in order.

    In the closed parts of the config (top level, ``train``) the key must exist; in the open
    sections (``data``, ``model``) new keys and sub-mappings may be created.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        parts, value = _split_override(item)
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"override {shorten(item)}: unknown top-level key "
                              f"{shorten(parts[0])}; known: {', '.join(TOP_LEVEL_KEYS)}")
        node: Any = config
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth + 1])
            if part not in node:
                if parts[0] not in OPEN_SECTIONS:
                    raise ConfigError(f"override {shorten(item)}: unknown key "
                                      f"{shorten(where)}")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {shorten(item)}: {shorten(where)} is a "
                                  f"{type(node).__name__}, not a mapping")
        last = parts[-1]
        if parts[0] not in OPEN_SECTIONS and len(parts) > 1 and last not in node:
            known = ", ".join(map(str, node)) if isinstance(node, dict) else ""
            raise ConfigError(f"override {shorten(item)}: unknown key "
                              f"{shorten('.'.join(parts))}; known: {known}")
        node[last] = value
    return config


def _kind_name(spec: Spec) -> str:
    article = "an" if spec.kind is int else "a"
    return f"{'null or ' if spec.nullable else ''}{article} {spec.kind.__name__}"


def _range_text(spec: Spec) -> str:
    lo, hi = spec.minimum, spec.maximum
    if lo is not None and hi is not None:
        close = ")" if spec.below else "]"
        if spec.kind is float:
            return f"in {'(' if spec.above else '['}{lo:g}, {hi:g}{close}"
        return f"in {'(' if spec.above else '['}{lo}, {hi}{close}"
    parts = [f"{'>' if spec.above else '>='} {lo}"] if lo is not None else []
    parts += [f"{'<' if spec.below else '<='} {hi}"] if hi is not None else []
    return " and ".join(parts)


def _check_value(key: str, value: Any, spec: Spec) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"config: {key} must not be null")
    # bool is an int subclass: True must not pass as 1 (or as 1.0)
    if isinstance(value, bool) != (spec.kind is bool):
        raise ConfigError(f"config: {key} must be {_kind_name(spec)}, got {shorten(value)}")
    if spec.kind is float and isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config: {key} must be a finite float, got an integer of "
                              f"{len(str(abs(value)))} digits") from None
    if spec.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # e.g. 1e4 steps
    if not isinstance(value, spec.kind):
        raise ConfigError(f"config: {key} must be {_kind_name(spec)}, got {shorten(value)}")
    # the isinstance checks below hold by now (value is a spec.kind); they narrow its type
    if spec.kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config: {key} must be finite, got {value!r}")
    if spec.kind in (int, float) and isinstance(value, (int, float)):
        lo, hi = spec.minimum, spec.maximum
        if ((lo is not None and (value < lo or (spec.above and value == lo)))
                or (hi is not None and (value > hi or (spec.below and value == hi)))):
            raise ConfigError(f"config: {key} must be {'null or ' if spec.nullable else ''}"
                              f"{_range_text(spec)}, got {shorten(value)}"
                              + (f" ({spec.why})" if spec.why else ""))
        if spec.kind is int and hi is None and value > INT64_MAX:
            raise ConfigError(f"config: {key} must be <= {INT64_MAX} (int64), got "
                              f"{shorten(value)}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"config: {key} must be one of {', '.join(spec.choices)}, got "
                          f"{shorten(value)}")
    return value


def _reject_unknown(section: Mapping[str, Any], known: Sequence[str] | Mapping[str, Any],
                    what: str) -> None:
    unknown = [k for k in section if k not in known]
    if unknown:
        raise ConfigError(f"config: unknown {what} key(s) {unknown}; known: {', '.join(known)}")


def validate_config(config: Mapping[str, Any]) -> dict:
    """Checks a config and returns it with ``train`` completed from :data:`TRAIN_DEFAULTS` and
    numbers coerced (``lr: 1`` -> 1.0). Raises :class:`ConfigError` naming the bad key."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: must be a mapping, got {type(config).__name__}")
    _reject_unknown(config, TOP_LEVEL_KEYS, "top-level")
    out = copy.deepcopy(dict(config))
    name = out.get("name")
    if not isinstance(name, str) or not name or "/" in name or not name.isprintable():
        raise ConfigError(f"config: name must be a non-empty string without '/' or control "
                          f"characters (it names the run directory), got {shorten(name)}")
    data = out.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"config: data must be a mapping with a string 'name' (the dataset), "
                          f"got {shorten(data)}")
    if not isinstance(out.get("model"), dict):
        raise ConfigError(f"config: model must be a mapping (see docs/MODEL_LIBRARY.md), got "
                          f"{shorten(out.get('model'))}")
    train = out.get("train")
    train = {} if train is None else train  # "train:" with nothing under it: the defaults
    if not isinstance(train, dict):
        raise ConfigError(f"config: train must be a mapping, got {shorten(train)}")
    _reject_unknown(train, TRAIN_DEFAULTS, "train")
    out["train"] = {k: _check_value(f"train.{k}", train.get(k, default), _TRAIN_SPECS[k])
                    for k, default in TRAIN_DEFAULTS.items()}
    from cetnet_kernels.backends import BACKENDS  # imported late: it loads the extension

    out["backend"] = _check_value("backend", out.get("backend", "auto"),
                                  Spec(str, choices=BACKENDS))
    out["device"] = check_device(out.get("device", "auto"))
    out["embedding"] = _check_value("embedding", out.get("embedding", "cetnet"),
                                    Spec(str, choices=EMBEDDINGS))
    return out


def check_device(value: Any, key: str = "config: device") -> str:
    """``value`` if it names a device a config may give (auto, cpu, cuda, cuda:N), else a
    ConfigError naming ``key``. Whether CUDA is there is checked when the run starts
    (:func:`cetnet.train.loop.resolve_device`)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d{1,6})?", value):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {shorten(value)}")
    return value


def resolve_data_config(config: dict, config_path: str | Path) -> dict:
    """Makes a relative ``data.config`` of the config read from ``config_path`` the absolute
    path of the file of that name in ``config_path``'s folder, when that file exists; leaves
    it as it is otherwise (relative to the working directory, where the dataset loader looks
    for it). A packaged train config thus finds the packaged dataset YAML beside it from any
    working directory. Returns ``config`` (changed in place)."""
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    value = data.get("config")
    if not isinstance(value, str) or not value or value.startswith("~"):
        return config
    try:
        beside = Path(config_path).parent / value
        if not Path(value).is_absolute() and beside.exists():
            data["config"] = os.path.abspath(beside)
    except (OSError, ValueError):  # a name too long, a NUL byte: the loader reports the value
        pass
    return config


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Reads a config file (the packaged default when ``path`` is None), applies the dotted
    overrides and validates the result (see :func:`validate_config`).

    A file that leaves out ``data`` or ``model`` takes them from the default config; a
    ``train`` section is completed from :data:`TRAIN_DEFAULTS`. A relative ``data.config`` in
    the file is resolved beside it first (:func:`resolve_data_config`); one given by an
    override stays relative to the working directory.
    """
    file = default_config_path() if path is None else path
    config = resolve_data_config(read_yaml(file), file)
    if path is not None:
        default = read_yaml(default_config_path())
        for key in ("name", "data", "model"):
            config.setdefault(key, copy.deepcopy(default.get(key)))
    train = config.setdefault("train", {})
    train = {} if train is None else train
    if not isinstance(train, dict):
        raise ConfigError(f"{path}: train must be a mapping, got {shorten(train)}")
    config["train"] = {**TRAIN_DEFAULTS, **train}
    config.setdefault("backend", "auto")
    config.setdefault("device", "auto")
    config.setdefault("embedding", "cetnet")
    return validate_config(apply_overrides(config, overrides))


def dump_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Writes a (resolved) config as YAML, keys in their order, atomically (a reader sees the
    old file or the new one, never half of one)."""
    write_text_atomic(path, yaml.safe_dump(dict(config), sort_keys=False,
                                           default_flow_style=None))
