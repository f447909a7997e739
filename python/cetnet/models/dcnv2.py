"""DCNv2 member: cross network v2 (full- or low-rank) plus a deep MLP, stacked or parallel."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from cetnet.data.schema import Schema
from cetnet.models.front import MemberInputs
from cetnet.models.layers import MLP, SchemaShape, check_dim, flat_inputs, pooled_sequences

__all__ = ["CrossNetV2", "DCNv2"]


class CrossNetV2(nn.Module):
    """``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` (Wang et al. 2021), with ``W_l = U_l V_l^T`` of
    rank r when ``rank`` is given (the low-rank variant), else a full ``[d, d]`` matrix."""

    def __init__(self, in_dim: int, num_layers: int = 3, rank: int | None = None) -> None:
        super().__init__()
        if rank is not None and rank >= in_dim:
            # U V^T then has full rank at twice the parameters of a full matrix, or more
            warnings.warn(f"DCNv2: rank {rank} >= the cross input width {in_dim}: the low-rank "
                          f"cross is full rank with {2 * rank * in_dim + in_dim} parameters a "
                          f"layer, against {in_dim * in_dim + in_dim} for rank: null (full "
                          f"rank); use a rank below {in_dim}", UserWarning, stacklevel=2)
        if rank is None:
            self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, in_dim))
                for _ in range(num_layers))
        self.out_dim = in_dim

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DCNv2(nn.Module):
    """Deep & Cross Network v2 CTR member.

    Input as :class:`~cetnet.models.DNN` (flattened fields, mean-pooled sequences, dense).

    Args:
        schema: the dataset's features.
        dim: embedding dim D of this member.
        cross_layers: number of cross layers.
        rank: low-rank cross (``W = U V^T`` of this rank); None = full rank.
        hidden: the deep network's hidden widths.
        structure: ``"stacked"`` (cross -> deep -> logit) or ``"parallel"``
            (``[cross(x0) ‖ deep(x0)]`` -> logit).
        activation, dropout, batch_norm: of the deep network.
    """

    def __init__(self, schema: Schema, dim: int, *, cross_layers: int = 3,
                 rank: int | None = None, hidden: Sequence[int] = (256, 128),
                 structure: str = "stacked", activation: str = "relu", dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        dim = check_dim(dim, "DCNv2")
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"DCNv2: structure must be 'stacked' or 'parallel', got {structure!r}")
        self.shape = SchemaShape(schema)
        s = self.shape
        in_dim = (s.n_fields + s.n_seq) * dim + s.n_dense
        self.structure = structure
        self.cross = CrossNetV2(in_dim, cross_layers, rank)
        self.deep = MLP(in_dim, list(hidden), act=activation, dropout=dropout,
                        batch_norm=batch_norm)
        head_in = self.deep.out_dim + (in_dim if structure == "parallel" else 0)
        self.head = nn.Linear(head_in, 1)

    def forward(self, inputs: MemberInputs) -> Tensor:
        """``[B]`` logits."""
        pooled = pooled_sequences(inputs.sequences, inputs.seq_mask, self.shape.sequences)
        x0 = flat_inputs(inputs.fields, inputs.dense, pooled)
        if self.structure == "stacked":
            h = self.deep(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.head(h).squeeze(-1)
