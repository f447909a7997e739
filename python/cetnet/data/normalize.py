"""Dense feature normalization with train statistics. By default a column is standardized
(``(x - mean) / std``) and a missing value is imputed with the train mean (0 after
normalization); a column may instead be min-max scaled to [0, 1] over train
(``(x - min) / (max - min)``, FuxiCTR's ``MinMaxScaler``) and its missing values filled with a
given number (FuxiCTR's ``fill_na``, which then counts in the statistics). Missing values are
counted either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DenseStats", "SCALERS"]

#: The scalers a column can have: ``standard`` (the default) and ``minmax``.
SCALERS = ("standard", "minmax")


@dataclass
class DenseStats:
    """Per-column train statistics of the dense features: a column's value ``x`` becomes
    ``(x - mean) / std``. For a standardized column ``mean`` and ``std`` are its train mean and
    standard deviation; for a min-max one (``scalers``) its train minimum and range. ``fill``:
    the value a missing cell takes before that, per column (None: the train mean of every
    column, the default)."""

    mean: np.ndarray  # [n_dense] float64: the shift
    std: np.ndarray   # [n_dense] float64: the scale, 1 where the train column is constant
    fill: np.ndarray | None = None          # [n_dense] float64
    scalers: tuple[str, ...] | None = None  # per column, one of SCALERS (None: all standard)

    @classmethod
    def fit(cls, train: np.ndarray, *, fill: Sequence[float | None] | None = None,
            scalers: Sequence[str] | None = None) -> "DenseStats":
        """Statistics of ``train`` ``[N, n_dense]`` over its non-missing (non-NaN) values.

        ``fill``: per column, a number that missing values take before the statistics are
        computed (so it counts in them, as in FuxiCTR), or None for the train mean of the
        present values (which leaves the statistics as they are). ``scalers``: per column,
        ``"standard"`` (default) or ``"minmax"``.

        Computed on each column divided by a power of two near its largest magnitude, then
        scaled back (exact: the same values as without scaling wherever those are finite):
        values near the float64 limit (1e308, which the csv readers accept as finite) would
        overflow the sum and the squares to inf otherwise, making every normalized value NaN."""
        train = _matrix(train)
        n_cols = train.shape[1]
        fills = list(fill) if fill is not None else [None] * n_cols
        kinds = tuple(scalers) if scalers is not None else ("standard",) * n_cols
        if len(fills) != n_cols or len(kinds) != n_cols:
            raise ValueError(f"DenseStats.fit: {n_cols} columns, but {len(fills)} fill values "
                             f"and {len(kinds)} scalers")
        bad = next((k for k in kinds if k not in SCALERS), None)
        if bad is not None:
            raise ValueError(f"DenseStats.fit: unknown scaler {bad!r}; one of {SCALERS}")
        given = np.array([np.nan if f is None else float(f) for f in fills])
        if np.isinf(given).any():
            raise ValueError("DenseStats.fit: a fill value must be finite")
        if not np.isnan(given).all():
            train = np.where(np.isnan(train) & ~np.isnan(given), given, train)
        mean, std = cls._mean_std(train)
        if all(k == "standard" for k in kinds) and np.isnan(given).all():
            return cls(mean, std)  # the default: no fill or scaler recorded
        fills_out = np.where(np.isnan(given), mean, given)
        shift, scale = mean.copy(), std.copy()
        for j, kind in enumerate(kinds):
            if kind == "minmax":
                col = train[:, j][~np.isnan(train[:, j])]
                lo, hi = (float(col.min()), float(col.max())) if len(col) else (0.0, 1.0)
                span = hi - lo if np.isfinite(hi - lo) else np.finfo(np.float64).max
                shift[j], scale[j] = lo, span if span > 0 else 1.0  # constant: all 0
        return cls(shift, scale, fills_out, kinds)

    @staticmethod
    def _mean_std(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = ~np.isnan(train)
        n = present.sum(0)
        values = np.where(present, train, 0.0)
        _, exponent = np.frexp(np.abs(values).max(0, initial=0.0))
        scale = np.ldexp(1.0, np.maximum(exponent - 1, 0))  # >= 1, so tiny values keep theirs
        unit = values / scale
        mean_u = np.divide(unit.sum(0), n, out=np.zeros(train.shape[1]), where=n > 0)
        dev = np.where(present, unit - mean_u, 0.0)
        var_u = np.divide((dev ** 2).sum(0), n, out=np.zeros(train.shape[1]), where=n > 0)
        mean, std = mean_u * scale, np.sqrt(var_u) * scale
        std[std < 1e-12] = 1.0  # a constant column stays 0 rather than dividing by 0
        return mean, std

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(normalized float32 [N, n_dense], imputed count per column)``. A value whose
        normalized form lies beyond float32's range (an outlier of 1e300 against a train
        spread of 1) saturates at float32's largest finite value instead of becoming inf."""
        x = _matrix(x)
        missing = np.isnan(x)
        x = np.where(missing, self.mean if self.fill is None else self.fill, x)
        with np.errstate(over="ignore"):
            z = (x - self.mean) / self.std
        far = ~np.isfinite(z)
        if far.any():  # x - mean overflowed: x / std - mean / std does not
            z[far] = (x / self.std - self.mean / self.std)[far]
        limit = np.finfo(np.float32).max
        return np.clip(z, -limit, limit).astype(np.float32), missing.sum(0).astype(np.int64)

    def describe(self, i: int) -> str:
        """Column ``i``'s statistics in words (a dataset summary's)."""
        kind = self.scalers[i] if self.scalers is not None else "standard"
        text = (f"min {self.mean[i]:.4g} range {self.std[i]:.4g}" if kind == "minmax"
                else f"mean {self.mean[i]:.4g} std {self.std[i]:.4g}")
        if self.fill is not None and (kind == "minmax" or self.fill[i] != self.mean[i]):
            text += f" fill {self.fill[i]:.4g}"
        return text

    def digest_bytes(self) -> bytes:
        """What an encoding digest hashes: the shift and scale, plus the fill values and
        scalers when they are not the defaults (so default statistics hash as they always
        have, and runs recorded before keep their digest)."""
        out = (np.ascontiguousarray(self.mean, np.float64).tobytes()
               + np.ascontiguousarray(self.std, np.float64).tobytes())
        if self.fill is not None:
            out += np.ascontiguousarray(self.fill, np.float64).tobytes()
            out += "\x00".join(self.scalers or ()).encode()
        return out

    def to_dict(self) -> dict:
        d: dict = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.fill is not None:
            d["fill"] = self.fill.tolist()
            d["scalers"] = list(self.scalers or ("standard",) * len(self.mean))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DenseStats":
        fill = d.get("fill")
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64),
                   None if fill is None else np.asarray(fill, dtype=np.float64),
                   None if fill is None else tuple(d["scalers"]))


def _matrix(x: np.ndarray) -> np.ndarray:
    """``x`` as a float64 ``[N, n_dense]`` matrix (a 1-D ``x``: one column; N may be 0)."""
    x = np.asarray(x, dtype=np.float64)
    return x if x.ndim == 2 else x.reshape(len(x), -1) if len(x) else x.reshape(0, 1)
