"""The member registry and ``build_model``: an :class:`Ensemble` from the run config's ``model:``
section (docs/MODEL_LIBRARY.md)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from torch import nn

from cetnet.data.schema import Schema
from cetnet.models.dcnv2 import DCNv2
from cetnet.models.dhen import DHEN
from cetnet.models.dnn import DNN
from cetnet.models.ensembles import (CETNet, Ensemble, KDEF, MultiEmbedding, NaiveEnsemble,
                                     unique_names)
from cetnet.models.front import EmbeddingFront
from cetnet.models.interformer import InterFormer
from cetnet_kernels import CETNetFusion

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
# Sections of ensemble-specific options (keyword arguments of NaiveEnsemble / MultiEmbedding.build).
_SECTIONS = ("naive", "multi_embedding")
_FUSION_SKIP = ("self", "num_models", "backend")


def _keywords(fn: Callable[..., Any], skip: tuple[str, ...]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def _check_keys(given: Mapping[str, Any], allowed: list[str], where: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"build_model: unknown key(s) {unknown} in {where}; allowed: "
                         f"{sorted(allowed)}")


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"build_model: model.{key} must be a mapping, got {value!r}")
    return dict(value)


def _check_unused_sections(cfg: Mapping[str, Any]) -> None:
    """Checks the keys of every section present, also those this ensemble does not read (a
    `fusion:` under kdef, a `dhen:` with no dhen member): a typo there must not pass unnoticed."""
    for kind, cls in MEMBERS.items():
        if kind in cfg:
            _check_keys(_section(cfg, kind), _keywords(cls, ("self", "schema", "dim")),
                        f"model.{kind}")
    if "fusion" in cfg:
        _check_keys(_section(cfg, "fusion"), _keywords(CETNetFusion.__init__, _FUSION_SKIP),
                    "model.fusion")
    if "naive" in cfg:
        _check_keys(_section(cfg, "naive"), ["average"], "model.naive")


def build_member(kind: str, schema: Schema, dim: int, **hyperparameters: Any) -> nn.Module:
    """A member by registry name (``dnn``, ``dcnv2``, ``dhen``, ``interformer``); unknown names
    and hyperparameters raise ValueError naming them."""
    if kind not in MEMBERS:
        raise ValueError(f"build_model: unknown member {kind!r}; choose from {sorted(MEMBERS)}")
    cls = MEMBERS[kind]
    _check_keys(hyperparameters, _keywords(cls, ("self", "schema", "dim")), f"model.{kind}")
    return cls(schema, dim, **hyperparameters)


def build_model(config: Mapping[str, Any] | None, schema: Schema, *,
                backend: str = "auto") -> Ensemble:
    """Builds the ensemble described by the ``model:`` config section.

    Keys (defaults in :data:`DEFAULTS`): ``ensemble`` (cetnet | naive | multi_embedding | kdef),
    ``members`` (list of dnn / dcnv2 / dhen / interformer, repeats allowed and named ``dnn``,
    ``dnn_1``…; one member is an ensemble of one), ``embedding_dim`` (int or one per member),
    ``embedding_optimizer`` (null | sgd | rowwise_adagrad), ``embedding_lr``,
    ``shared_embedding`` (one embedding set for all members, KDEF's variant), ``fusion``
    (:class:`~cetnet_kernels.CETNetFusion` keywords; CETNet only), one section per member kind
    with its hyperparameters (``dhen: {num_layers: 2}``; repeats of a kind share it),
    ``naive: {average: prob|logit}`` and ``multi_embedding: {num_sets, cross_layers, rank,
    hidden, activation}`` (the multi-embedding model ignores ``members``; its
    ``embedding_dim`` is an int or one per set).

    Args:
        config: the ``model:`` section (None or {} for every default).
        schema: the dataset's features.
        backend: ``"auto"`` (fused kernels) or ``"reference"`` (plain PyTorch) for the fusion
            and the embedding; other fusion backends ("cpu", "cuda", "triton") are passed to the
            fusion, the embedding then uses "auto". The reference embedding has no fused
            optimizer: use ``embedding_optimizer: null`` with it.

    Raises:
        ValueError: unknown keys (named), unknown ensemble or member names, inconsistent
            dims, a fused embedding optimizer with ``backend="reference"``.
    """
    config = dict(config or {})
    _check_keys(config, list(DEFAULTS) + list(MEMBERS) + list(_SECTIONS), "model")
    cfg = {**DEFAULTS, **config}
    ensemble = cfg["ensemble"]
    if ensemble not in ENSEMBLES:
        raise ValueError(f"build_model: unknown ensemble {ensemble!r}; choose from {ENSEMBLES}")
    optimizer = cfg["embedding_optimizer"]
    if optimizer not in (None, "sgd", "rowwise_adagrad"):
        raise ValueError(f"build_model: embedding_optimizer must be null, 'sgd' or "
                         f"'rowwise_adagrad', got {optimizer!r}")
    if backend == "reference" and optimizer is not None:
        raise ValueError(f"build_model: backend='reference' has no fused embedding optimizer; "
                         f"set embedding_optimizer: null (got {optimizer!r})")
    lr = float(cfg["embedding_lr"])
    dims = cfg["embedding_dim"]
    shared = bool(cfg["shared_embedding"])
    _check_unused_sections(cfg)

    if ensemble == "multi_embedding":
        if shared:
            raise ValueError("build_model: multi_embedding needs separate embedding sets "
                             "(shared_embedding: false)")
        opts = _section(cfg, "multi_embedding")
        _check_keys(opts, _keywords(MultiEmbedding.build,
                                    ("schema", "dims", "optimizer", "lr", "backend")),
                    "model.multi_embedding")
        if not isinstance(dims, int):
            opts.setdefault("num_sets", len(dims))
        return MultiEmbedding.build(schema, dims, optimizer=optimizer, lr=lr, backend=backend,
                                    **opts)

    kinds = cfg["members"]
    if isinstance(kinds, str):
        kinds = [kinds]
    if not kinds:
        raise ValueError("build_model: members must name at least one member")
    bad = [k for k in kinds if k not in MEMBERS]
    if bad:
        raise ValueError(f"build_model: unknown member(s) {bad}; choose from {sorted(MEMBERS)}")
    K = len(kinds)
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = [dims] * K
    dims = list(dims)
    if len(dims) != K:
        raise ValueError(f"build_model: embedding_dim has {len(dims)} entries for {K} members")
    front = EmbeddingFront(schema, dims, K, shared=shared, optimizer=optimizer, lr=lr,
                           backend=backend)
    names = unique_names(kinds)
    members = {name: build_member(kind, schema, d, **_section(cfg, kind))
               for name, kind, d in zip(names, kinds, dims)}
    if ensemble == "cetnet":
        fusion_opts = _section(cfg, "fusion")
        _check_keys(fusion_opts, _keywords(CETNetFusion.__init__, _FUSION_SKIP), "model.fusion")
        return CETNet(front, members, CETNetFusion(K, backend=backend, **fusion_opts))
    if ensemble == "naive":
        opts = _section(cfg, "naive")
        _check_keys(opts, ["average"], "model.naive")
        return NaiveEnsemble(front, members, **opts)
    return KDEF(front, members)
