"""The embedding front end: one fused lookup of every member's tables, split into MemberInputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor, nn

from cetnet.data.schema import PAD_ID, Batch, Schema
from cetnet_kernels import EmbeddingFeature, MultiTableEmbedding

__all__ = ["EmbeddingFront", "MemberInputs"]


@dataclass
class MemberInputs:
    """One member's view of a batch (docs/MODEL_LIBRARY.md).

    Attributes:
        fields: ``[B, n_fields, D]`` one token per sparse and multihot feature, schema order
            (multihot bags pooled by the embedding, sum or mean per the feature's spec).
        dense: ``[B, n_dense]`` in the dtype of ``fields`` (float32 unless the tables are
            float64; members project it themselves; n_dense may be 0).
        sequences: name -> ``[B, T, D]`` per sequence feature (padding positions are zero).
        seq_mask: name -> ``[B, T]`` bool, True where the id is a real item (in
            ``[1, vocab)``: not padding 0, nor an out-of-range id read as padding).
    """

    fields: Tensor
    dense: Tensor
    sequences: dict[str, Tensor]
    seq_mask: dict[str, Tensor]


def _real_items(ids: Tensor, vocab_size: int) -> Tensor:
    """``[B, T]`` bool: True where a sequence id is a real item, ``0 < id < vocab_size``."""
    assert PAD_ID == 0
    return (ids > 0) & (ids < vocab_size)


class EmbeddingFront(nn.Module):
    """Owns the ensemble's :class:`~cetnet_kernels.MultiTableEmbedding` and turns a
    :class:`~cetnet.data.Batch` into one :class:`MemberInputs` per member.

    Every categorical feature of the schema (sparse, multihot with its spec's pooling, sequence)
    gets one table per embedding set; ids 0 are padding (zero vectors, no gradient). The table
    order puts the one-column features (sparse and multihot, schema order) first and the
    sequences after them, so a member's ``fields`` is a view of the lookup's output, not a copy.

    Args:
        schema: the dataset's features.
        dims: embedding dim of every set (int) or one per set.
        num_models: K members fed by this front.
        shared: one embedding set shared by all K members (KDEF's variant; dims must agree).
        optimizer, lr: the embedding's fused optimizer (None: a dense gradient on its weight).
        bounds_check: the embedding's ``bounds_check`` (``"error"``, ``"warn"``: a bad id is
            padding and the lookup warns, or ``"off"``: no id check, no GPU synchronization; see
            :class:`~cetnet_kernels.MultiTableEmbedding`).
        backend: the embedding's backend (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or
            ``"reference"``), resolved by :class:`~cetnet_kernels.MultiTableEmbedding` itself.
    """

    def __init__(self, schema: Schema, dims: int | Sequence[int], num_models: int, *,
                 shared: bool = False, optimizer: str | None = None, lr: float = 0.01,
                 bounds_check: str = "error", backend: str = "auto") -> None:
        super().__init__()
        if isinstance(dims, bool):  # an int to Python, but not a dim
            raise TypeError(f"EmbeddingFront: dims must be an int or a sequence of ints, got "
                            f"{dims!r}")
        dims = [int(d) for d in ([dims] * num_models if isinstance(dims, int) else dims)]
        if len(dims) != num_models:
            raise ValueError(f"EmbeddingFront: {len(dims)} embedding dims for {num_models} "
                             f"members")
        if shared and len(set(dims)) != 1:
            raise ValueError(f"EmbeddingFront: a shared embedding needs one dim for all members, "
                             f"got {dims}")
        self.fields = [f for f in schema.features if f.kind in ("sparse", "multihot")]
        self.sequences = list(schema.sequence)
        self.n_dense = len(schema.dense)
        if not self.fields and not self.sequences:
            raise ValueError("EmbeddingFront: the schema has no categorical feature")
        feats = [EmbeddingFeature(f.name, f.vocab_size, f.pooling)
                 for f in self.fields + self.sequences]
        self.num_members = num_models
        self.shared = shared
        self.dims = dims
        self.embedding = MultiTableEmbedding(
            1 if shared else num_models, feats, dims[:1] if shared else dims,
            optimizer=optimizer, lr=lr, padding_idx=PAD_ID, bounds_check=bounds_check,
            backend=backend)

    def fused_parameters(self) -> list[nn.Parameter]:
        """The tables' flat weight when a fused optimizer updates it in backward, else none."""
        emb = self.embedding
        return [emb.weight] if emb.optimizer is not None else []

    def ids(self, batch: Batch) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
        """The embedding's input: feature name -> ids ``[B]``, a bag, or ``[B, T]``."""
        out: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
        for f in self.fields:
            out[f.name] = batch.sparse[f.name] if f.kind == "sparse" else batch.multihot[f.name]
        for f in self.sequences:
            out[f.name] = batch.sequence[f.name]
        return out

    def forward(self, batch: Batch) -> list[MemberInputs]:
        """One lookup for all members; returns K :class:`MemberInputs`."""
        tables = self.embedding(self.ids(batch))
        nf = len(self.fields)
        # real items: an id out of range, padding under bounds_check "warn" or "off", is
        # masked as padding too (PAD_ID is 0: real ids are 1 .. vocab - 1)
        masks = {f.name: _real_items(batch.sequence[f.name], f.vocab_size)
                 for f in self.sequences}
        # the tables' output dtype: float32, or float64 for float64 tables
        dense = batch.dense.to(tables[0].dtype)
        views = []
        for out in tables:
            seqs, start = {}, nf
            for f in self.sequences:
                T = batch.sequence[f.name].shape[1]
                seqs[f.name] = out[:, start:start + T]
                start += T
            views.append(MemberInputs(out[:, :nf], dense, seqs, masks))
        return views * self.num_members if self.shared else views

    def extra_repr(self) -> str:
        return (f"members={self.num_members}, shared={self.shared}, fields={len(self.fields)}, "
                f"sequences={len(self.sequences)}, dense={self.n_dense}")
