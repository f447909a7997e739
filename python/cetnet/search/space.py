"""The search space of ``cetnet search``: a YAML file, checked whole when it is read, and its
sampling into an ordinary run config through Optuna's define-by-run API.

A parameter is a list (categorical choices), a mapping ``{low, high[, log]}`` (a range:
integers when ``low`` and ``high`` are both integers, else floats) or a single value (fixed).
A width list of a member (``hidden``, ``head``, ``dot_hidden``) may be given as
``{width: <parameter>, depth: <parameter>}``: ``depth`` layers of one sampled width.

Top-level keys (see ``default_space.yaml``): ``ensemble``, ``members: {count, kinds}``,
``embedding_dim`` (one per member slot), ``member: {<kind>: {<option>: <parameter>}}``,
``fusion`` (CETNet), ``naive``, ``multi_embedding``, ``model`` (other ``model:`` keys),
``train`` (``train:`` keys) and ``base`` (fixed config values merged over the dataset's).
A parameter under a member kind exists only in a trial that chose the kind, one under an
ensemble section only in a trial of that ensemble: Optuna records only what was sampled.
"""

from __future__ import annotations

import collections.abc
import copy
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cetnet.config import TOP_LEVEL_KEYS, TRAIN_DEFAULTS, ConfigError, parse_value, read_yaml
from cetnet.messages import clip, shorten
from cetnet.models.build import ENSEMBLES, MEMBERS, model_keys, section_option_names

__all__ = ["SpaceError", "default_space_path", "load_space", "check_values", "sample_config",
           "merge", "overridden_sets"]

TOP_KEYS = ("ensemble", "members", "embedding_dim", "member", "fusion", "naive",
            "multi_embedding", "model", "train", "base")
ENSEMBLE_SECTIONS = {"fusion": "cetnet", "naive": "naive", "multi_embedding": "multi_embedding"}
MODEL_KEYS = ("embedding_optimizer", "embedding_lr", "shared_embedding")
RANGE_KEYS = ("low", "high", "log")
LAYERS_KEYS = ("width", "depth")
#: ``base`` keys a space may not set, and why: the study records its data (and sizes the
#: warm-up and counts the cost on it) from --dataset and --set, and names each trial's run.
BASE_REFUSED = {
    "data": "the trials' data is --dataset with --set data.<key>=... (what the study records, "
            "sizes its warm-up from and resumes against)",
    "name": "the search names each trial's run (<study>-<trial>)",
}


class SpaceError(ConfigError):
    """An invalid search space (the message names the file and the key)."""


def default_space_path() -> Path:
    """The packaged default space (python/cetnet/search/default_space.yaml)."""
    return Path(str(resources.files("cetnet.search") / "default_space.yaml"))


def _fail(where: str, key: str, message: str) -> SpaceError:
    return SpaceError(f"search space {where}: {key}: {message}")


def _check_param(where: str, key: str, value: Any, layers: bool = False) -> None:
    """A parameter: a non-empty list of scalars, a {low, high[, log]} range, or a scalar
    (with ``layers``, also ``{width, depth}``)."""
    scalar = (type(None), bool, int, float, str)
    if isinstance(value, list):
        if not value or not all(isinstance(v, scalar) for v in value):
            raise _fail(where, key, f"a list of choices must be non-empty and hold numbers, "
                                    f"strings, booleans or null, got {shorten(value)}")
        return
    if isinstance(value, Mapping):
        if layers and set(value) <= set(LAYERS_KEYS) and value:
            if set(value) != set(LAYERS_KEYS):
                raise _fail(where, key, "a layer list needs both width and depth")
            for k in LAYERS_KEYS:
                _check_param(where, f"{key}.{k}", value[k])
            return
        unknown = [k for k in value if k not in RANGE_KEYS]
        if unknown or "low" not in value or "high" not in value:
            allowed = "{low, high[, log]}" + (" or {width, depth}" if layers else "")
            raise _fail(where, key, f"a range is {allowed}, got {shorten(dict(value))}")
        lo, hi = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (lo, hi)) or lo > hi:
            raise _fail(where, key, f"low and high must be finite numbers with low <= high, got "
                                    f"{shorten(lo)}, {shorten(hi)}")
        log = value.get("log", False)
        if not isinstance(log, bool) or (log and lo <= 0):
            raise _fail(where, key, "log must be true or false, and a log range needs low > 0")
        return
    if not isinstance(value, scalar):
        raise _fail(where, key, f"expected a list of choices, a {{low, high}} range or a value, "
                                f"got {shorten(value)}")


def _check_count(where: str, key: str, value: Any, low: int, high: int) -> None:
    """A parameter that is a count (members, layers, embedding sets): integers in
    [low, high]; a range needs integer bounds (a float range would be sampled as floats and
    truncated, never reaching its top)."""
    _check_param(where, key, value)
    if isinstance(value, Mapping) and not all(
            isinstance(value[k], int) and not isinstance(value[k], bool) for k in ("low", "high")):
        raise _fail(where, key, f"a count range needs integer low and high, got "
                                f"{shorten(dict(value))}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and low <= c <= high
               for c in _choices(value)):
        raise _fail(where, key, f"must be integers in [{low}, {high}], got {shorten(value)}")


def _layer_options(section: str) -> list[str]:
    """The options of a ``model:`` section (a member kind, ``multi_embedding``) that take a list
    of widths (``hidden``, ``head``, ...): the only ones a ``{width, depth}`` parameter fits."""
    import inspect
    import types
    import typing

    from cetnet.models.build import _section_targets

    fn, skip = _section_targets()[section]
    found = []
    for name, p in inspect.signature(fn, eval_str=True).parameters.items():
        union = typing.get_origin(p.annotation) in (typing.Union, types.UnionType)
        kinds = typing.get_args(p.annotation) if union else (p.annotation,)
        if name not in skip and any(
                typing.get_origin(k) in (collections.abc.Sequence, list, tuple)
                and typing.get_args(k) == (int,) for k in kinds):
            found.append(name)
    return found


def _check_layers(where: str, path: str, section: str, key: str, value: Any) -> None:
    """``{width, depth}`` only for a layer list; a layer list never as a list of widths or a
    width: a list is a choice of one value (``hidden: [64, 128]`` would sample 64 or 128, which
    no layer list is)."""
    layers = _layer_options(section)
    if key in layers:
        widths = value if isinstance(value, list) else [value]
        if any(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise _fail(where, f"{path}.{key}", f"a list here is a choice of one width, "
                                                   f"but {key} is a list of layer widths: give "
                                                   f"{{width: {shorten(value)}, depth: "
                                                   f"<layers>}}")
    elif isinstance(value, Mapping) and value and set(value) <= set(LAYERS_KEYS):
        raise _fail(where, f"{path}.{key}", f"{{width, depth}} makes a list of layer widths, "
                                               f"which {key} is not (layer lists here: "
                                               f"{', '.join(layers) or 'none'})")


def _check_keys(where: str, section: str, given: Mapping, allowed: list[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise _fail(where, f"{section}.{unknown[0]}", f"unknown key; known: "
                                                      f"{', '.join(sorted(allowed))}")


def _section(where: str, space: Mapping, key: str) -> dict:
    value = space.get(key) or {}
    if not isinstance(value, Mapping):
        raise _fail(where, key, f"must be a mapping, got {shorten(value)}")
    return dict(value)


def _choices(value: Any) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, Mapping):
        return list(range(int(value["low"]), int(value["high"]) + 1))
    return [value]


def _check_space(raw: Mapping, where: str) -> dict:
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _fail(where, str(unknown[0]), f"unknown key; known: {', '.join(TOP_KEYS)}")
    space = copy.deepcopy(dict(raw))
    space.setdefault("ensemble", ["cetnet"])
    _check_param(where, "ensemble", space["ensemble"])
    bad = [e for e in _choices(space["ensemble"]) if e not in ENSEMBLES]
    if bad or isinstance(space["ensemble"], Mapping):
        raise _fail(where, "ensemble", f"choose from {', '.join(ENSEMBLES)}, got {shorten(bad)}")
    members = _section(where, space, "members")
    unknown = [k for k in members if k not in ("count", "kinds")]
    if unknown:
        raise _fail(where, f"members.{unknown[0]}", "unknown key; known: count, kinds")
    members.setdefault("count", 2)
    members.setdefault("kinds", list(MEMBERS))
    _check_count(where, "members.count", members["count"], 1, 16)
    _check_param(where, "members.kinds", members["kinds"])
    kinds = _choices(members["kinds"])
    if isinstance(members["kinds"], Mapping) or any(k not in MEMBERS for k in kinds):
        raise _fail(where, "members.kinds", f"choose from {', '.join(MEMBERS)}, got "
                                            f"{shorten(members['kinds'])}")
    space["members"] = members
    space.setdefault("embedding_dim", 16)
    _check_param(where, "embedding_dim", space["embedding_dim"])
    member = _section(where, space, "member")
    for kind, options in member.items():
        if kind not in MEMBERS:
            raise _fail(where, f"member.{kind}", f"unknown member kind; known: "
                                                 f"{', '.join(MEMBERS)}")
        if not isinstance(options, Mapping):
            raise _fail(where, f"member.{kind}", f"must be a mapping, got {shorten(options)}")
        _check_keys(where, f"member.{kind}", options, section_option_names(kind))
        for k, v in options.items():
            _check_layers(where, f"member.{kind}", kind, k, v)
            _check_param(where, f"member.{kind}.{k}", v, layers=True)
            if isinstance(v, Mapping) and "depth" in v:
                _check_count(where, f"member.{kind}.{k}.depth", v["depth"], 0, 64)
    space["member"] = member
    for key in ("fusion", "naive", "multi_embedding", "model", "train"):
        section = _section(where, space, key)
        for k, v in section.items():
            if key == "model" and k not in MODEL_KEYS:
                raise _fail(where, f"model.{k}", f"unknown key; known: {', '.join(MODEL_KEYS)} "
                                                 "(the other model keys have their own sections)")
            if key == "train" and k not in TRAIN_DEFAULTS:
                raise _fail(where, f"train.{k}", f"unknown key; known: "
                                                 f"{', '.join(TRAIN_DEFAULTS)}")
            if key == "multi_embedding":
                _check_layers(where, key, key, k, v)
            _check_param(where, f"{key}.{k}", v, layers=key == "multi_embedding")
        if key in ENSEMBLE_SECTIONS:
            _check_keys(where, key, section, section_option_names(key))
        space[key] = section
    if "num_sets" in space["multi_embedding"]:
        _check_count(where, "multi_embedding.num_sets", space["multi_embedding"]["num_sets"],
                     1, 16)
    space["base"] = _check_base(where, _section(where, space, "base"))
    return space


def _check_base(where: str, base: dict) -> dict:
    """The space's fixed config values: keys a run config has (top level, ``train``,
    ``model`` and its sections), so that a typo fails here, not in every trial."""
    _check_keys(where, "base", base, list(TOP_LEVEL_KEYS))
    for key, why in BASE_REFUSED.items():
        if key in base:
            raise _fail(where, f"base.{key}", f"not in a space: {why}")
    for key, allowed in (("train", list(TRAIN_DEFAULTS)), ("model", model_keys())):
        section = base.get(key)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise _fail(where, f"base.{key}", f"must be a mapping, got {shorten(section)}")
        _check_keys(where, f"base.{key}", section, allowed)
    for name, options in (base.get("model") or {}).items():
        if name in MEMBERS or name in ENSEMBLE_SECTIONS:
            if not isinstance(options, Mapping):
                raise _fail(where, f"base.model.{name}", f"must be a mapping, got "
                                                         f"{shorten(options)}")
            _check_keys(where, f"base.model.{name}", options, section_option_names(name))
    return base


def load_space(path: str | Path | None = None) -> dict:
    """The space of a YAML file (``None`` or ``"default"``: the packaged one), checked: a bad
    key or value is a :class:`SpaceError` naming the file and the key."""
    if path is None or str(path) == "default":
        path = default_space_path()
    if not Path(path).is_file():
        raise SpaceError(f"search space {path}: no such file (give a space YAML or 'default')")
    raw = read_yaml(path)
    if not raw:  # it would be a space of the checks' defaults, not the packaged one
        raise SpaceError(f"search space {path}: the file is empty: give at least one key (see "
                         f"{default_space_path().name}), or --space default")
    return _check_space(raw, str(path))


def _suggest(trial: Any, name: str, value: Any) -> Any:
    """One parameter of the trial (a fixed value is not an Optuna parameter)."""
    if isinstance(value, list):
        return value[0] if len(value) == 1 else trial.suggest_categorical(name, value)
    if isinstance(value, Mapping) and "width" in value:
        width = _suggest(trial, f"{name}.width", value["width"])
        return [width] * int(_suggest(trial, f"{name}.depth", value["depth"]))
    if isinstance(value, Mapping):
        lo, hi, log = value["low"], value["high"], value.get("log", False)
        if lo == hi:
            return lo
        if isinstance(lo, int) and isinstance(hi, int):
            return trial.suggest_int(name, lo, hi, log=log)
        return trial.suggest_float(name, float(lo), float(hi), log=log)
    return value


def merge(base: Mapping, over: Mapping) -> dict:
    """``base`` with ``over`` merged in, mappings recursively."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) \
            else copy.deepcopy(v)
    return out


def sample_config(trial: Any, space: Mapping, base: Mapping) -> dict:
    """The run config of one trial: ``base`` (the dataset's config) with the space's ``base``
    merged in, then the sampled model and train values (not yet validated). Of the dataset
    config's ``model:`` only ``embedding_optimizer``, ``embedding_lr`` and ``shared_embedding``
    are kept: the rest is the space's."""
    config = copy.deepcopy(dict(base))
    config["model"] = {k: v for k, v in config.get("model", {}).items() if k in MODEL_KEYS}
    config = merge(config, space["base"])
    model: dict[str, Any] = {}
    ensemble = _suggest(trial, "ensemble", space["ensemble"])
    model["ensemble"] = ensemble
    for k, v in space["model"].items():
        model[k] = _suggest(trial, f"model.{k}", v)
    if ensemble == "multi_embedding":
        options = {k: _suggest(trial, f"multi_embedding.{k}", v)
                   for k, v in space["multi_embedding"].items()}
        sets = int(options.get("num_sets", 2))
        options["num_sets"] = sets
        model["embedding_dim"] = [_suggest(trial, f"embedding_dim.{i}", space["embedding_dim"])
                                  for i in range(sets)]
        model["multi_embedding"] = options
    else:
        count = int(_suggest(trial, "members.count", space["members"]["count"]))
        kinds = [_suggest(trial, f"members.{i}.kind", space["members"]["kinds"])
                 for i in range(count)]
        model["members"] = kinds
        model["embedding_dim"] = [_suggest(trial, f"embedding_dim.{i}", space["embedding_dim"])
                                  for i in range(count)]
        for kind in dict.fromkeys(kinds):  # each chosen kind once, in order
            options = space["member"].get(kind, {})
            model[kind] = {k: _suggest(trial, f"member.{kind}.{k}", v)
                           for k, v in options.items()}
        for section, owner in ENSEMBLE_SECTIONS.items():
            if owner == ensemble and section != "multi_embedding":
                model[section] = {k: _suggest(trial, f"{section}.{k}", v)
                                  for k, v in space[section].items()}
    config["model"] = merge(config["model"], model)
    train = dict(config.get("train", {}))
    for k, v in space["train"].items():
        train[k] = _suggest(trial, f"train.{k}", v)
    config["train"] = train
    return config


def overridden_sets(space: Mapping, overrides: Sequence[str]) -> list[str]:
    """One sentence per ``--set KEY=VALUE`` of ``overrides`` that no trial sees, as
    :func:`sample_config` builds a trial's config (the dataset's config with ``--set``, then the
    space's ``base``, then the sampled values): a key the space's ``base`` sets, a ``train`` or
    ``model`` key the space searches, or a ``model`` key besides :data:`MODEL_KEYS` (the trials'
    model is the space's). Each names the key and both values. ``overrides`` are those the
    dataset's config took (well-formed)."""
    out = []
    for item in overrides:
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        found = [why for path in _leaves(parts, parse_value(text))
                 if (why := _set_over(space, path)) is not None]
        if found:
            out.append(f"--set {key.strip()}={text} does not reach the trials: "
                       + "; ".join(dict.fromkeys(found)))
    return out


_UNSET = object()


def _leaves(parts: list[str], value: Any) -> list[list[str]]:
    """The keys a ``--set`` value fills: ``train={epochs: 1}`` fills ``train.epochs``."""
    if isinstance(value, Mapping) and value:
        return [leaf for k, v in value.items() for leaf in _leaves([*parts, str(k)], v)]
    return [parts]


def _set_over(space: Mapping, path: list[str]) -> str | None:
    """What the space puts over the config key ``path`` (None: nothing)."""
    node: Any = space["base"]
    for depth, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            break
        node = node[part]
        if depth == len(path) - 1 or not isinstance(node, Mapping):  # merge replaces a leaf
            return (f"the space's base sets {'.'.join(path[:depth + 1])}: {shorten(node)} (a "
                    f"space's base wins over --set)")
    section, name = path[0], path[1] if len(path) > 1 else None
    if section == "train" and name in space["train"]:
        return f"the space searches train.{name} over {shorten(space['train'][name])}"
    if section != "model" or name is None:
        return None
    if name in MODEL_KEYS:
        return (f"the space searches model.{name} over {shorten(space['model'][name])}"
                if name in space["model"] else None)
    # sample_config keeps only MODEL_KEYS of the dataset's model: the rest is the space's
    searched = {"ensemble": space["ensemble"], "members": space["members"],
                "embedding_dim": space["embedding_dim"], **space["member"],
                **{k: space[k] for k in ENSEMBLE_SECTIONS}}
    node, label = searched.get(name, _UNSET), ("member." if name in MEMBERS else "") + name
    for part in path[2:]:
        node = node.get(part, _UNSET) if isinstance(node, Mapping) else _UNSET
        label += f".{part}"
    what = "its default" if node is _UNSET else f"the space's {label} {shorten(node)}"
    return (f"the trials' model is the space's ({'.'.join(path)}: {what}); of model, --set "
            f"sets only {', '.join(MODEL_KEYS)}")


class _Probe:
    """An Optuna trial's stand-in for :func:`check_values`: each parameter takes the value
    ``values`` gives it, else its first choice (a range: its low end); every parameter asked
    for is recorded with the values to try (the choices; a range's ends, and a float range's
    inside too: an integer option fails there only)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = dict(values)
        self.asked: dict[str, tuple[list, Any]] = {}  # name -> (values to try, value taken)
        self.float_ranges: set[str] = set()  # (their third value is inside)

    def _take(self, name: str, tries: list) -> Any:
        value = self.values.get(name, tries[0])
        self.asked[name] = (tries, value)
        return value

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self._take(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int, log: bool = False) -> int:
        return int(self._take(name, [low, high]))

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        inside = math.exp(math.log(low) + 0.382 * (math.log(high) - math.log(low))) if log \
            else low + 0.382 * (high - low)  # not a round number: an integer option fails
        self.float_ranges.add(name)
        return float(self._take(name, [low, high, inside]))


def _space_key(name: str) -> str:
    """The space key of an Optuna parameter name (``members.1.kind`` -> ``members.kinds``)."""
    name = re.sub(r"^members\.\d+\.kind$", "members.kinds", name)
    return re.sub(r"^embedding_dim\.\d+$", "embedding_dim", name)


def _lookup(space: Mapping, key: str) -> Any:
    value: Any = space
    for part in key.split("."):
        value = value[part]
    return value


def _key_of_error(error: str, space: Mapping) -> str | None:
    """The space key of the config key a ConfigError names (``config: model.dnn.hidden[0]
    must ...`` -> ``member.dnn.hidden``), when the space gives it; else None."""
    found = re.search(r"config: (model|train)\.(\w+)(?:\.(\w+))?", error)
    if found is None:
        return None
    section, first, second = found.groups()
    if section == "train":
        key = f"train.{first}"
    elif first == "embedding_dim":
        key = first
    elif first in MODEL_KEYS:
        key = f"model.{first}"
    elif first in MEMBERS and second:
        key = f"member.{first}.{second}"
    elif first in ENSEMBLE_SECTIONS and second:
        key = f"{first}.{second}"
    else:
        return None
    try:
        _lookup(space, key)
    except (KeyError, TypeError):
        return None
    return key


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def check_values(space: Mapping, base: Mapping, check: Callable[[dict], None],
                 where: str) -> None:
    """Every value of the space checked before a trial runs: ``check`` (a ConfigError for a
    config no trial could run) is called on trial configs that differ from a valid one in one
    parameter, until every choice and every range end (and a point inside a float range) of
    every parameter reachable has been in one. A value no checked config holding it passes
    (tried again with every other choice of each other parameter) is a SpaceError naming the
    file, the key the config's error names (when the space gives it; else the parameter) and
    the value. A value that only some combinations refuse (8 heads at dim 8, not at dim 16) is
    left to the trials that draw it: they fail as any invalid trial does."""
    float_ranges: set[str] = set()

    def probe(values: Mapping[str, Any]) -> tuple[dict[str, tuple[list, Any]], str | None]:
        trial = _Probe(values)
        error = None
        try:
            config = sample_config(trial, space, base)
            check(config)
        except (ValueError, TypeError) as e:  # (a ConfigError is a ValueError)
            error = str(e)
        float_ranges.update(trial.float_ranges)
        return trial.asked, error

    def refuse(name: str, value: Any, error: str, asked: Mapping[str, tuple[list, Any]],
               inside: str = "") -> SpaceError:
        key = _key_of_error(error, space)
        if key is not None and key != _space_key(name):  # what the error names, if given:
            # the value the failed config took for it (a fixed value: the space's)
            name, value = next(((n, t) for n, (_, t) in asked.items()
                                if _space_key(n) == key or n.startswith(key + ".")),
                               (key, _lookup(space, key)))
            inside = ""
        if isinstance(value, list) and len(value) == 1:  # one choice: a fixed value
            value = value[0]
        return _fail(where, _space_key(name), f"{shorten(value)}{inside} makes an invalid "
                                              f"trial config: {clip(error, 300)}")

    def seen(name: str, value: Any) -> tuple[str, type, str]:
        return name, type(value), repr(value)

    asked, error = probe({})
    start: dict[str, Any] = {}
    if error is not None:  # a valid config one parameter away from the first choices
        first = error
        found: dict[str, Any] | None = next(
            ({name: value} for name, (tries, taken) in asked.items() for value in tries
             if not _same(value, taken) and probe({name: value})[1] is None), None)
        if found is None:
            key = _key_of_error(first, space)
            if key is not None:  # the value the first choices took for the key it names
                raise refuse(*next(((n, t) for n, (_, t) in asked.items()
                                    if _space_key(n) == key or n.startswith(key + ".")),
                                   (key, _lookup(space, key))), first, asked)
            raise SpaceError(f"search space {where}: the trial config of every parameter's "
                             f"first choice is invalid: {clip(first, 300)}")
        start = found
        asked, _ = probe(start)
    tries_of = {name: tries for name, (tries, _) in asked.items()}
    passed = {seen(name, taken) for name, (_, taken) in asked.items()}
    failed: dict[tuple, tuple[str, Any, dict[str, Any], str, dict]] = {}
    queue: list[tuple[dict[str, Any], dict[str, tuple[list, Any]]]] = [(start, asked)]
    while queue:
        values, asked = queue.pop(0)
        for name, (tries, _) in asked.items():
            for value in tries:
                k = seen(name, value)
                if k in passed or k in failed:
                    continue
                more, error = probe({**values, name: value})
                tries_of.update({n: t for n, (t, _) in more.items()})
                if error is not None:
                    failed[k] = (name, value, {**values, name: value}, error, more)
                    continue
                passed |= {seen(n, t) for n, (_, t) in more.items()}
                queue.append(({**values, name: value}, more))
    for k, (name, value, values, error, failed_asked) in failed.items():
        if k in passed:  # it passed beside other values
            continue
        for other, tries in tries_of.items():  # with each other choice of the others
            for alt in tries:
                if other == name or _same(alt, values.get(other)):
                    continue
                more, err = probe({**values, other: alt})
                if err is None and name in more and _same(more[name][1], value):
                    passed.add(k)
                    break
            if k in passed:
                break
        if k not in passed:
            inside = "" if name not in float_ranges or \
                any(_same(value, t) for t in tries_of[name][:2]) else \
                " (inside the range: float bounds sample floats; an integer needs integer " \
                "low and high)"
            raise refuse(name, value, error, failed_asked, inside)
