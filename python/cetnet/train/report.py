"""The text table of fused vs member metrics printed at the end of a run."""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["format_metrics_table"]


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
