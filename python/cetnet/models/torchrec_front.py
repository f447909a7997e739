"""The embedding front end on TorchRec: every member's tables as TorchRec embedding modules.

``embedding: torchrec`` in a config (docs/DISTRIBUTED.md) swaps an ensemble's
:class:`~cetnet.models.front.EmbeddingFront` for :class:`TorchRecEmbeddingFront`: the same
tables (one per member and feature; one set when shared), the same initialization
(``U(-1/sqrt(V), 1/sqrt(V))``), the same :class:`~cetnet.models.front.MemberInputs`, but held
by a TorchRec ``EmbeddingBagCollection`` (sparse and multihot features, pooled) and
``EmbeddingCollection`` (sequences), so that ``DistributedModelParallel`` can shard them
(:mod:`cetnet.train.sharded`). Padding ids (0) are left out of the KeyedJaggedTensor: an empty
bag pools to zeros, a padding position of a sequence stays a zero vector, as in the fused
front.

Unsharded, the modules run TorchRec's plain PyTorch lookups (what evaluation of a finished
run uses; export copies the tables into a fused front, :meth:`TorchRecEmbeddingFront.tables_into`); sharded, FBGEMM's table-batched kernels look rows up and apply the fused
optimizer (``sgd`` or ``rowwise_adagrad``, the config's ``model.embedding_lr``) in backward.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from cetnet.data.schema import PAD_ID, Batch, FeatureSpec
from cetnet.models.front import EmbeddingFront, MemberInputs

__all__ = ["TorchRecEmbeddingFront", "torchrec_available", "TABLES_PREFIX"]

#: The state-dict prefix of the front's tables inside an ensemble (what the sharded
#: checkpoint holds; everything else is the dense state).
TABLES_PREFIX = "front."


def torchrec_available() -> str | None:
    """None when TorchRec and FBGEMM import, else a sentence saying what is missing and how
    to install it."""
    try:
        with torch.device("cpu"):  # their import-time code, even inside a meta-device build
            import fbgemm_gpu  # noqa: F401
            import torchrec  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises anything at import
        return (f"embedding: torchrec needs TorchRec and FBGEMM ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); install them "
                f"with `make torchrec` or see docs/DISTRIBUTED.md")
    return None


class TorchRecEmbeddingFront(nn.Module):
    """:class:`~cetnet.models.front.EmbeddingFront`'s contract on TorchRec modules.

    Args:
        fields: the sparse and multihot features (schema order), one pooled token each.
        sequences: the sequence features, ``[B, T, D]`` each.
        n_dense: the number of dense features.
        dims: embedding dim per set.
        num_models: K members fed by this front.
        shared: one set for all K members.
        optimizer, lr: the fused optimizer of the sharded tables (``"sgd"`` or
            ``"rowwise_adagrad"``; ``None`` is refused: TorchRec's fused tables have no dense
            gradient mode here).
        device: where the unsharded tables live (``"meta"`` for shapes only).

    Attributes:
        tables: the ``EmbeddingBagCollection`` of the pooled features (None without any).
        sequence_tables: ``"d<dim>"`` -> the ``EmbeddingCollection`` of the sequence tables of
            that dim (TorchRec wants one dim per collection; sets may differ); empty without
            sequences.
    """

    def __init__(self, fields: Sequence[FeatureSpec], sequences: Sequence[FeatureSpec],
                 n_dense: int, dims: Sequence[int], num_models: int, *, shared: bool = False,
                 optimizer: str | None = "rowwise_adagrad", lr: float = 0.01,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        missing = torchrec_available()
        if missing:
            raise ValueError(missing)
        from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,
                              EmbeddingConfig)
        from torchrec.modules.embedding_configs import PoolingType

        if optimizer not in ("sgd", "rowwise_adagrad"):
            raise ValueError(f"embedding: torchrec needs a fused embedding optimizer "
                             f"(model.embedding_optimizer: sgd or rowwise_adagrad), got "
                             f"{optimizer!r}")
        self.fields, self.sequences = list(fields), list(sequences)
        self.n_dense, self.num_members, self.shared = int(n_dense), int(num_models), shared
        self.dims = [int(d) for d in dims]
        self.optimizer, self.lr = optimizer, float(lr)
        self.num_sets = 1 if shared else self.num_members
        if len(self.dims) != self.num_members:
            raise ValueError(f"TorchRecEmbeddingFront: {len(self.dims)} dims for "
                             f"{self.num_members} members")
        device = torch.device("cpu") if device is None else torch.device(device)
        # one table per (set, feature), named by position: TorchRec keys its module dicts by
        # table name, which may not hold a '.' (a feature name may)
        pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
        bag_tables = [EmbeddingBagConfig(name=self.key(k, i), feature_names=[self.key(k, i)],
                                         num_embeddings=f.vocab_size, embedding_dim=self.dims[k],
                                         pooling=pooling[f.pooling or "sum"])
                      for k in range(self.num_sets) for i, f in enumerate(self.fields)]
        by_dim: dict[int, list] = {}
        for k in range(self.num_sets):
            for i, f in enumerate(self.sequences):
                by_dim.setdefault(self.dims[k], []).append(EmbeddingConfig(
                    name=self.key(k, i, "s"), feature_names=[self.key(k, i, "s")],
                    num_embeddings=f.vocab_size, embedding_dim=self.dims[k]))
        self.tables = EmbeddingBagCollection(tables=bag_tables, device=device) \
            if bag_tables else None
        self.sequence_tables = nn.ModuleDict({
            f"d{dim}": EmbeddingCollection(tables=configs, device=device)
            for dim, configs in by_dim.items()})

    @staticmethod
    def key(k: int, i: int, kind: str = "f") -> str:
        """The table (and KJT key) of set ``k``'s ``i``-th field (``f``) or sequence (``s``)."""
        return f"m{k}_{kind}{i}"

    @classmethod
    def from_front(cls, front: EmbeddingFront,
                   device: torch.device | str | None = None) -> "TorchRecEmbeddingFront":
        """The TorchRec front with ``front``'s features, dims, sharing and fused optimizer
        (fresh tables, initialized as TorchRec does: the fused front's initialization)."""
        emb = front.embedding
        return cls(front.fields, front.sequences, front.n_dense, front.dims, front.num_members,
                   shared=front.shared, optimizer=emb.optimizer, lr=emb.lr, device=device)

    def tables_into(self, front: EmbeddingFront) -> None:
        """Copies every table into ``front``'s :class:`~cetnet_kernels.MultiTableEmbedding`
        (a front of the same features, dims and sharing): the same lookups on the fused
        kernels, for what TorchRec's modules cannot do (``torch.export`` does not trace their
        KeyedJaggedTensor lookups). Weights only: the optimizer's state stays behind.

        Raises:
            ValueError: ``front`` holds other features, dims or sharing.
        """
        mine = ([f.name for f in self.fields], [f.name for f in self.sequences], self.dims,
                self.shared, self.n_dense)
        theirs = ([f.name for f in front.fields], [f.name for f in front.sequences],
                  list(front.dims), front.shared, front.n_dense)
        if mine != theirs:
            raise ValueError(f"TorchRecEmbeddingFront.tables_into: the fronts differ (features, "
                             f"sequences, dims, shared, dense: {mine} vs {theirs})")
        emb = front.embedding
        bags: Any = self.tables.embedding_bags if self.tables is not None else {}
        with torch.no_grad():
            for k in range(self.num_sets):
                sequences: Any = self.sequence_tables[f"d{self.dims[k]}"] \
                    if self.sequences else None
                for i, f in enumerate(self.fields):
                    emb.table(k, f.name).copy_(bags[self.key(k, i)].weight)
                for i, f in enumerate(self.sequences):
                    emb.table(k, f.name).copy_(sequences.embeddings[self.key(k, i, "s")].weight)

    def fused_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the front: the tables, updated by their fused optimizer."""
        return list(self.parameters())

    def _jagged(self, keys: list[str], per_feature: list[tuple[Tensor, Tensor]],
                sets: int | None = None) -> Any:
        """The KJT of ``keys``: the features' ids once per set (``sets``, default all)."""
        from torchrec import KeyedJaggedTensor

        sets = self.num_sets if sets is None else sets
        values = torch.cat([v for v, _ in per_feature] * sets)
        lengths = torch.cat([n for _, n in per_feature] * sets)
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths.to(torch.int32))

    def forward(self, batch: Batch) -> list[MemberInputs]:
        """One lookup of every set's tables; returns K :class:`MemberInputs`."""
        B = len(batch)
        dense = batch.dense.to(torch.float32)
        device = dense.device
        fields: list[Tensor] = []
        if self.tables is not None:
            per_feature = []
            for f in self.fields:
                if f.kind == "sparse":
                    ids = batch.sparse[f.name]
                    real = ids != PAD_ID
                    per_feature.append((ids[real], real.to(torch.int64)))
                else:
                    values, offsets = batch.multihot[f.name]
                    per_feature.append((values, offsets[1:] - offsets[:-1]))
            keys = [self.key(k, i) for k in range(self.num_sets) for i in range(len(self.fields))]
            # by key: a sharded collection may return its keys in another order
            pooled = self.tables(self._jagged(keys, per_feature)).to_dict()
            for k in range(self.num_sets):
                fields.append(torch.stack([pooled[self.key(k, i)]
                                           for i in range(len(self.fields))], dim=1))
        else:
            fields = [torch.zeros(B, 0, d, device=device) for d in self.dims[:self.num_sets]]
        masks = {f.name: batch.sequence[f.name] != PAD_ID for f in self.sequences}
        seqs: list[dict[str, Tensor]] = [{} for _ in range(self.num_sets)]
        if self.sequences:
            per_feature = [(batch.sequence[f.name][masks[f.name]],
                            masks[f.name].sum(1)) for f in self.sequences]
            looked: dict[str, Any] = {}
            for name, collection in self.sequence_tables.items():
                dim = int(name[1:])
                sets = [k for k in range(self.num_sets) if self.dims[k] == dim]
                keys = [self.key(k, i, "s") for k in sets for i in range(len(self.sequences))]
                looked.update(collection(self._jagged(keys, per_feature, len(sets))))
            for k in range(self.num_sets):
                for i, f in enumerate(self.sequences):
                    mask = masks[f.name]
                    rows = looked[self.key(k, i, "s")].values()
                    out = rows.new_zeros(*mask.shape, self.dims[k])
                    seqs[k][f.name] = out.masked_scatter(mask.unsqueeze(-1), rows)
        dense = dense.to(fields[0].dtype)  # as the fused front: the tables' output dtype
        views = [MemberInputs(fields[k], dense, seqs[k], masks) for k in range(self.num_sets)]
        return views * self.num_members if self.shared else views

    def extra_repr(self) -> str:
        return (f"members={self.num_members}, shared={self.shared}, fields={len(self.fields)}, "
                f"sequences={len(self.sequences)}, dense={self.n_dense}, "
                f"optimizer={self.optimizer}, lr={self.lr}")
