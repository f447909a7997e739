"""The cost of a candidate: FLOPs per sample of its forward pass and its parameter count.

The model is built with the plain-PyTorch ``reference`` backend (the same arithmetic as the
fused kernels, but as aten operators :class:`torch.utils.flop_counter.FlopCounterMode` can
count) and run in eval mode on the first rows of the validation split. Embedding look-ups
are gathers and count as no FLOPs; matrix products, convolutions and attention do (what
FlopCounterMode counts: one multiply-add is 2 FLOPs). Attention runs on SDPA's math path
while it is counted: on the CPU ``scaled_dot_product_attention`` otherwise dispatches to a
flash kernel for which FlopCounterMode has no formula, and counted as none.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["model_cost", "build_for_measuring", "COST_VERSION"]

#: The version of what a trial's cost and warm-up proxies measure, recorded in a study's
#: setup: 2 counts attention's FLOPs (1 counted none on the CPU) and takes the warm-up loss
#: term as the fused prediction's log loss (1: the ensemble's training objective). A study
#: measured with another version is not resumed: its trials would not compare.
COST_VERSION = 2


def build_for_measuring(config: dict, schema: Any) -> Any:
    """The model of a validated run config on the ``reference`` backend (no fused embedding
    optimizer), seeded with 0: what the cost and the warm-up proxies measure. A model whose
    parameters cannot be allocated is the one-line ConfigError of a run's own build
    (:func:`cetnet.train.runner._build`), which fails the trial, not the search."""
    from cetnet.train.runner import _build

    model_cfg = copy.deepcopy(config["model"])
    model_cfg["embedding_optimizer"] = None  # the reference backend has no fused optimizer
    probe = {**config, "model": model_cfg, "backend": "reference", "embedding": "cetnet",
             "train": {**config["train"], "seed": 0}}
    return _build(probe, schema)


def model_cost(config: dict, dataset: Any, rows: int = 64) -> tuple[float, int]:
    """``(flops_per_sample, parameters)`` of a validated run config's model on ``dataset``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_for_measuring(config, dataset.schema)
    params = sum(p.numel() for p in model.parameters())
    split = dataset.splits["valid"]
    batch = split.take(slice(0, min(rows, len(split))))
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(batch)
    return counter.get_total_flops() / max(len(batch.label), 1), params
