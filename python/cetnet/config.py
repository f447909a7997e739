"""Run configuration: a YAML file plus dotted ``key=value`` overrides, checked before a run.

A config has these top-level keys:

- ``name``: the run's name (the run directory is ``runs/<name>-<timestamp>`` by default).
- ``data``: ``{name: <dataset>, <option>: <value>, ...}``; the options go to
  ``cetnet.data.load_dataset(name, **options)`` as they are.
- ``model``: the ``model:`` section of docs/MODEL_LIBRARY.md, passed to ``build_model`` as it is.
- ``train``: the training settings of :data:`TRAIN_DEFAULTS` (checked here: unknown keys and
  wrong types are errors).
- ``backend``: the kernel backend for ``build_model`` (``"auto"`` or ``"reference"``).
- ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available).

``data`` and ``model`` are open sections (their keys are checked by the dataset and the model
builder); everything else is closed: a key that is not listed is an error, so a typo in an
override fails before any training.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["ConfigError", "TRAIN_DEFAULTS", "TOP_LEVEL_KEYS", "default_config_path",
           "load_config", "parse_value", "apply_overrides", "validate_config", "dump_config",
           "read_yaml"]

DEFAULT_CONFIG = "cetnet_ml100k.yaml"
TOP_LEVEL_KEYS = ("name", "data", "model", "train", "backend", "device")
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
}


@dataclass(frozen=True)
class _Spec:
    kind: type            # int, float, str or bool
    minimum: float | None = None
    nullable: bool = False
    choices: tuple[str, ...] = ()


_TRAIN_SPECS: dict[str, _Spec] = {
    "epochs": _Spec(int, 1), "batch_size": _Spec(int, 1), "eval_batch_size": _Spec(int, 1),
    "lr": _Spec(float, 0), "weight_decay": _Spec(float, 0),
    "lr_schedule": _Spec(str, choices=LR_SCHEDULES), "warmup_steps": _Spec(int, 0),
    "min_lr_ratio": _Spec(float, 0), "step_epochs": _Spec(int, 1), "gamma": _Spec(float, 0),
    "plateau_factor": _Spec(float, 0), "plateau_patience": _Spec(int, 0),
    "patience": _Spec(int, 1, nullable=True), "seed": _Spec(int),
    "max_steps_per_epoch": _Spec(int, 1, nullable=True),
    "grad_clip": _Spec(float, 0, nullable=True), "log_every": _Spec(int, 1),
}
assert _TRAIN_SPECS.keys() == TRAIN_DEFAULTS.keys()


class ConfigError(ValueError):
    """An invalid config file, override or value (the message names the key)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping (with :class:`_Loader`'s number rules)."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parses an override's value as YAML: ``3`` -> int, ``0.5``/``1e-3`` -> float,
    ``true``/``false`` -> bool, ``null``/``~`` -> None, ``[a, 2]`` -> list, ``{k: v}`` -> dict;
    anything else stays a string."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def default_config_path() -> Path:
    """The packaged default config (CETNet with DHEN + InterFormer on MovieLens-100k)."""
    return Path(str(resources.files("cetnet") / "configs" / DEFAULT_CONFIG))


def _split_override(item: str) -> tuple[list[str], Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. "
                          "train.epochs=3")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r}: empty component in key {key!r}")
    return parts, parse_value(value)


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    """Returns a copy of ``config`` with ``a.b.c=value`` overrides applied, in order.

    In the closed parts of the config (top level, ``train``) the key must exist; in the open
    sections (``data``, ``model``) new keys and sub-mappings may be created.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        parts, value = _split_override(item)
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"override {item!r}: unknown top-level key {parts[0]!r}; known: "
                              f"{', '.join(TOP_LEVEL_KEYS)}")
        node: Any = config
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth + 1])
            if part not in node:
                if parts[0] not in OPEN_SECTIONS:
                    raise ConfigError(f"override {item!r}: unknown key {where!r}")
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {where!r} is a {type(node).__name__}, "
                                  "not a mapping")
        last = parts[-1]
        if parts[0] not in OPEN_SECTIONS and len(parts) > 1 and last not in node:
            known = ", ".join(node) if isinstance(node, dict) else ""
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(parts)!r}; known: "
                              f"{known}")
        node[last] = value
    return config


def _check_value(key: str, value: Any, spec: _Spec) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"config: {key} must not be null")
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # e.g. 1e4 steps
    if not isinstance(value, spec.kind) or (spec.kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"config: {key} must be {'null or ' if spec.nullable else ''}"
                          f"{'an' if spec.kind is int else 'a'} {spec.kind.__name__}, got "
                          f"{value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"config: {key} must be >= {spec.minimum}, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"config: {key} must be one of {', '.join(spec.choices)}, got "
                          f"{value!r}")
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
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"config: name must be a non-empty string without '/', got {name!r}")
    data = out.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError(f"config: data must be a mapping with a string 'name' (the dataset), "
                          f"got {data!r}")
    if not isinstance(out.get("model"), dict):
        raise ConfigError(f"config: model must be a mapping (see docs/MODEL_LIBRARY.md), got "
                          f"{out.get('model')!r}")
    train = out.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"config: train must be a mapping, got {train!r}")
    _reject_unknown(train, TRAIN_DEFAULTS, "train")
    out["train"] = {k: _check_value(f"train.{k}", train.get(k, default), _TRAIN_SPECS[k])
                    for k, default in TRAIN_DEFAULTS.items()}
    for key, default in (("backend", "auto"), ("device", "auto")):
        value = out.setdefault(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config: {key} must be a non-empty string, got {value!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", out["device"]):
        raise ConfigError(f"config: device must be auto, cpu, cuda or cuda:N, got "
                          f"{out['device']!r}")
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Reads a config file (the packaged default when ``path`` is None), applies the dotted
    overrides and validates the result (see :func:`validate_config`).

    A file that leaves out ``data`` or ``model`` takes them from the default config; a
    ``train`` section is completed from :data:`TRAIN_DEFAULTS`.
    """
    config = read_yaml(default_config_path() if path is None else path)
    if path is not None:
        default = read_yaml(default_config_path())
        for key in ("name", "data", "model"):
            config.setdefault(key, copy.deepcopy(default.get(key)))
    config.setdefault("train", {})
    config["train"] = {**TRAIN_DEFAULTS, **(config["train"] or {})}
    config.setdefault("backend", "auto")
    config.setdefault("device", "auto")
    return validate_config(apply_overrides(config, overrides))


def dump_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Writes a (resolved) config as YAML, keys in their order."""
    with open(path, "w") as f:
        yaml.safe_dump(dict(config), f, sort_keys=False, default_flow_style=None)
