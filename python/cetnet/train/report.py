"""The text table of fused vs member metrics printed at the end of a run."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["describe_loss", "format_metrics_table"]


def _fmt(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_metrics_table(metrics: Mapping[str, Any], split: str = "test") -> str:
    """Rows: the fused prediction, then each member; columns: AUC, gAUC, logloss (and the mean
    fusion weight when the metrics have one)."""
    weights = metrics.get("fusion_weights") or {}
    rows = [("fused", metrics["fused"], None)]
    rows += [(name, m, weights.get(name)) for name, m in metrics["members"].items()]
    width = max(12, *(len(r[0]) + 2 for r in rows))
    head = f"{split:<{width}}{'AUC':>9}{'gAUC':>9}{'logloss':>9}" + ("  weight" if weights else "")
    lines = [head, "-" * len(head)]
    for name, m, w in rows:
        line = f"{name:<{width}}{_fmt(m['auc']):>9}{_fmt(m['gauc']):>9}{_fmt(m['logloss']):>9}"
        if weights and w is not None:
            line += f"  {w:6.3f}"
        lines.append(line)
    return "\n".join(lines)


def _fusion_weights(fusion: Mapping[str, Any]) -> dict[str, float]:
    """The four loss-term weights of a ``model.fusion`` section, CETNetFusion's defaults for
    those it leaves out."""
    import inspect

    from cetnet_kernels import CETNetFusion

    params = inspect.signature(CETNetFusion.__init__).parameters
    names = ("ensemble_weight", "member_weight", "distill_weight", "mutual_weight")
    return {n: float(fusion.get(n, params[n].default)) for n in names}


def describe_loss(model: Mapping[str, Any] | None) -> str:
    """What the training loss of the ensemble a ``model:`` config section builds is made of, in
    one line (per row, with its weights), e.g. ``1 × BCE(fused) + 1 × Σ_k BCE(member k), mean
    over rows`` for the default CETNet. Terms with weight 0 are left out. An ensemble this
    library does not know (one registered by a plugin) is named as it is."""
    from cetnet.models.build import DEFAULTS

    cfg = {**DEFAULTS, **(model or {})}
    kind = cfg["ensemble"]
    members = cfg["members"]
    k = len([members] if isinstance(members, str) else members)
    if kind == "multi_embedding":
        return "BCE(prediction), mean over rows"
    if kind == "naive":
        return f"mean over rows and the {k} members of BCE(member k)"
    if kind == "kdef":
        return ("KDEF: mean BCE(member k) + exam-weighted squared distances member-teacher "
                "and member-member (no tuned weights)")
    if kind != "cetnet":
        return f"the loss of the {kind!r} ensemble"
    fusion = cfg.get("fusion") or {}
    w = _fusion_weights(fusion)
    if k == 1:
        terms = [(w["ensemble_weight"] + w["member_weight"], "BCE(member)")]
    else:
        terms = [(w["ensemble_weight"], "BCE(fused)"),
                 (w["member_weight"], "Σ_k BCE(member k)"),
                 (w["distill_weight"], "Σ_k KL(fused || member k)"),
                 (w["mutual_weight"], "Σ_k mean_j≠k KL(member j || member k)")]
    text = " + ".join(f"{weight:g} × {term}" for weight, term in terms if weight) or "0"
    reduction = fusion.get("reduction", "mean")
    return text + (", summed over the rows of a batch" if reduction == "sum"
                   else ", mean over rows")
