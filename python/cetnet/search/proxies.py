"""Proxies of a warmed-up candidate: SiGeo-style statistics of its loss landscape.

SiGeo (Meta's sub-one-shot NAS) ranks candidates after a short warm-up by combining three
statistics of the warmed-up weights: how consistent the gradients are across batches (the
ZiCo term: gradient mean over gradient spread, which the paper links to convergence speed),
the Fisher-Rao norm of the weights (linked to generalization), and the warm-up training loss.
:func:`warmup_statistics` measures them on the candidate's warm-up checkpoint:

- ``zico``: ``sum over parameter tensors of log(sum over elements of mean_b |g| / std_b g)``
  over ``batches`` training batches (elements whose gradient never varies are left out);
- ``fisher_rao``: ``log(mean_b (theta . g_b)^2)``, the empirical Fisher-Rao norm of all
  weights theta;
- ``loss``: the mean training loss of those batches.

:func:`sigeo_score` is ``w_zico * zico + w_fr * fisher_rao - w_loss * loss`` (weights 1, 1, 1
by default, a combination of the paper's terms, not its tuned weights). The gradients are those
of the model's training loss with every weight, embedding tables included, as one dense
parameter: the candidate is rebuilt on the plain-PyTorch backend with a dense embedding
gradient, its warm-up weights loaded, and nothing is updated.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["warmup_statistics", "sigeo_score", "SIGEO_WEIGHTS", "PROXY_NAMES"]

#: The default weights of the three terms in :func:`sigeo_score` (zico, fisher_rao, loss).
SIGEO_WEIGHTS = (1.0, 1.0, 1.0)
#: Every proxy a trial records, by the attribute name of trials.csv.
PROXY_NAMES = ("proxy_auc", "sigeo", "zico", "fisher_rao", "neg_warmup_loss")


def sigeo_score(stats: Mapping[str, float],
                weights: tuple[float, float, float] = SIGEO_WEIGHTS) -> float:
    """The SiGeo-style combination of :func:`warmup_statistics`' terms (higher is better)."""
    w_zico, w_fr, w_loss = weights
    return w_zico * stats["zico"] + w_fr * stats["fisher_rao"] - w_loss * stats["loss"]


def _dense_model(config: dict, schema: Any, state: Mapping[str, torch.Tensor]) -> Any:
    """The candidate on the reference backend with a dense embedding gradient, its weights
    ``state`` (a fused embedding's optimizer state is not a weight and is left out)."""
    from cetnet.train import build_model

    model_cfg = copy.deepcopy(config["model"])
    model_cfg["embedding_optimizer"] = None
    torch.manual_seed(0)
    model = build_model(model_cfg, schema, backend="reference")
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    extra = [k for k in unexpected if not k.endswith("optimizer_state")]
    if missing or extra:
        raise ValueError(f"warm-up proxy: the checkpoint does not fit the model (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    return model


def warmup_statistics(config: dict, dataset: Any, checkpoint: str | Path, *,
                      batches: int = 4, seed: int = 0) -> dict[str, float]:
    """``{"zico", "fisher_rao", "loss"}`` of the model of ``config`` with the weights of
    ``checkpoint`` (a warm-up run's ``best.pt``), on the first ``batches`` training batches
    of ``train.batch_size`` rows (dropout drawn from ``seed``)."""
    from cetnet.train.checkpoint import load_checkpoint

    if batches < 2:
        raise ValueError(f"warm-up proxy: needs at least 2 batches for a gradient spread, got "
                         f"{batches}")
    state = load_checkpoint(checkpoint, keys=("model",))["model"]
    model = _dense_model(config, dataset.schema, state)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    grads: list[list[torch.Tensor]] = []
    losses: list[float] = []
    split = dataset.splits["train"]
    for i, batch in enumerate(split.batches(config["train"]["batch_size"], shuffle=False)):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for p in params])
    if len(grads) < 2:
        raise ValueError(f"warm-up proxy: the train split gives {len(grads)} batch(es) of "
                         f"{config['train']['batch_size']} rows; 2 are needed")
    zico = 0.0
    for j, p in enumerate(params):
        g = torch.stack([gb[j] for gb in grads]).double()  # [batches, *shape]
        spread = g.std(0, unbiased=False)
        varies = spread > 0
        if bool(varies.any()):
            ratio = float((g.abs().mean(0)[varies] / spread[varies]).sum())
            zico += math.log(ratio) if ratio > 0 else 0.0
    with torch.no_grad():
        projections = torch.stack([sum((p.double() * gb[j].double()).sum()
                                       for j, p in enumerate(params)) for gb in grads])
    fisher_rao = math.log(float((projections ** 2).mean()) + 1e-300)
    return {"zico": zico, "fisher_rao": fisher_rao, "loss": sum(losses) / len(losses)}
