"""Statistics over seeds without scipy: mean, sample standard deviation, Student-t quantiles
(a table for 1..30 degrees of freedom, the Cornish-Fisher expansion beyond) and paired
differences with their t confidence interval."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["T975", "t_quantile_975", "mean_std", "PairedDiff", "paired_difference"]

#: t_{0.975, df} for df = 1..30 (two-sided 95 %).
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
        2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
        2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
        2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
        2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (>= 1)."""
    if df < 1:
        raise ValueError(f"t quantile: df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = _Z975  # Cornish-Fisher: error < 2e-6 for df > 30 (1.75e-6 at 31)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); std is NaN for fewer than 2 values, both NaN for
    none."""
    xs = [_number(v) for v in values]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class PairedDiff:
    """``a - b`` paired by seed: the mean difference, its sample std, the 95 % t interval
    ``mean ± t_{0.975, n-1} * std / sqrt(n)`` (NaN for n < 2), the seeds used, and the seeds
    both sides have but left out because a value is not finite (``nonfinite``)."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    seeds: list[int]
    diffs: list[float]
    nonfinite: list[int] = field(default_factory=list)

    def verdict(self, higher_is_better: bool = True) -> str:
        """``better`` / ``worse`` when the interval excludes 0, else ``within seed noise``;
        the seeds left out for a non-finite value are named."""
        left_out = (f" (seed {', '.join(map(str, self.nonfinite))} left out: not finite)"
                    if self.nonfinite else "")
        if self.n < 2 or not math.isfinite(self.low):
            return f"n/a ({self.n} seed{'s' if self.n != 1 else ''} with finite values)" \
                + left_out
        good, bad = (self.low > 0, self.high < 0) if higher_is_better else \
            (self.high < 0, self.low > 0)
        return ("better" if good else "worse" if bad else "within seed noise") + left_out


def _number(v: object) -> float:
    """A metric as a float: None (a NaN as metrics.json stores it, e.g. the gAUC of data
    without groups) is NaN."""
    return math.nan if v is None else float(v)  # type: ignore[arg-type]


def paired_difference(a: dict[int, float], b: dict[int, float]) -> PairedDiff:
    """``a[s] - b[s]`` over the seeds both have where both values are finite (a NaN metric: a
    one-class test split, or NaN predictions); the others are ``nonfinite``."""
    both = sorted(set(a) & set(b))
    finite = [s for s in both if math.isfinite(_number(a[s])) and math.isfinite(_number(b[s]))]
    seeds, nonfinite = finite, [s for s in both if s not in finite]
    diffs = [_number(a[s]) - _number(b[s]) for s in seeds]
    m, sd = mean_std(diffs)
    if len(diffs) >= 2:
        half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        low, high = m - half, m + half
    else:
        low = high = math.nan
    return PairedDiff(len(diffs), m, sd, low, high, seeds, diffs, nonfinite)
