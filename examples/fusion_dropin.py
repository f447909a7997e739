"""Ensembling two plain PyTorch models you already have: ``CETNetFusion`` and the fused losses.

No ``cetnet`` data, config or trainer here: two ordinary ``nn.Module`` s that map a batch of
ids to ``[B]`` logits (the DNN and FM of ``cetnet.demo``, stand-ins for yours) and the ops of
``cetnet_kernels``. The script

1. trains each model alone (plain BCE): the two models you already have;
2. fuses them *after* training, with no further training: ``confidence_fusion`` (each row's
   weights from the members' confidences) against the plain average;
3. fine-tunes both together with ``CETNetFusion``: the collaborative loss (ensemble BCE +
   member BCE; mutual learning too with ``--mutual-weight``), loss and gradient in one fused
   kernel;
4. fine-tunes copies of the same two models with ``kdef_loss`` instead (KDEF: the mean-logit
   teacher, exam-weighted teacher-to-student and student-to-student transfer);

and prints the test AUC of each. Run ``python examples/fusion_dropin.py`` (under a minute on
two CPU cores); ``--rows`` / ``--epochs`` make it smaller or longer.
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cetnet.demo import DNN, FM, synthetic_clicks
from cetnet.metrics import auc
from cetnet_kernels import CETNetFusion, build_info, confidence_fusion, kdef_loss


def batches(n: int, size: int, seed: int) -> list[Tensor]:
    """Shuffled row indices of one epoch, ``size`` at a time."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.split(size))


def train_alone(model: nn.Module, ids: Tensor, y: Tensor, epochs: int, batch: int,
                lr: float) -> None:
    """Ordinary training of one model: what produced the models you already have."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in batches(len(y), batch, epoch):
            loss = F.binary_cross_entropy_with_logits(model(ids[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def finetune_cetnet(models: Sequence[nn.Module], fusion: CETNetFusion, ids: Tensor, y: Tensor,
                    epochs: int, batch: int, lr: float) -> None:
    """Joint training with the collaborative loss: ``fusion(logits, labels).loss``."""
    params = [p for m in models for p in m.parameters()] + list(fusion.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for epoch in range(epochs):
        for idx in batches(len(y), batch, 100 + epoch):
            # a list of [B] (or [B, 1]) logits, one per model; one kernel for loss + gradient
            out = fusion([m(ids[idx]) for m in models], y[idx])
            opt.zero_grad()
            out.loss.backward()
            opt.step()


def finetune_kdef(models: Sequence[nn.Module], ids: Tensor, y: Tensor, epochs: int, batch: int,
                  lr: float, backend: str) -> None:
    """Joint training with the KDEF loss on the stacked ``[B, K]`` logits."""
    opt = torch.optim.Adam([p for m in models for p in m.parameters()], lr=lr)
    for epoch in range(epochs):
        for idx in batches(len(y), batch, 200 + epoch):
            z = torch.stack([m(ids[idx]) for m in models], dim=1)
            loss, _teacher = kdef_loss(z, y[idx], backend=backend)
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def logits_of(models: Sequence[nn.Module], ids: Tensor) -> Tensor:
    """``[N, K]``: every model's logits on ``ids``, in eval mode."""
    for m in models:
        m.eval()
    z = torch.stack([m(ids) for m in models], dim=1)
    for m in models:
        m.train()
    return z


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fuse two plain PyTorch models with CETNetFusion "
                                             "and the fused losses.")
    ap.add_argument("--rows", type=int, default=60_000, help="synthetic clicks (80 %% train)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of training each model alone")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mutual-weight", type=float, default=0.0,
                    help="mutual learning's weight in the fine-tuning (default 0, as "
                    "docs/FUSION_GUIDE.md advises: its effect changed sign with the data size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="auto, cpu, triton or reference")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    vocab, fields = 40, 4
    ids, y = synthetic_clicks(args.rows, vocab, fields, args.seed)
    cut = int(0.8 * args.rows)
    train_ids, train_y, test_ids, test_y = ids[:cut], y[:cut], ids[cut:], y[cut:]
    print(f"{args.rows} synthetic clicks, CTR {float(y.mean()):.3f}; kernels {build_info()}")

    # 1. the two models you have, each trained alone
    dnn, fm = DNN(vocab, fields), FM(vocab, fields)
    for model in (dnn, fm):
        train_alone(model, train_ids, train_y, args.epochs, args.batch, args.lr)
    results: dict[str, float] = {}
    z = logits_of([dnn, fm], test_ids)
    results["DNN alone"] = auc(torch.sigmoid(z[:, 0]), test_y)
    results["FM alone"] = auc(torch.sigmoid(z[:, 1]), test_y)

    # 2. fused after training, nothing trained: the fusion rule alone
    results["average of the two"] = auc(torch.sigmoid(z).mean(1), test_y)
    prob, weights = confidence_fusion(z, 1.0, backend=args.backend)
    results["confidence fusion (T = 1)"] = auc(prob, test_y)
    print(f"post-hoc fusion: mean weights DNN {float(weights[:, 0].mean()):.3f}, "
          f"FM {float(weights[:, 1].mean()):.3f}")

    # 4 first (from untouched copies), then 3 on the originals
    kdef_models = [copy.deepcopy(dnn), copy.deepcopy(fm)]
    finetune_kdef(kdef_models, train_ids, train_y, args.finetune_epochs, args.batch,
                  args.lr / 3, args.backend)
    fusion = CETNetFusion(2, temperature=1.0, mutual_weight=args.mutual_weight,
                          backend=args.backend)
    finetune_cetnet([dnn, fm], fusion, train_ids, train_y, args.finetune_epochs, args.batch,
                    args.lr / 3)

    # 3. inference with the fusion layer: no labels, fused prob and per-row weights
    with torch.no_grad():
        out = fusion(logits_of([dnn, fm], test_ids))
    results["CETNet fine-tuned: fused"] = auc(out.prob, test_y)
    for k, name in enumerate(("DNN", "FM")):
        results[f"CETNet fine-tuned: {name}"] = auc(out.member_probs[:, k], test_y)
    # 4. KDEF predicts with its teacher, the sigmoid of the mean logit
    zk = logits_of(kdef_models, test_ids)
    results["KDEF fine-tuned: teacher"] = auc(torch.sigmoid(zk.mean(1)), test_y)

    print(f"\n{'model':<30}{'test AUC':>9}")
    for name, value in results.items():
        print(f"{name:<30}{value:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
