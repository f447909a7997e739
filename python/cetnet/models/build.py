"""The member registry and ``build_model``: an :class:`Ensemble` from the run config's ``model:``
section (docs/MODEL_LIBRARY.md)."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from cetnet.config import ConfigError, Spec
from cetnet.messages import plugin_hint, shorten
from cetnet.data.schema import Schema
from cetnet.models.dcnv2 import DCNv2
from cetnet.models.dhen import DHEN
from cetnet.models.dnn import DNN
from cetnet.models.ensembles import (CETNet, Ensemble, KDEF, MultiEmbedding, NaiveEnsemble,
                                     unique_names)
from cetnet.models.front import EmbeddingFront
from cetnet.models.interformer import InterFormer
from cetnet_kernels import CETNetFusion
from cetnet_kernels.embedding import BOUNDS_CHECKS

__all__ = ["DEFAULTS", "ENSEMBLES", "MEMBERS", "build_member", "build_model"]

MEMBERS: dict[str, Callable[..., nn.Module]] = {
    "dnn": DNN, "dcnv2": DCNv2, "dhen": DHEN, "interformer": InterFormer}
ENSEMBLES = ("cetnet", "naive", "multi_embedding", "kdef")

DEFAULTS: dict[str, Any] = {
    "ensemble": "cetnet",
    "members": ["dhen", "interformer"],
    "embedding_dim": 16,
    "embedding_optimizer": "rowwise_adagrad",
    "embedding_lr": 0.05,
    "shared_embedding": False,
    "fusion": {},
}
#: ``model.embedding_bounds_check``: MultiTableEmbedding's ``bounds_check``. Optional and not in
#: DEFAULTS, so that configs without it resolve (and hash) as before.
BOUNDS_CHECK_KEY = "embedding_bounds_check"
# Sections of ensemble-specific options (keyword arguments of NaiveEnsemble / MultiEmbedding.build).
_SECTIONS = ("naive", "multi_embedding")
_FUSION_SKIP = ("self", "num_models", "backend", "validate")
_MEMBER_SKIP = ("self", "schema", "dim")
_MULTI_SKIP = ("schema", "dims", "optimizer", "lr", "bounds_check", "backend")

# --- the values of model options ----------------------------------------------------------------
# Every option is checked against the annotation of the keyword it feeds (int, float, bool, str,
# X | None, Sequence[int], Sequence[str]) before anything is built, with the ranges below: a
# float must be finite, a bool is never a number (Python makes True an int), an int is a width,
# a count or a size (>= 1) unless named in _MAY_BE_ZERO, bounded by MAX_COUNT / MAX_WIDTH.
# ConfigError names the key.

#: The smallest temperature a run may use: the fusion divides float32 logits by it.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)
_MAY_BE_ZERO = {"cross_layers", "dcn_layers", "num_pma", "num_recent", "num_layers"}
#: The most layers, sets, heads or tokens of one kind: far beyond any CTR model, and a typo like
#: 1e9 would otherwise build modules in a loop for hours.
MAX_COUNT = 1024
_COUNTS = {"cross_layers", "dcn_layers", "num_layers", "num_sets", "num_heads", "num_cls",
           "num_pma", "num_recent", "slots"}
#: The widest layer width, embedding dim or rank: with it, no product of sizes in a model
#: overflows int64 (torch fails on that even on the meta device); a million is far beyond
#: any CTR model.
MAX_WIDTH = 2**20
_FLOATS = {
    # 1 drops every activation in training: a constant model whose tables get no gradient
    "dropout": Spec(float, 0, 1, below=True),
    "temperature": Spec(float, MIN_TEMPERATURE, why="float32's smallest normal number: the "
                        "fusion divides float32 logits by it; a smaller literal such as 1e-400 "
                        "reads as 0.0"),
    "lr": Spec(float, 0),
}


def _float_spec(name: str, nullable: bool) -> Spec:
    spec = _FLOATS.get(name) or Spec(float, 0 if name.endswith("_weight") else None)
    return dataclasses.replace(spec, nullable=nullable)


def _int_spec(name: str, nullable: bool = False) -> Spec:
    """Counts (``_COUNTS``) up to MAX_COUNT; every other int is a width, dim or rank."""
    return Spec(int, 0 if name in _MAY_BE_ZERO else 1,
                MAX_COUNT if name in _COUNTS else MAX_WIDTH, nullable=nullable)


def _sequence_of(annotation: Any) -> type | None:
    """``int`` for ``Sequence[int]``, ``str`` for ``Sequence[str]``, else None."""
    if typing.get_origin(annotation) in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(annotation)
        if len(args) == 1 and args[0] in (int, str):
            return args[0]
    return None


def _check_list(key: str, value: Any, item: type) -> list:
    """A list (or tuple) of ints (widths, dims: each >= 1) or of strings."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config: {key} must be a list of {item.__name__}s, got "
                          f"{shorten(value)}")
    spec = _int_spec(key.rsplit(".", 1)[-1]) if item is int else Spec(str)
    return [spec.check(f"{key}[{i}]", v) for i, v in enumerate(value)]


def check_option(key: str, value: Any, annotation: Any) -> Any:
    """``value`` of the option ``key`` (``model.dnn.dropout``), checked against the annotation
    of the keyword it feeds and the option's range, returned coerced (``0`` -> ``0.0`` for a
    float); ConfigError naming ``key`` otherwise. An annotation not understood passes."""
    name = key.rsplit(".", 1)[-1]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in (typing.get_args(annotation) if union else (annotation,))
             if a is not type(None)]
    nullable = union and len(kinds) < len(typing.get_args(annotation))
    if nullable and value is None:
        return None
    if len(kinds) == 2 and int in kinds and _sequence_of(kinds[kinds[0] is int]) is int:
        # int | Sequence[int]: one dim for all, or one per member / set
        if isinstance(value, (list, tuple)):
            return _check_list(key, value, int)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"config: {key} must be an int or a list of ints, got "
                              f"{shorten(value)}")
        return _int_spec(name).check(key, value)
    kind = kinds[0] if len(kinds) == 1 else None
    if kind is float:
        return _float_spec(name, nullable).check(key, value)
    if kind is int:
        return _int_spec(name, nullable).check(key, value)
    if kind in (bool, str):
        return Spec(kind, nullable=nullable).check(key, value)
    item = _sequence_of(kind)
    return value if item is None else _check_list(key, value, item)


def _checked_options(given: Mapping[str, Any], fn: Callable[..., Any], skip: tuple[str, ...],
                     where: str) -> dict[str, Any]:
    """The options of section ``where``, keys and values checked against the keyword arguments
    of ``fn`` (less ``skip``)."""
    params = {k: p for k, p in inspect.signature(fn, eval_str=True).parameters.items()
              if k not in skip}
    _check_keys(given, list(params), where)
    return {k: check_option(f"{where}.{k}", v, params[k].annotation) for k, v in given.items()}


def _check_keys(given: Mapping[str, Any], allowed: list[str], where: str) -> None:
    unknown = sorted(map(str, set(given) - set(allowed)))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown} in {where}; allowed: "
                          f"{sorted(allowed)}")


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config: model.{key} must be a mapping, got {shorten(value)}")
    return dict(value)


def _section_targets() -> dict[str, tuple[Callable[..., Any], tuple[str, ...]]]:
    """Each ``model:`` section (a member kind, fusion, naive, multi_embedding): the callable
    whose keyword arguments are its options, and the arguments that are not options."""
    return {
        **{kind: (cls, _MEMBER_SKIP) for kind, cls in MEMBERS.items()},
        "fusion": (CETNetFusion.__init__, _FUSION_SKIP),
        "naive": (NaiveEnsemble.__init__, ("self", "front", "members")),
        "multi_embedding": (MultiEmbedding.build, _MULTI_SKIP),
    }


def section_option_names(key: str) -> list[str]:
    """The options ``model.<key>`` takes (``key``: a member kind, ``fusion``, ``naive`` or
    ``multi_embedding``): what ``cetnet search`` checks a space's sections against."""
    fn, skip = _section_targets()[key]
    return [k for k in inspect.signature(fn, eval_str=True).parameters if k not in skip]


def model_keys() -> list[str]:
    """The keys a ``model:`` section may hold."""
    return list(DEFAULTS) + [BOUNDS_CHECK_KEY] + list(MEMBERS) + list(_SECTIONS)


def _section_options(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The checked options of every section present (keys and values), also of those this
    ensemble does not read (a ``fusion:`` under kdef, a ``dhen:`` with no dhen member): a typo
    there must not pass unnoticed."""
    out = {key: _checked_options(_section(cfg, key), fn, skip, f"model.{key}")
           for key, (fn, skip) in _section_targets().items() if key in cfg}
    if out.get("fusion", {}).get("reduction", "mean") == "none":
        raise ConfigError("config: model.fusion.reduction must be mean or sum (a run trains on "
                          "one loss value), got 'none'")
    return out


@contextlib.contextmanager
def _building(where: str) -> Iterator[None]:
    """Turns a ValueError of a constructor (an option it rejects) into a ConfigError naming
    the config section it came from."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config: {where}: {e}") from e


def build_member(kind: str, schema: Schema, dim: int, **hyperparameters: Any) -> nn.Module:
    """A member by registry name (``dnn``, ``dcnv2``, ``dhen``, ``interformer``); unknown names,
    hyperparameters and bad values raise ConfigError (a ValueError) naming them."""
    if kind not in MEMBERS:
        raise ConfigError(f"config: unknown member {shorten(kind)}; choose from "
                          f"{sorted(MEMBERS)}")
    cls = MEMBERS[kind]
    options = _checked_options(hyperparameters, cls, _MEMBER_SKIP, f"model.{kind}")
    with _building(f"model.{kind}"):
        return cls(schema, dim, **options)


def _members(value: Any) -> list[str]:
    kinds = [value] if isinstance(value, str) else value
    if not isinstance(kinds, (list, tuple)) or not all(isinstance(k, str) for k in kinds):
        raise ConfigError(f"config: model.members must be a member name or a list of them, got "
                          f"{shorten(value)}")
    if not kinds:
        raise ConfigError("config: model.members must name at least one member")
    bad = [k for k in kinds if k not in MEMBERS]
    if bad:
        raise ConfigError(f"config: unknown member(s) {bad} in model.members; choose from "
                          f"{sorted(MEMBERS)}")
    return list(kinds)


def build_model(config: Mapping[str, Any] | None, schema: Schema, *,
                backend: str = "auto") -> Ensemble:
    """Builds the ensemble described by the ``model:`` config section.

    Keys (defaults in :data:`DEFAULTS`): ``ensemble`` (cetnet | naive | multi_embedding | kdef),
    ``members`` (list of dnn / dcnv2 / dhen / interformer, repeats allowed and named ``dnn``,
    ``dnn_1``…; one member is an ensemble of one), ``embedding_dim`` (int or one per member),
    ``embedding_optimizer`` (null | sgd | rowwise_adagrad), ``embedding_lr``,
    ``shared_embedding`` (one embedding set for all members, KDEF's variant),
    ``embedding_bounds_check`` (error | warn | off: ``MultiTableEmbedding``'s
    ``bounds_check``; off skips the id check and its GPU synchronization, a bad id then reads
    as padding; warn reads it as padding and warns; unset: error, though on a CUDA device the
    training loop runs its steps with the check off where its Splits validated the ids),
    ``fusion``
    (:class:`~cetnet_kernels.CETNetFusion` keywords; CETNet only; ``reduction`` mean or sum),
    one section per member kind with its hyperparameters (``dhen: {num_layers: 2}``; repeats of
    a kind share it), ``naive: {average: prob|logit}`` and ``multi_embedding: {num_sets,
    cross_layers, rank, hidden, activation}`` (the multi-embedding model ignores ``members``;
    its ``embedding_dim`` is an int or one per set).

    Every value is checked before anything is built, against the type of the keyword it feeds
    (a bool is no number; floats finite) and its range: widths, dims, heads, ranks and slots
    >= 1; ``cross_layers``, ``dcn_layers``, ``num_pma``, ``num_recent``, ``num_layers`` >= 0;
    counts of layers, sets, heads and tokens <= :data:`MAX_COUNT`, widths, dims and ranks <=
    :data:`MAX_WIDTH`;
    ``dropout`` in [0, 1]; loss weights and learning rates >= 0; ``temperature`` >=
    :data:`MIN_TEMPERATURE` (float32's smallest normal number: the fusion divides by it).

    Args:
        config: the ``model:`` section (None or {} for every default).
        schema: the dataset's features.
        backend: the backend of the fusion, the fused losses and the embedding alike:
            ``"auto"`` (the fused kernels for the device), ``"cpu"``, ``"cuda"``, ``"triton"``
            or ``"reference"`` (plain PyTorch). The reference embedding has no fused
            optimizer: use ``embedding_optimizer: null`` with it.

    Raises:
        ConfigError (a ValueError): naming the key: unknown keys, wrong types, values out of
            range, unknown ensemble or member names, inconsistent dims, a fused embedding
            optimizer with ``backend="reference"``, or an option a member rejects.
    """
    config = dict(config or {})
    _check_keys(config, model_keys(), "model")
    cfg = {**DEFAULTS, **config}
    ensemble = Spec(str).check("model.ensemble", cfg["ensemble"])
    if ensemble not in ENSEMBLES:
        # a plugin's ensemble lands here when its module was not loaded (evaluate without
        # --plugin): say how to load it
        raise ConfigError(f"config: unknown ensemble {shorten(ensemble)} in model.ensemble; "
                          f"choose from {ENSEMBLES} {plugin_hint('an ensemble')}")
    optimizer = Spec(str, nullable=True).check("model.embedding_optimizer",
                                               cfg["embedding_optimizer"])
    if optimizer not in (None, "sgd", "rowwise_adagrad"):
        raise ConfigError(f"config: model.embedding_optimizer must be null, 'sgd' or "
                          f"'rowwise_adagrad', got {shorten(optimizer)}")
    if backend == "reference" and optimizer is not None:
        raise ConfigError(f"config: backend='reference' has no fused embedding optimizer; "
                          f"set model.embedding_optimizer: null (got {optimizer!r})")
    lr = Spec(float, 0).check("model.embedding_lr", cfg["embedding_lr"])
    dims = check_option("model.embedding_dim", cfg["embedding_dim"], int | typing.Sequence[int])
    shared = Spec(bool).check("model.shared_embedding", cfg["shared_embedding"])
    bounds_check = Spec(str, choices=BOUNDS_CHECKS).check(
        f"model.{BOUNDS_CHECK_KEY}", cfg.get(BOUNDS_CHECK_KEY, "error"))
    sections = _section_options(cfg)

    if ensemble == "multi_embedding":
        if shared:
            raise ConfigError("config: multi_embedding needs separate embedding sets "
                              "(model.shared_embedding: false)")
        opts = sections.get("multi_embedding", {})
        if not isinstance(dims, int):
            opts.setdefault("num_sets", len(dims))
        with _building("model.multi_embedding"):
            return MultiEmbedding.build(schema, dims, optimizer=optimizer, lr=lr,
                                        bounds_check=bounds_check, backend=backend, **opts)

    kinds = _members(cfg["members"])
    K = len(kinds)
    dims = [dims] * K if isinstance(dims, int) else dims
    if len(dims) != K:
        raise ConfigError(f"config: model.embedding_dim has {len(dims)} entries for {K} members")
    with _building("model"):
        front = EmbeddingFront(schema, dims, K, shared=shared, optimizer=optimizer, lr=lr,
                               bounds_check=bounds_check, backend=backend)
    names = unique_names(kinds)
    members = {name: build_member(kind, schema, d, **sections.get(kind, {}))
               for name, kind, d in zip(names, kinds, dims)}
    if ensemble == "cetnet":
        with _building("model.fusion"):
            # labels are validated by the Dataset, and the training loop watches for a
            # non-finite loss on the device: no per-step synchronization for the checks
            return CETNet(front, members, CETNetFusion(K, backend=backend, validate=False,
                                                       **sections.get("fusion", {})))
    if ensemble == "naive":
        with _building("model.naive"):
            return NaiveEnsemble(front, members, **sections.get("naive", {}))
    return KDEF(front, members, backend=backend, validate=False)
