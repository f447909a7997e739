"""Small building blocks shared by the members: MLPs, activations, masked pooling, schema counts."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from cetnet.data.schema import Schema

__all__ = ["ACTIVATIONS", "MLP", "SchemaShape", "activation", "check_dim", "count_parameters",
           "flat_inputs", "masked_mean", "pooled_sequences"]

ACTIVATIONS = ("relu", "swish", "gelu", "tanh")


def activation(name: str) -> nn.Module:
    """An activation module by name: ``relu``, ``swish`` (SiLU), ``gelu`` or ``tanh``."""
    if name == "relu":
        return nn.ReLU()
    if name in ("swish", "silu"):
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


class MLP(nn.Sequential):
    """``Linear -> [BatchNorm] -> act -> [Dropout]`` per hidden layer, then an optional output
    ``Linear`` (no activation after it).

    Args:
        in_dim: input features.
        hidden: hidden layer widths (may be empty).
        out_dim: width of a final plain linear layer, or None for none.
        act: activation name (see :func:`activation`).
        dropout: dropout after each hidden activation.
        batch_norm: BatchNorm1d before each hidden activation (inputs must be 2-D).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, *,
                 act: str = "relu", dropout: float = 0.0, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation(act))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        super().__init__(*layers)
        self.out_dim = d


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, T, D]`` over the positions where ``mask [B, T]`` is True; an all-padding
    row gives zeros (not NaN)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_sequences(sequences: dict[str, Tensor], seq_mask: dict[str, Tensor],
                     names: Sequence[str]) -> list[Tensor]:
    """Each sequence in ``names`` mean-pooled over its real items: a list of ``[B, D]``."""
    return [masked_mean(sequences[n], seq_mask[n]) for n in names]


class SchemaShape:
    """What a member needs to know about a schema: field, dense and sequence counts and names.

    ``fields`` are the sparse and multihot features in schema order (one token each, the order of
    :attr:`MemberInputs.fields`); ``sequences`` the sequence features in schema order.
    """

    def __init__(self, schema: Schema) -> None:
        self.fields = [f.name for f in schema.features if f.kind in ("sparse", "multihot")]
        self.sequences = [f.name for f in schema.sequence]
        self.max_len = {f.name: f.max_len for f in schema.sequence}
        self.n_fields = len(self.fields)
        self.n_dense = len(schema.dense)
        self.n_seq = len(self.sequences)


def check_dim(dim: object, who: str) -> int:
    """Validates an embedding dim (a positive int)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{who}: dim must be an int >= 1, got {dim!r}")
    return dim


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def flat_inputs(fields: Tensor, dense: Tensor, pooled: Sequence[Tensor]) -> Tensor:
    """``[B, (n_fields + n_seq) * D + n_dense]``: flattened field tokens, mean-pooled sequences
    and dense values, the input of the flat members (DNN, DCNv2)."""
    return torch.cat([fields.flatten(1), *pooled, dense], dim=1)
