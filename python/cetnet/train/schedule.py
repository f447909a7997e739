"""The learning-rate schedule of the dense optimizer (warm-up, then constant / cosine / step /
plateau), with a state of primitives for checkpoints.

One small class instead of chained ``torch.optim.lr_scheduler`` objects: warm-up composed with
``ReduceLROnPlateau`` would need two schedulers writing the same ``lr``; here the lr is one
function of (step, epoch, plateau scale), set on the optimizer before every step. The
embedding's fused optimizer keeps its own constant ``embedding_lr``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LRSchedule"]


class LRSchedule:
    """``lr(step) = base_lr * warmup(step) * decay``.

    Args:
        optimizer: its param groups' ``lr`` are set by :meth:`step`.
        kind: ``"constant"``, ``"cosine"`` (from ``base_lr`` to ``min_lr_ratio * base_lr``
            over ``total_steps``), ``"step"`` (times ``gamma`` every ``step_epochs`` epochs) or
            ``"plateau"`` (times ``plateau_factor`` when the validation metric has not improved
            for more than ``plateau_patience`` epochs).
        base_lr: the peak learning rate.
        total_steps: the optimizer steps of the whole run (cosine).
        warmup_steps: linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``.

    The rates and factors must be finite and >= 0 (ValueError): a NaN lr would train on
    silently as NaN weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, base_lr: float, *,
                 total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 step_epochs: int = 1, gamma: float = 0.5, plateau_factor: float = 0.5,
                 plateau_patience: int = 0) -> None:
        if kind not in ("constant", "cosine", "step", "plateau"):
            raise ValueError(f"LRSchedule: unknown schedule {kind!r}")
        for name, value in (("base_lr", base_lr), ("min_lr_ratio", min_lr_ratio),
                            ("gamma", gamma), ("plateau_factor", plateau_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"LRSchedule: {name} must be a finite number >= 0, got "
                                 f"{value!r}")
        self.optimizer = optimizer
        self.kind = kind
        self.base_lr = base_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.step_epochs = step_epochs
        self.gamma = gamma
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        # the state (saved in checkpoints)
        self.steps = 0
        self.epochs = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        lr = self.base_lr
        if self.warmup_steps and self.steps < self.warmup_steps:
            lr *= (self.steps + 1) / self.warmup_steps
        if self.kind == "cosine":
            t = min(1.0, max(0, self.steps - self.warmup_steps)
                    / max(1, self.total_steps - self.warmup_steps))
            lr *= self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        elif self.kind == "step":
            lr *= self.gamma ** (self.epochs // self.step_epochs)
        elif self.kind == "plateau":
            lr *= self.plateau_scale
        return lr

    def step(self) -> float:
        """Sets the lr of the coming optimizer step (call before ``optimizer.step()``)."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.steps += 1
        return lr

    def epoch_end(self, metric: float) -> None:
        """Ends an epoch; ``metric`` (validation AUC, higher is better) drives ``plateau``."""
        self.epochs += 1
        if self.kind != "plateau" or math.isnan(metric):
            return
        if metric > self.plateau_best:
            self.plateau_best, self.plateau_bad = metric, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > self.plateau_patience:
                self.plateau_scale *= self.plateau_factor
                self.plateau_bad = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "epochs": self.epochs, "plateau_scale": self.plateau_scale,
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
