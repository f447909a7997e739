"""Proxies of a warmed-up candidate: SiGeo-style statistics of its loss landscape.

SiGeo (Meta's sub-one-shot NAS) ranks candidates after a short warm-up by combining three
statistics of the warmed-up weights: how consistent the gradients are across batches (the
ZiCo term: gradient mean over gradient spread, which the paper links to convergence speed),
the Fisher-Rao norm of the weights (linked to generalization), and the warm-up loss.
:func:`warmup_statistics` measures them on the candidate's warm-up checkpoint:

- ``zico``: ``sum over parameter tensors of log(sum over elements of mean_b |g| / std_b g)``
  over ``batches`` training batches (elements whose gradient never varies are left out);
- ``fisher_rao``: ``log(mean_b (theta . g_b)^2)``, the empirical Fisher-Rao norm of all
  weights theta;
- ``loss``: the mean log loss (binary cross-entropy) of the fused prediction on those
  batches, from the forward passes the gradients come from (training mode). Not the
  ensemble's training objective, which the sampled member and distillation weights and the
  ensemble kind scale (a CETNet's is about three times a naive ensemble's for the same
  predictions); cetnet before the cost version 2 (:data:`cetnet.search.cost.COST_VERSION`)
  took that one.

:func:`sigeo_score` is ``w_zico * zico + w_fr * fisher_rao - w_loss * loss`` (weights 1, 1, 1
by default, a combination of the paper's terms, not its tuned weights). The gradients are those
of the model's training loss with every weight, embedding tables included, as one dense
parameter: the candidate is rebuilt on the plain-PyTorch backend with a dense embedding
gradient, its warm-up weights loaded, and nothing is updated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["warmup_statistics", "sigeo_score", "fit_sigeo_weights", "parse_sigeo_weights",
           "SIGEO_WEIGHTS", "SIGEO_TERMS", "PROXY_NAMES", "MAX_AUTO_WEIGHTS"]

#: The default weights of the three terms in :func:`sigeo_score` (zico, fisher_rao, loss).
SIGEO_WEIGHTS = (1.0, 1.0, 1.0)
#: The terms the weights multiply, by their trials.csv names (the loss enters as its negative).
SIGEO_TERMS = ("zico", "fisher_rao", "neg_warmup_loss")
#: Every proxy a trial records, by the attribute name of trials.csv.
PROXY_NAMES = ("proxy_auc", "sigeo", "zico", "fisher_rao", "neg_warmup_loss")


def sigeo_score(stats: Mapping[str, float],
                weights: tuple[float, float, float] = SIGEO_WEIGHTS) -> float:
    """The SiGeo-style combination of :func:`warmup_statistics`' terms (higher is better)."""
    w_zico, w_fr, w_loss = weights
    return w_zico * stats["zico"] + w_fr * stats["fisher_rao"] - w_loss * stats["loss"]


def parse_sigeo_weights(text: str) -> tuple[float, float, float]:
    """``"Z,F,L"`` -> the three finite weights of :func:`sigeo_score` (``ValueError`` naming
    what is wrong)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--sigeo-weights takes three numbers Z,F,L (zico, fisher_rao, "
                         f"loss), got {text!r}") from None
    if len(weights) != 3 or not all(math.isfinite(w) for w in weights) or \
            not any(weights):
        raise ValueError(f"--sigeo-weights takes three finite numbers Z,F,L, not all 0, "
                         f"got {text!r}")
    return weights


def _kendall_tau_a(scores: Any, signs: Any) -> Any:
    # scores [C, n]; signs [n, n] = sign(auc_i - auc_j): tau-a of every row of scores at once
    import numpy as np

    pair = np.sign(scores[:, :, None] - scores[:, None, :])
    n = signs.shape[0]
    return (pair * signs).sum(axis=(1, 2)) / max(n * (n - 1), 1)


def fit_sigeo_weights(terms: Any, auc: Any, *, step_degrees: float = 3.0
                      ) -> tuple[tuple[float, float, float], float]:
    """Weights of :func:`sigeo_score` that rank ``terms`` (``[n, 3]``: zico, fisher_rao and
    minus the warm-up loss of n trials) most like ``auc`` (their full-training AUC): the
    direction on the sphere of the standardized terms with the highest Kendall tau, on a grid
    of ``step_degrees``. Returns ``(weights for the raw terms, the largest magnitude 1; the
    training tau-a)``. The score's ranking depends on the direction only, so the fit has two
    degrees of freedom; check it on trials it was not fitted on."""
    import numpy as np

    x = np.asarray(terms, dtype=np.float64)
    y = np.asarray(auc, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) != len(y) or len(y) < 3:
        raise ValueError(f"fit_sigeo_weights: needs [n, 3] terms and n AUCs, n >= 3; got "
                         f"{x.shape} and {y.shape}")
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - x.mean(axis=0)) / scale
    theta = np.radians(np.arange(0.0, 180.0 + 1e-9, step_degrees))
    phi = np.radians(np.arange(0.0, 360.0, step_degrees))
    t, f = np.meshgrid(theta, phi, indexing="ij")
    directions = np.stack([np.sin(t) * np.cos(f), np.sin(t) * np.sin(f), np.cos(t)],
                          axis=-1).reshape(-1, 3)
    signs = np.sign(y[:, None] - y[None, :])
    taus = np.concatenate([_kendall_tau_a(directions[i:i + 256] @ z.T, signs)
                           for i in range(0, len(directions), 256)])
    best = int(np.argmax(taus))
    raw = directions[best] / scale  # w . z = (w / scale) . x + a constant: same ranking
    raw = raw / np.abs(raw).max()
    # sigeo_score subtracts w_loss * loss, so the weight of -loss is w_loss itself
    return (float(raw[0]), float(raw[1]), float(raw[2])), float(taus[best])


def _dense_model(config: dict, schema: Any, state: Mapping[str, torch.Tensor]) -> Any:
    """The candidate on the reference backend with a dense embedding gradient, its weights
    ``state`` (a fused embedding's optimizer state is not a weight and is left out)."""
    from cetnet.search.cost import build_for_measuring

    model = build_for_measuring(config, schema)
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    extra = [k for k in unexpected if not k.endswith("optimizer_state")]
    if missing or extra:
        raise ValueError(f"warm-up proxy: the checkpoint does not fit the model (missing "
                         f"{missing[:3]}, unexpected {extra[:3]})")
    return model


#: Weights (embedding tables included) above which the statistics are computed only when
#: asked for (``--proxy sigeo``): they keep three float64 sums per weight.
MAX_AUTO_WEIGHTS = 20_000_000


def warmup_statistics(config: dict, dataset: Any, checkpoint: str | Path, *,
                      batches: int = 4, seed: int = 0,
                      max_weights: int | None = None) -> dict[str, float]:
    """``{"zico", "fisher_rao", "loss"}`` of the model of ``config`` with the weights of
    ``checkpoint`` (a warm-up run's ``best.pt``), on the first ``batches`` training batches
    of ``train.batch_size`` rows (dropout drawn from ``seed``); ``loss`` is the fused
    prediction's log loss, the gradients those of the training objective. The gradients are summed as
    they come (sum, sum of squares, sum of absolute values per weight, in float64), not kept;
    a model of more than ``max_weights`` weights is a ValueError (None: no limit)."""
    from cetnet.metrics import logloss
    from cetnet.train.checkpoint import load_checkpoint

    if batches < 2:
        raise ValueError(f"warm-up proxy: needs at least 2 batches for a gradient spread, got "
                         f"{batches}")
    state = load_checkpoint(checkpoint, keys=("model",))["model"]
    model = _dense_model(config, dataset.schema, state)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_weights = sum(p.numel() for p in params)
    if max_weights is not None and n_weights > max_weights:
        raise ValueError(f"warm-up proxy: {n_weights:,} weights, more than {max_weights:,}: "
                         f"the statistics are computed for such models with --proxy sigeo only")
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    squares = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    absolute = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    projections: list[float] = []
    losses: list[float] = []
    torch.manual_seed(seed)
    split = dataset.splits["train"]
    for i, batch in enumerate(split.batches(config["train"]["batch_size"], shuffle=False)):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        loss, out = model.loss(batch)
        loss.backward()
        # the quality of the prediction, not the training objective: that one is scaled by
        # the member and distillation weights and the ensemble kind, whatever the prediction
        losses.append(logloss(out.prob.detach(), batch.label))
        projection = 0.0
        with torch.no_grad():
            for j, p in enumerate(params):
                if p.grad is None:
                    continue
                g = p.grad.double()
                total[j] += g
                squares[j] += g * g
                absolute[j] += g.abs()
                projection += float((p.double() * g).sum())
        projections.append(projection)
    n = len(losses)
    if n < 2:
        raise ValueError(f"warm-up proxy: the train split gives {n} batch(es) of "
                         f"{config['train']['batch_size']} rows; 2 are needed")
    zico = 0.0
    for s, q, a in zip(total, squares, absolute):
        mean = s / n
        spread = (q / n - mean * mean).clamp_min(0).sqrt()
        # a gradient that never varies (an embedding row no batch touched: 0 every time)
        # has no spread; float rounding of E[g^2] - E[g]^2 is not a spread either
        varies = spread > 1e-6 * (a / n) + 1e-30
        if bool(varies.any()):
            ratio = float(((a / n)[varies] / spread[varies]).sum())
            zico += math.log(ratio) if ratio > 0 else 0.0
    fisher_rao = math.log(sum(x * x for x in projections) / n + 1e-300)
    return {"zico": zico, "fisher_rao": fisher_rao, "loss": sum(losses) / n}
