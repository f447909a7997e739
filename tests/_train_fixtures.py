"""TEMPORARY stand-ins for ``cetnet.data`` / ``cetnet.models`` used by the training tests until
those packages are merged: a tiny planted-signal CTR dataset (``CTRDataset``-compatible) and a
tiny two-member ensemble (``Ensemble``-compatible) fused by the real ``CETNetFusion``.

Importing this module registers them as dataset ``"tiny"`` and ensemble ``"tiny"`` (so it also
works as a CLI plugin: ``cetnet --plugin _train_fixtures ...``). After the merge the tests should
use the real ``synthetic`` dataset and real models instead (see tests/conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from cetnet.data.schema import Batch, FeatureSpec, Schema
from cetnet.train import register_dataset, register_model
from cetnet_kernels import CETNetFusion, MultiTableEmbedding

NAME = "tiny"


class TinySplit:
    """A split held as tensors (the ``Split`` contract)."""

    def __init__(self, user: Tensor, item: Tensor, dense: Tensor, label: Tensor) -> None:
        self.user, self.item, self.dense, self.label = user, item, dense, label
        self.num_rows = int(label.numel())

    def __len__(self) -> int:
        return self.num_rows

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[Batch]:
        n = self.num_rows
        idx = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
               else torch.arange(n))
        stop = n - n % batch_size if drop_last else n
        for s in range(0, stop, batch_size):
            i = idx[s:s + batch_size]
            yield Batch(sparse={"user": self.user[i], "item": self.item[i]},
                        dense=self.dense[i], multihot={}, sequence={}, label=self.label[i],
                        group=self.user[i])


@dataclass
class TinyDataset:
    name: str
    schema: Schema
    splits: dict[str, TinySplit]

    def summary(self) -> str:
        rows = {k: len(v) for k, v in self.splits.items()}
        ctr = float(self.splits["train"].label.mean())
        return f"{self.name}: rows {rows}, train CTR {ctr:.3f}"


def make_dataset(num_rows: int = 3000, num_users: int = 40, num_items: int = 30,
                 seed: int = 0) -> TinyDataset:
    """Clicks from planted user/item biases, a user x item interaction and a dense feature."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(2, num_users + 2, (num_rows,), generator=g)
    item = torch.randint(2, num_items + 2, (num_rows,), generator=g)
    dense = torch.randn(num_rows, 2, generator=g)
    ub = torch.randn(num_users + 2, generator=g)
    ib = torch.randn(num_items + 2, generator=g)
    uv, iv = torch.randn(num_users + 2, 3, generator=g), torch.randn(num_items + 2, 3, generator=g)
    logit = 1.5 * ub[user] + 1.5 * ib[item] + (uv[user] * iv[item]).sum(1) + dense[:, 0] - 0.3
    label = (torch.rand(num_rows, generator=g) < torch.sigmoid(logit)).float()
    a, b = int(0.7 * num_rows), int(0.85 * num_rows)
    cut = {"train": slice(0, a), "valid": slice(a, b), "test": slice(b, num_rows)}
    schema = Schema([FeatureSpec("user", "sparse", num_users + 2),
                     FeatureSpec("item", "sparse", num_items + 2),
                     FeatureSpec("d0", "dense"), FeatureSpec("d1", "dense")])
    return TinyDataset(NAME, schema, {k: TinySplit(user[c], item[c], dense[c], label[c])
                                      for k, c in cut.items()})


@dataclass
class TinyOutput:  # the EnsembleOutput contract
    logits: Tensor
    prob: Tensor
    weights: Tensor | None


class TinyEnsemble(nn.Module):
    """Two MLP members (different dims, with dropout so resume must restore the RNG) on one
    ``MultiTableEmbedding``, fused by ``CETNetFusion``."""

    def __init__(self, config: dict, schema: Schema, *, backend: str = "auto") -> None:
        super().__init__()
        self.member_names = ["mlp_a", "mlp_b"]
        dims = [8, 4]
        self.features = [f.name for f in schema.categorical]
        self.embedding = MultiTableEmbedding(
            2, [(f.name, f.vocab_size) for f in schema.categorical], dims,
            optimizer=config.get("embedding_optimizer"), lr=config.get("embedding_lr", 0.05),
            padding_idx=0, backend="reference" if backend == "reference" else "auto")
        n_in = len(self.features)
        hidden = config.get("hidden", 16)
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in * d + len(schema.dense), hidden), nn.ReLU(),
                          nn.Dropout(config.get("dropout", 0.1)), nn.Linear(hidden, 1))
            for d in dims)
        self.fusion = CETNetFusion(2, **config.get("fusion", {}), backend=backend)

    def _logits(self, batch: Batch) -> Tensor:
        embs = self.embedding({f: batch.sparse[f] for f in self.features})
        return torch.stack([m(torch.cat([e.flatten(1), batch.dense], 1)).squeeze(1)
                            for m, e in zip(self.members, embs)], dim=1)

    def forward(self, batch: Batch) -> TinyOutput:
        out = self.fusion(self._logits(batch))
        return TinyOutput(out.logits, out.prob, out.weights)

    def loss(self, batch: Batch) -> tuple[Tensor, TinyOutput]:
        out = self.fusion(self._logits(batch), batch.label)
        return out.loss, TinyOutput(out.logits, out.prob, None)

    def dense_parameters(self) -> list[nn.Parameter]:
        fused = self.embedding.optimizer is not None
        return [p for p in self.parameters() if not (fused and p is self.embedding.weight)]


def build(config: dict, schema: Schema, *, backend: str = "auto") -> TinyEnsemble:
    return TinyEnsemble(config, schema, backend=backend)


def tiny_config(**train: object) -> dict:
    """A complete run config for the fixtures (small and fast); ``train`` keys override."""
    return {
        "name": "tiny",
        "data": {"name": NAME, "num_rows": 3000},
        "model": {"ensemble": NAME, "embedding_optimizer": None, "hidden": 16, "dropout": 0.1,
                  "fusion": {"temperature": 1.0, "member_weight": 1.0}},
        "train": {"epochs": 3, "batch_size": 128, "eval_batch_size": 512, "lr": 0.01,
                  "lr_schedule": "cosine", "warmup_steps": 5, "patience": 2, "seed": 0,
                  **train},
        "backend": "reference",
        "device": "cpu",
    }


def register() -> None:
    register_dataset(NAME, make_dataset)
    register_model(NAME, build)


register()
