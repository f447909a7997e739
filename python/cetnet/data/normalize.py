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
        """Statistics of ``train`` ``[N, n_dense]`` over its non-missing (non-NaN) values."""
        train = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
        present = ~np.isnan(train)
        n = present.sum(0)
        total = np.where(present, train, 0.0).sum(0)
        mean = np.divide(total, n, out=np.zeros(train.shape[1]), where=n > 0)
        dev = np.where(present, train - mean, 0.0)
        var = np.divide((dev ** 2).sum(0), n, out=np.zeros(train.shape[1]), where=n > 0)
        std = np.sqrt(var)
        std[std < 1e-12] = 1.0  # a constant column stays 0 rather than dividing by 0
        return cls(mean, std)

    def transform(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(normalized float32 [N, n_dense], imputed count per column)``."""
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        missing = np.isnan(x)
        z = (np.where(missing, self.mean, x) - self.mean) / self.std
        return z.astype(np.float32), missing.sum(0).astype(np.int64)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "DenseStats":
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))
