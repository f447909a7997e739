"""One `cetnet train` step of the packaged Criteo_x1 model on synthetic Criteo-shaped batches:
what bench_gpu.py times as ``bench_gpu_train_step`` (samples per second of a whole training
step, the number a user of the library asks for first). Importable without a GPU: the CPU tests
run the same step.

The model and the training settings are those of ``configs/bars_criteo_x1.yaml`` (CETNet with a
DNN and a DCNv2 member of BARS' sizes, embedding dim 10, fused row-wise Adagrad on the
embedding, Adam with gradient clipping on the rest, batch 4096). The data: 13 dense features
(standard normal) and 26 categorical ones of ``rows`` ids each, Zipf(1.05)-distributed (real
CTR ids are heavy-tailed), labels with a 25 % click rate; batches made on the CPU and moved to
the device in the step, as the training loop does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import cetnet
from cetnet.config import read_yaml
from cetnet.data.schema import Batch, FeatureSpec, Schema
from cetnet.models import build_model
from cetnet.train.loop import dense_optimizer

N_DENSE, N_SPARSE = 13, 26
ZIPF_A = 1.05
CONFIG = Path(cetnet.__file__).resolve().parent / "configs" / "bars_criteo_x1.yaml"


def criteo_config() -> dict:
    """The packaged Criteo_x1 config (model and train sections)."""
    return read_yaml(CONFIG)


def criteo_schema(rows: int) -> Schema:
    """Criteo's shape: I1..I13 dense, C1..C26 categorical with ``rows`` ids each."""
    return Schema([FeatureSpec(f"I{i}", "dense") for i in range(1, N_DENSE + 1)]
                  + [FeatureSpec(f"C{i}", "sparse", rows) for i in range(1, N_SPARSE + 1)],
                  group=None)


def criteo_batches(rows: int, batch_size: int, n: int, seed: int = 0) -> list[Batch]:
    """``n`` CPU batches of the schema above (Zipf ids folded into [1, rows): 0 is padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = (rng.zipf(ZIPF_A, (N_SPARSE, batch_size)) - 1) % (rows - 1) + 1
        sparse = {f"C{i + 1}": torch.from_numpy(ids[i]) for i in range(N_SPARSE)}
        dense = torch.from_numpy(rng.standard_normal((batch_size, N_DENSE), np.float32))
        label = torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32))
        out.append(Batch(sparse, dense, {}, {}, label, torch.zeros(batch_size, dtype=torch.long)))
    return out


def train_step(backend: str, device: str | torch.device, rows: int, batch_size: int,
               n_batches: int = 3) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model and a step closure: next batch to the device, loss, the loop's non-finite
    watch, backward (which applies the embedding's fused update), gradient clipping, Adam, the
    loss sum: the training loop's step (cetnet.train.loop) from a batch already made (the
    loop's data pipeline and its learning-rate schedule, host work, are left out), with the
    embedding's bounds check off as that loop runs it on a GPU when its splits validated the
    ids. The closure returns the loss (not read: no host wait)."""
    config = criteo_config()
    model_cfg = dict(config["model"], embedding_bounds_check="off")
    model = build_model(model_cfg, criteo_schema(rows), backend=backend).to(device)
    model.train()
    params = list(model.dense_parameters())  # (the embedding updates itself in backward)
    optimizer = dense_optimizer(params, config["train"]["lr"], config["train"]["weight_decay"])
    clip = config["train"]["grad_clip"]
    batches = criteo_batches(rows, batch_size, n_batches)
    turn = iter(range(1 << 62))
    # the loop's bookkeeping on the device: the first non-finite step and loss, the loss sum
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step() -> torch.Tensor:
        nonlocal bad_step, bad_loss
        i = next(turn)
        batch = batches[i % len(batches)].to_device(device)
        loss, _out = model.loss(batch)
        first = (bad_step < 0) & ~torch.isfinite(loss.detach())
        bad_step = torch.where(first, i, bad_step)
        bad_loss = torch.where(first, loss.detach().double(), bad_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        loss_sum.add_(loss.detach().double() * len(batch))
        return loss.detach()

    return model, step
