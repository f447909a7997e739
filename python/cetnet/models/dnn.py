"""DNN member: an MLP over the flattened field tokens, pooled sequences and dense values."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from cetnet.data.schema import Schema
from cetnet.models.front import MemberInputs
from cetnet.models.layers import MLP, SchemaShape, check_dim, flat_inputs, pooled_sequences

__all__ = ["DNN"]


class DNN(nn.Module):
    """Deep neural network CTR member (KDEF's MLP tower).

    Input: every field token flattened, each sequence mean-pooled over its real items (one
    ``D``-vector each; zeros for an empty sequence) and the dense values.

    Args:
        schema: the dataset's features.
        dim: embedding dim D of this member.
        hidden: hidden widths of the MLP.
        activation: ``relu``, ``swish``, ``gelu`` or ``tanh``.
        dropout: dropout after each hidden layer.
        batch_norm: BatchNorm1d in each hidden layer (as in KDEF's towers).
    """

    def __init__(self, schema: Schema, dim: int, *, hidden: Sequence[int] = (256, 128),
                 activation: str = "relu", dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        dim = check_dim(dim, "DNN")
        self.shape = SchemaShape(schema)
        s = self.shape
        self.mlp = MLP((s.n_fields + s.n_seq) * dim + s.n_dense, list(hidden), 1, act=activation,
                       dropout=dropout, batch_norm=batch_norm)

    def forward(self, inputs: MemberInputs) -> Tensor:
        """``[B]`` logits."""
        pooled = pooled_sequences(inputs.sequences, inputs.seq_mask, self.shape.sequences)
        return self.mlp(flat_inputs(inputs.fields, inputs.dense, pooled)).squeeze(-1)
