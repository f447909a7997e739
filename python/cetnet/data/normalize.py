"""Dense feature normalization with train statistics; missing values are imputed with the train
mean (0 after normalization) and counted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DenseStats"]


@dataclass
class DenseStats:
    """Per-column train mean and standard deviation of the dense features."""

    mean: np.ndarray  # [n_dense] float64
    std: np.ndarray   # [n_dense] float64, 1 where the train column is constant

    @classmethod
    def fit(cls, train: np.ndarray) -> "DenseStats":
        """Statistics of ``train`` ``[N, n_dense]`` over its non-missing (non-NaN) values.

        Computed on each column divided by a power of two near its largest magnitude, then
        scaled back (exact: the same values as without scaling wherever those are finite):
        values near the float64 limit (1e308, which the csv readers accept as finite) would
        overflow the sum and the squares to inf otherwise, making every normalized value NaN."""
        train = _matrix(train)
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
        return cls(mean, std)

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(normalized float32 [N, n_dense], imputed count per column)``. A value whose
        normalized form lies beyond float32's range (an outlier of 1e300 against a train
        spread of 1) saturates at float32's largest finite value instead of becoming inf."""
        x = _matrix(x)
        missing = np.isnan(x)
        with np.errstate(over="ignore"):
            z = (np.where(missing, self.mean, x) - self.mean) / self.std
        far = ~np.isfinite(z)
        if far.any():  # x - mean overflowed: x / std - mean / std does not
            z[far] = (x / self.std - self.mean / self.std)[far]
        limit = np.finfo(np.float32).max
        return np.clip(z, -limit, limit).astype(np.float32), missing.sum(0).astype(np.int64)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "DenseStats":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))


def _matrix(x: np.ndarray) -> np.ndarray:
    """``x`` as a float64 ``[N, n_dense]`` matrix (a 1-D ``x``: one column; N may be 0)."""
    x = np.asarray(x, dtype=np.float64)
    return x if x.ndim == 2 else x.reshape(len(x), -1) if len(x) else x.reshape(0, 1)
