"""The rows of the comparison, in one registry: each row is a set of overrides of the base
config's ``model:`` section (the paper's CETNet: DHEN + InterFormer, confidence fusion).

Every row keeps the base config's data, training budget (epochs, batch size, schedule,
patience) and embedding settings; only the model changes. :func:`row_config` gives a row's
full config, checked by :func:`cetnet.config.validate_config` and by building the model on the
meta device (:func:`check_model`), so a row the real schema refuses fails before training.
``scaled_single`` is resolved against a dataset schema: the chosen architecture widened
(embedding dim and hidden sizes) until its parameter count is closest to the cetnet row's.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from cetnet.config import ConfigError, validate_config
from cetnet.models.build import MEMBERS, build_model

__all__ = ["Row", "ROWS", "ROW_NAMES", "SINGLE_ROWS", "PEER_ROWS", "CETNET_VARIANTS",
           "DELETE",
           "row_config", "row_spec", "check_model", "count_model_parameters",
           "embedding_parameter_count", "scale_member",
           "scaled_single_model", "parse_rows", "member_kinds"]

#: In a row's overrides: remove the key from the model section.
DELETE = object()

#: Widths of each member kind that ``scaled_single`` multiplies (besides the embedding dim).
WIDTH_KEYS = {"dnn": ("hidden",), "dcnv2": ("hidden",), "dhen": ("dot_hidden", "head"),
              "interformer": ("dot_hidden", "head")}


@dataclass(frozen=True)
class Row:
    """A row: ``model`` overrides (``DELETE`` removes a key; a ``fusion`` dict is merged into the
    base fusion section) and what it stands for."""

    name: str
    what: str
    model: Mapping[str, Any] = field(default_factory=dict)
    group: str = ""
    #: what a study varies in this row (e.g. ``{"kind": "cetnet", "dim": 8}``), for its report
    params: Mapping[str, Any] = field(default_factory=dict)
    #: who trains it: ``cetnet`` (cetnet's trainer) or ``fuxictr`` (FuxiCTR's model and trainer
    #: on the same data, :mod:`cetnet.reproduce.peers`; the member kind is ``model.members[0]``)
    trainer: str = "cetnet"


def _single(kind: str) -> Row:
    # naive with one member: loss = that member's BCE, prediction = its probability
    return Row(kind, f"{kind} trained alone (an ensemble of one)",
               {"ensemble": "naive", "members": [kind], "fusion": DELETE}, "single")


def _peer(kind: str) -> Row:
    # the same config as the single row (data, dim, budget); FuxiCTR builds and trains the model
    return Row(f"fuxictr_{kind}", f"FuxiCTR's {kind} trained by FuxiCTR's own trainer (the peer "
               f"a user would pick instead of cetnet's {kind})",
               {"ensemble": "naive", "members": [kind], "fusion": DELETE}, "peer",
               trainer="fuxictr")


_ROWS = [
    *(_single(k) for k in ("dnn", "dcnv2", "dhen", "interformer")),
    *(_peer(k) for k in ("dnn", "dcnv2")),
    Row("scaled_single", "the best single architecture, widened (embedding dim and hidden "
        "sizes) to the cetnet row's parameter count", {}, "baseline"),
    Row("naive", "naive ensemble of dhen + interformer: independent members, mean probability",
        {"ensemble": "naive", "fusion": DELETE}, "baseline"),
    Row("multi_embedding", "multi-embedding model (2 embedding sets, cross-net branches, "
        "shared top)", {"ensemble": "multi_embedding", "fusion": DELETE}, "baseline"),
    Row("kdef", "KDEF (dhen + interformer, separate embeddings)",
        {"ensemble": "kdef", "fusion": DELETE}, "baseline"),
    Row("kdef_shared", "KDEF with one shared embedding set",
        {"ensemble": "kdef", "fusion": DELETE, "shared_embedding": True}, "baseline"),
    Row("cetnet", "CETNet, the base config (confidence fusion, temperature 1, prob space)",
        {}, "cetnet"),
    Row("cetnet_distill", "CETNet + distillation of the fused prediction into the members "
        "(distill_weight 0.5)", {"fusion": {"distill_weight": 0.5}}, "cetnet"),
    Row("cetnet_mutual", "CETNet + mutual learning between members (mutual_weight 0.5)",
        {"fusion": {"mutual_weight": 0.5}}, "cetnet"),
    Row("cetnet_both", "CETNet + distillation and mutual learning (0.5 each)",
        {"fusion": {"distill_weight": 0.5, "mutual_weight": 0.5}}, "cetnet"),
    Row("cetnet_uniform", "CETNet loss with uniform average fusion (temperature 1e6: the "
        "confidence softmax is flat)", {"fusion": {"temperature": 1.0e6}}, "cetnet"),
    Row("cetnet_learnable_tau", "CETNet with a learned fusion temperature, kept in (0.5, 4) "
        "(CETNetFusion's default temperature_range)",
        {"fusion": {"learnable_temperature": True}}, "cetnet"),
    Row("cetnet_learnable_tau_unbounded", "CETNet with a learned fusion temperature, unbounded",
        {"fusion": {"learnable_temperature": True, "temperature_range": None}}, "cetnet"),
    Row("cetnet_logit", "CETNet fusing logits instead of probabilities",
        {"fusion": {"fusion_space": "logit"}}, "cetnet"),
    Row("cetnet_detached", "CETNet with no gradient through the fusion weights",
        {"fusion": {"detach_weights": True}}, "cetnet"),
]
ROWS: dict[str, Row] = {r.name: r for r in _ROWS}
ROW_NAMES = tuple(ROWS)
SINGLE_ROWS = tuple(r.name for r in _ROWS if r.group == "single")
PEER_ROWS = tuple(r.name for r in _ROWS if r.group == "peer")
CETNET_VARIANTS = tuple(r.name for r in _ROWS if r.group == "cetnet" and r.name != "cetnet")


def parse_rows(text: str | None) -> list[str]:
    """``"dnn,cetnet"`` -> ``["dnn", "cetnet"]`` (None or ``all``: every row); ConfigError for an
    unknown name."""
    if text is None or text.strip() in ("", "all"):
        return list(ROW_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        raise ConfigError(f"reproduce: unknown row(s) {bad}; rows: {', '.join(ROW_NAMES)}")
    return list(dict.fromkeys(names))


def _apply(model: dict, overrides: Mapping[str, Any]) -> dict:
    model = copy.deepcopy(model)
    for key, value in overrides.items():
        if value is DELETE:
            model.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(model.get(key), Mapping):
            model[key] = {**model[key], **copy.deepcopy(dict(value))}
        else:
            model[key] = copy.deepcopy(value)
    return model


def member_kinds(members: Any) -> list:
    """A config's ``model.members`` as a list (a single name is one member)."""
    return [members] if isinstance(members, str) else list(members or [])


def _member_dim(model: Mapping[str, Any], kind: str) -> Any:
    """The embedding dim of ``kind`` in ``model``: its one dim, or with one dim per member that
    of the first member of this kind (the first member's when there is none of it)."""
    dims = model.get("embedding_dim", 16)
    if not isinstance(dims, (list, tuple)):
        return dims
    kinds = member_kinds(model.get("members"))
    return dims[kinds.index(kind)] if kind in kinds[:len(dims)] else dims[0]


def _fit_dims(base: Mapping[str, Any], model: dict) -> dict:
    """``model`` (a row of ``base``) with the embedding dims fitted to its members when the base
    gives one dim per member (as the packaged default does) and the row's members cannot take
    them (another count, or a shared embedding of unequal dims): each member takes the dim of
    the base's member of its kind (:func:`_member_dim`), a shared embedding its first member's.
    Dims that build are kept (so are the rows' cache keys); a row or override that sets its
    own dims keeps them."""
    dims = base.get("embedding_dim")
    if (not isinstance(dims, (list, tuple)) or model.get("embedding_dim") != dims
            or model.get("ensemble") == "multi_embedding"
            or len(dims) != len(member_kinds(base.get("members")))):  # (bad: validation says)
        return model
    kinds = member_kinds(model.get("members"))
    shared = bool(model.get("shared_embedding"))
    if len(kinds) == len(dims) and not (shared and len(set(dims)) > 1):
        return model
    fitted = [_member_dim(base, k) for k in kinds] or list(dims)
    model["embedding_dim"] = fitted[0] if shared or len(fitted) == 1 else fitted
    return model


def row_spec(row: str | Row) -> Row:
    """``row`` itself, or the registered row of that name (ConfigError for an unknown one)."""
    if isinstance(row, Row):
        return row
    if row not in ROWS:
        raise ConfigError(f"reproduce: unknown row {row!r}; rows: {', '.join(ROW_NAMES)}")
    return ROWS[row]


def row_config(base: Mapping[str, Any], row: str | Row, *, seed: int | None = None,
               train: Mapping[str, Any] | None = None,
               model: Mapping[str, Any] | None = None) -> dict:
    """The validated config of ``row`` (a registered name or a study's :class:`Row`) on top of
    ``base`` (a full config): the row's model overrides, then ``model`` (e.g. scaled_single's
    widths), ``train`` values (grid point) and ``train.seed``; ``name`` is
    ``reproduce-<row>``."""
    spec = row_spec(row)
    config = copy.deepcopy(dict(base))
    config["name"] = f"reproduce-{spec.name}"
    config["model"] = _fit_dims(base["model"], _apply(config["model"], spec.model))
    if model:
        config["model"] = _apply(config["model"], model)
    config["train"] = {**config["train"], **(train or {})}
    if seed is not None:
        config["train"]["seed"] = seed
    return validate_config(config)


def _meta_build(model_config: Mapping[str, Any], schema: Any, backend: str) -> Any:
    with torch.device("meta"):
        return build_model(model_config, schema, backend=backend)


def check_model(config: Mapping[str, Any], schema: Any) -> int:
    """Builds the config's model on the meta device (checks every model key against the real
    schema; ConfigError naming a bad one); returns its parameter count."""
    model = _meta_build(config["model"], schema, config.get("backend", "auto"))
    return sum(p.numel() for p in model.parameters())


count_model_parameters = check_model


def embedding_parameter_count(config: Mapping[str, Any], schema: Any) -> int:
    """The number of embedding-table entries of the config's model (all sets, all features)."""
    model = _meta_build(config["model"], schema, config.get("backend", "auto"))
    return model.embedding.weight.numel()


def _member_defaults(kind: str) -> dict[str, Any]:
    params = inspect.signature(MEMBERS[kind]).parameters
    return {k: list(params[k].default) for k in WIDTH_KEYS[kind]}


def scale_member(model: Mapping[str, Any], kind: str, dim: int) -> dict:
    """Model overrides that make ``kind`` alone with embedding dim ``dim``, its widths scaled by
    ``dim / base dim`` (rounded, at least 1)."""
    base_dim = int(_member_dim(model, kind))
    section = {**_member_defaults(kind), **dict(model.get(kind) or {})}
    factor = dim / base_dim
    widths = {k: [max(1, round(int(w) * factor)) for w in section[k]] for k in WIDTH_KEYS[kind]}
    return {"ensemble": "naive", "members": [kind], "fusion": DELETE, "embedding_dim": dim,
            kind: {**dict(model.get(kind) or {}), **widths}}


def scaled_single_model(base: Mapping[str, Any], schema: Any, kind: str,
                        target: int | None = None, max_dim: int = 4096) -> dict:
    """``{"kind", "dim", "model" (overrides), "num_parameters", "target"}``: ``kind`` widened
    (embedding dim from the base dim up, widths in proportion) to the parameter count closest
    to ``target`` (default: the ``cetnet`` row's). Dims the member refuses (e.g. not divisible
    by InterFormer's heads) are skipped."""
    if kind not in MEMBERS:
        raise ConfigError(f"reproduce: scaled_single: unknown architecture {kind!r}; choose from "
                          f"{sorted(MEMBERS)}")
    backend = base.get("backend", "auto")
    if target is None:
        target = check_model(row_config(base, "cetnet"), schema)
    base_model = row_config(base, "cetnet")["model"]
    dim0 = int(_member_dim(base_model, kind))
    best: tuple[int, int, dict] | None = None  # (|count - target|, dim, overrides)
    for dim in range(max(1, dim0 // 2), max_dim + 1):
        overrides = scale_member(base_model, kind, dim)
        try:
            count = check_model({"model": _apply(base_model, overrides), "backend": backend},
                                schema)
        except ConfigError:
            continue
        gap = abs(count - target)
        if best is None or gap < best[0]:
            best = (gap, dim, {**overrides, "_count": count})
        if count >= target:
            break
    if best is None:
        raise ConfigError(f"reproduce: scaled_single: no embedding dim up to {max_dim} builds "
                          f"{kind}")
    overrides = dict(best[2])
    count = overrides.pop("_count")
    return {"kind": kind, "dim": best[1], "model": overrides, "num_parameters": count,
            "target": target}
