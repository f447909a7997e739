"""DHEN member (Zhang et al. 2022): stacked layers of an ensemble of heterogeneous interaction
modules over embedding slots, ``Y = LayerNorm(Ensemble_i Interaction_i(X) + ShortCut(X))``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from cetnet.data.schema import Schema
from cetnet.models.dcnv2 import CrossNetV2
from cetnet.models.front import MemberInputs
from cetnet.models.layers import MLP, SchemaShape, check_dim, pooled_sequences

__all__ = ["DHEN", "DHENLayer", "DCNInteraction", "DotInteraction", "INTERACTION_MODULES"]

INTERACTION_MODULES = ("dot", "dcn")


class DotInteraction(nn.Module):
    """DOT module (AdvancedDLRM-style): the ``m(m-1)/2`` pairwise inner products of the input
    slots, concatenated with the flattened slots, mapped by an MLP back to ``out_slots`` slots of
    dim d. ``[B, m, d] -> [B, out_slots, d]``."""

    rows: Tensor
    cols: Tensor

    def __init__(self, in_slots: int, dim: int, out_slots: int, hidden: Sequence[int] = (64,),
                 activation: str = "relu") -> None:
        super().__init__()
        rows, cols = torch.triu_indices(in_slots, in_slots, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.out_slots, self.dim = out_slots, dim
        self.mlp = MLP(rows.numel() + in_slots * dim, list(hidden), out_slots * dim,
                       act=activation)

    def forward(self, x: Tensor) -> Tensor:
        gram = torch.bmm(x, x.transpose(1, 2))
        pairs = gram[:, self.rows, self.cols]
        y = self.mlp(torch.cat([pairs, x.flatten(1)], dim=1))
        return y.view(x.shape[0], self.out_slots, self.dim)


class DCNInteraction(nn.Module):
    """DCN module: a cross network v2 over the flattened slots (shape kept), then a learned
    linear map over the slot axis when ``out_slots`` differs from the input's slot count."""

    def __init__(self, in_slots: int, dim: int, out_slots: int, num_layers: int = 1,
                 rank: int | None = None) -> None:
        super().__init__()
        self.cross = CrossNetV2(in_slots * dim, num_layers, rank)
        self.in_slots, self.dim = in_slots, dim
        self.slot_map = (nn.Linear(in_slots, out_slots, bias=False) if out_slots != in_slots
                         else None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cross(x.flatten(1)).view(x.shape[0], self.in_slots, self.dim)
        if self.slot_map is not None:
            y = self.slot_map(y.transpose(1, 2)).transpose(1, 2)
        return y


class DHENLayer(nn.Module):
    """One DHEN layer ``[B, in_slots, d] -> [B, out_slots, d]``.

    ``ensemble="concat"`` splits ``out_slots`` among the modules (module i produces about
    ``out_slots / n_modules`` slots, the first ones one more) and concatenates them;
    ``"sum"`` has every module produce ``out_slots`` slots and adds them. The shortcut is the
    identity when the slot count is kept, else a learned linear map over the slot axis.
    LayerNorm is over each slot's d features.
    """

    def __init__(self, in_slots: int, out_slots: int, dim: int, *,
                 modules: Sequence[str] = INTERACTION_MODULES, ensemble: str = "concat",
                 dot_hidden: Sequence[int] = (64,), dcn_layers: int = 1,
                 dcn_rank: int | None = None, activation: str = "relu") -> None:
        super().__init__()
        modules = list(modules)
        bad = [m for m in modules if m not in INTERACTION_MODULES]
        if not modules or bad:
            raise ValueError(f"DHEN: modules must be a non-empty list of {INTERACTION_MODULES}, "
                             f"got {modules}")
        if ensemble not in ("concat", "sum"):
            raise ValueError(f"DHEN: ensemble must be 'concat' or 'sum', got {ensemble!r}")
        n = len(modules)
        if ensemble == "concat":
            if out_slots < n:
                raise ValueError(f"DHEN: {out_slots} output slots cannot be split among {n} "
                                 f"concatenated modules")
            sizes = [out_slots // n + (1 if i < out_slots % n else 0) for i in range(n)]
        else:
            sizes = [out_slots] * n
        self.ensemble = ensemble
        self.interactions = nn.ModuleList(
            DotInteraction(in_slots, dim, s, dot_hidden, activation) if kind == "dot"
            else DCNInteraction(in_slots, dim, s, dcn_layers, dcn_rank)
            for kind, s in zip(modules, sizes))
        self.shortcut = (nn.Linear(in_slots, out_slots, bias=False) if in_slots != out_slots
                         else None)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        outs = [f(x) for f in self.interactions]
        y = torch.cat(outs, dim=1) if self.ensemble == "concat" else torch.stack(outs).sum(0)
        sc = x if self.shortcut is None else self.shortcut(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(y + sc)


class DHEN(nn.Module):
    """Deep and Hierarchical Ensemble Network CTR member.

    Slots: one per field token (sparse and multihot, schema order), one for the dense values
    (``Linear(n_dense, d)``, when there are any) and one per sequence (mean over its real items,
    zeros when empty). ``num_layers`` :class:`DHENLayer` s, then an MLP head over the flattened
    slots.

    Args:
        schema: the dataset's features.
        dim: embedding dim d of this member.
        num_layers: DHEN layers.
        slots: slots every layer outputs (default: the input slot count, so shortcuts are the
            identity).
        modules: the interaction modules of each layer, any of ``"dot"``, ``"dcn"``.
        ensemble: ``"concat"`` or ``"sum"`` of the modules' outputs.
        dot_hidden: hidden widths of the DOT module's MLP.
        dcn_layers, dcn_rank: cross layers of the DCN module and their rank (None: full).
        head: hidden widths of the output MLP.
        activation: of all MLPs.
        dropout: before the head.
    """

    def __init__(self, schema: Schema, dim: int, *, num_layers: int = 2, slots: int | None = None,
                 modules: Sequence[str] = INTERACTION_MODULES, ensemble: str = "concat",
                 dot_hidden: Sequence[int] = (64,), dcn_layers: int = 1,
                 dcn_rank: int | None = None, head: Sequence[int] = (64,),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        dim = check_dim(dim, "DHEN")
        self.shape = SchemaShape(schema)
        s = self.shape
        self.dense_proj = nn.Linear(s.n_dense, dim) if s.n_dense else None
        in_slots = s.n_fields + (1 if s.n_dense else 0) + s.n_seq
        if in_slots < 1:
            raise ValueError("DHEN: the schema gives no input slot")
        out_slots = slots if slots is not None else in_slots
        layers = []
        for _ in range(num_layers):
            layers.append(DHENLayer(in_slots, out_slots, dim, modules=modules, ensemble=ensemble,
                                    dot_hidden=dot_hidden, dcn_layers=dcn_layers,
                                    dcn_rank=dcn_rank, activation=activation))
            in_slots = out_slots
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = MLP(in_slots * dim, list(head), 1, act=activation)

    def slots(self, inputs: MemberInputs) -> Tensor:
        """The ``[B, m, d]`` input slots."""
        parts = [inputs.fields]
        if self.dense_proj is not None:
            parts.append(self.dense_proj(inputs.dense).unsqueeze(1))
        parts += [p.unsqueeze(1) for p in
                  pooled_sequences(inputs.sequences, inputs.seq_mask, self.shape.sequences)]
        return torch.cat(parts, dim=1)

    def forward(self, inputs: MemberInputs) -> Tensor:
        """``[B]`` logits."""
        x = self.layers(self.slots(inputs))
        return self.head(self.dropout(x.flatten(1))).squeeze(-1)
