"""The cost of a candidate: FLOPs per sample of its forward pass and its parameter count.

The model is built with the plain-PyTorch ``reference`` backend (the same arithmetic as the
fused kernels, but as aten operators :class:`torch.utils.flop_counter.FlopCounterMode` can
count) and run in eval mode on the first rows of the validation split. Embedding look-ups
are gathers and count as no FLOPs; matrix products, convolutions and attention do (what
FlopCounterMode counts: one multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["model_cost"]


def model_cost(config: dict, dataset: Any, rows: int = 64) -> tuple[float, int]:
    """``(flops_per_sample, parameters)`` of a validated run config's model on ``dataset``."""
    from cetnet.train import build_model

    model_cfg = copy.deepcopy(config["model"])
    model_cfg["embedding_optimizer"] = None  # the reference backend has no fused optimizer
    torch.manual_seed(0)
    model = build_model(model_cfg, dataset.schema, backend="reference")
    params = sum(p.numel() for p in model.parameters())
    split = dataset.splits["valid"]
    batch = split.take(slice(0, min(rows, len(split))))
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(batch)
    return counter.get_total_flops() / max(len(batch.label), 1), params
