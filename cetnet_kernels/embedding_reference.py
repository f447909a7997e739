"""The plain-PyTorch oracle of :class:`~cetnet_kernels.MultiTableEmbedding`: one ``F.embedding``
or ``F.embedding_bag`` call per (member, feature) table, differentiable with respect to the
tables. Tests run it in float64; the module's ``backend="reference"`` runs it on its own tables.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BagInput", "FeatureInput", "multi_table_embedding_reference"]

#: ``(values [L], offsets [B + 1], per_sample_weights [L] or None)``
BagInput = tuple[Tensor, Tensor, Union[Tensor, None]]
#: ``[B]`` ids, ``[B, T]`` padded sequences, or a bag.
FeatureInput = Union[Tensor, BagInput]


def _lookup(ids: Tensor, table: Tensor, padding_idx: int | None) -> Tensor:
    """``[*ids.shape, D]`` rows; ``padding_idx`` entries give zeros (and so no gradient)."""
    ids = ids.long()
    if padding_idx is None:
        return F.embedding(ids, table)
    keep = ids != padding_idx
    rows = F.embedding(torch.where(keep, ids, torch.zeros_like(ids)), table)
    return rows * keep.unsqueeze(-1).to(rows.dtype)


def _bag(values: Tensor, offsets: Tensor, psw: Tensor | None, table: Tensor, pooling: str,
         padding_idx: int | None) -> Tensor:
    """``[B, D]`` pooled rows; padding entries are dropped (not counted by the mean) and an
    empty bag gives zeros, as in ``F.embedding_bag``."""
    values, offsets = values.long(), offsets.long()
    if padding_idx is not None:
        B = offsets.numel() - 1
        keep = values != padding_idx
        bag_of = torch.repeat_interleave(torch.arange(B, device=offsets.device), offsets.diff())
        counts = torch.bincount(bag_of[keep], minlength=B)
        offsets = torch.cat([offsets.new_zeros(1), counts.cumsum(0)])
        values = values[keep]
        psw = None if psw is None else psw[keep]
    if psw is not None:
        psw = psw.to(table.dtype)
    return F.embedding_bag(values, table, offsets, mode=pooling, per_sample_weights=psw,
                           include_last_offset=True)


def multi_table_embedding_reference(
    tables: Sequence[Sequence[Tensor]],
    inputs: Sequence[FeatureInput],
    poolings: Sequence[str],
    padding_idx: int | None = -1,
) -> list[Tensor]:
    """Member m's ``[B, N, D_m]`` lookups of every feature, columns in feature order.

    Args:
        tables: ``tables[m][f]`` is member m's ``[num_embeddings_f, D_m]`` table of feature f.
        inputs: per feature, ``[B]`` ids (1 column), ``[B, T]`` padded ids (T columns) or a bag
            ``(values, offsets, per_sample_weights)`` pooled into 1 column.
        poolings: per feature, ``"sum"`` or ``"mean"`` (bags only).
        padding_idx: the id that means "nothing here" (zeros, no gradient), or None.

    Returns:
        M tensors ``[B, N, D_m]`` in the tables' dtype.
    """
    outs = []
    for member_tables in tables:
        cols = []
        for table, x, pooling in zip(member_tables, inputs, poolings):
            if isinstance(x, Tensor):
                rows = _lookup(x, table, padding_idx)
                cols.append(rows.unsqueeze(1) if x.dim() == 1 else rows)
            else:
                values, offsets, psw = x
                cols.append(_bag(values, offsets, psw, table, pooling, padding_idx).unsqueeze(1))
        outs.append(torch.cat(cols, dim=1))
    return outs
