"""Evaluation: AUC, gAUC and logloss of the fused prediction and of every member."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from cetnet import distributed
from cetnet.metrics import auc, gauc, logloss
from cetnet.train.builders import EnsembleModel

__all__ = ["Predictions", "predict", "score", "evaluate", "model_device", "RowRange",
           "gather_predictions"]


@dataclass
class Predictions:
    """A split's predictions, on the CPU, in split order."""

    prob: Tensor               # [N] the ensemble's prediction
    logits: Tensor             # [N, K] member logits
    weights: Tensor | None     # [N, K] fusion weights, when the ensemble has them
    label: Tensor              # [N]
    group: Tensor              # [N]
    #: whether ``group`` holds real gAUC keys (the split's ``grouped``): without, gAUC is NaN
    grouped: bool = True


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_host(t: Tensor) -> Tensor:
    return t.float().to("cpu", non_blocking=True)


@torch.no_grad()
def predict(model: nn.Module, split: Any, *, batch_size: int = 4096,
            device: torch.device | str | None = None) -> Predictions:
    """Runs ``model`` (in eval mode; its mode is restored after) over ``split`` in order."""
    device = model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    probs, logits, weights, labels, groups = [], [], [], [], []
    try:
        for batch in split.batches(batch_size, shuffle=False):
            out = model(batch.to_device(device))
            # to the host without waiting (a CUDA tensor lands in pinned memory): one wait at
            # the end, not one per batch
            probs.append(_to_host(out.prob))
            logits.append(_to_host(out.logits))
            if out.weights is not None:
                weights.append(_to_host(out.weights))
            labels.append(batch.label.cpu())
            groups.append(batch.group.cpu())
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies above are done
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("evaluate: the split has no rows")
    return Predictions(torch.cat(probs), torch.cat(logits),
                       torch.cat(weights) if len(weights) == len(probs) else None,
                       torch.cat(labels), torch.cat(groups), getattr(split, "grouped", True))


class RowRange:
    """Rows ``[start, stop)`` of a split, batched in order (what :func:`predict` reads): a
    rank's share of a split in a data-parallel evaluation. With ``num_batches`` the rows are
    cut into exactly that many batches of near-equal size (``batch_size`` is then ignored):
    sharded tables make every forward a collective, so every rank must run as many."""

    def __init__(self, split: Any, start: int, stop: int, num_batches: int | None = None) -> None:
        self.split, self.start, self.stop = split, start, stop
        self.num_batches = num_batches
        self.grouped = getattr(split, "grouped", True)

    def __len__(self) -> int:
        return self.stop - self.start

    def batches(self, batch_size: int, *, shuffle: bool = False) -> Any:
        if self.num_batches is None:
            bounds = list(range(self.start, self.stop, batch_size)) + [self.stop]
        else:
            base, extra = divmod(len(self), self.num_batches)
            bounds = [self.start]
            for i in range(self.num_batches):
                bounds.append(bounds[-1] + base + (1 if i < extra else 0))
        for lo, hi in zip(bounds, bounds[1:]):
            yield self.split.take(slice(lo, hi))


def gather_predictions(pred: Predictions) -> Predictions:
    """Collective: every rank's predictions of its share, concatenated in rank order (the
    split's order when the shares are :func:`cetnet.distributed.shard_range`'s)."""
    dev = distributed.comm_device()

    def gather(t: Tensor) -> Tensor:
        return distributed.all_gather_rows(t.to(dev)).cpu()

    return Predictions(gather(pred.prob), gather(pred.logits),
                       None if pred.weights is None else gather(pred.weights),
                       gather(pred.label), gather(pred.group), pred.grouped)


def _scores(prob: Tensor, label: Tensor, group: Tensor | None,
            ranking: Tensor | None = None) -> dict[str, float]:
    """AUC and gAUC rank ``ranking`` (default ``prob``: any increasing function of it ranks
    alike), logloss scores ``prob``; gAUC is NaN without groups (``group`` None)."""
    ranking = prob if ranking is None else ranking
    return {"auc": auc(ranking, label),
            "gauc": math.nan if group is None else gauc(ranking, label, group),
            "logloss": logloss(prob, label)}


def _member_scores(logits: Tensor, label: Tensor, group: Tensor | None) -> dict[str, float]:
    # ranked by the logit itself: a float32 sigmoid rounds logits past ~17 to 1.0 and would
    # tie them; the logloss takes a float64 sigmoid
    return _scores(torch.sigmoid(logits.double()), label, group, ranking=logits)


def score(pred: Predictions, member_names: list[str]) -> dict[str, Any]:
    """``{"fused": {auc, gauc, logloss}, "members": {name: {...}}}`` plus, when the ensemble
    has fusion weights, ``"fusion_weights": {name: mean weight}``. A member's AUC and gAUC rank
    its logits ``logits[:, k]``, its logloss scores ``sigmoid(logits[:, k])`` (in float64)."""
    if pred.logits.shape[1] != len(member_names):
        raise ValueError(f"evaluate: the model has {len(member_names)} member names but "
                         f"{pred.logits.shape[1]} logit columns")
    group = pred.group if pred.grouped else None
    out: dict[str, Any] = {
        "fused": _scores(pred.prob, pred.label, group),
        "members": {name: _member_scores(pred.logits[:, k], pred.label, group)
                    for k, name in enumerate(member_names)},
    }
    if pred.weights is not None:
        mean = pred.weights.double().mean(0)
        out["fusion_weights"] = {name: float(mean[k]) for k, name in enumerate(member_names)}
    return out


def evaluate(model: nn.Module, split: Any, *, batch_size: int = 4096,
             device: torch.device | str | None = None, sharded: bool = False) -> dict[str, Any]:
    """Metrics of ``model`` on ``split`` (see :func:`score`).

    ``sharded`` in a data-parallel run (a collective: every rank calls it, with the same
    model): each rank predicts its contiguous share of the rows, the predictions, labels and
    groups are all-gathered in split order and rank 0 scores them (AUC and gAUC of all rows,
    not means of per-rank values) and hands the metrics to every rank, so all ranks agree on
    them exactly. Without a process group ``sharded`` changes nothing."""
    names = list(cast(EnsembleModel, model).member_names)
    if not (sharded and distributed.active()):
        return score(predict(model, split, batch_size=batch_size, device=device), names)
    if len(split) < distributed.world_size():
        raise ValueError(f"evaluate: the split has {len(split)} rows, fewer than the "
                         f"{distributed.world_size()} ranks")
    n, world = len(split), distributed.world_size()
    # as many batches on every rank (the fewest that keep each within batch_size on the
    # largest share, at most one per row of the smallest share)
    largest_share = math.ceil(n / world)
    num_batches = max(1, min(math.ceil(largest_share / batch_size), n // world))
    share = RowRange(split, *distributed.shard_range(n), num_batches=num_batches)
    pred = gather_predictions(predict(model, share, batch_size=batch_size, device=device))
    return distributed.from_main(lambda: score(pred, names))
