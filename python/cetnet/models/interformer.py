"""InterFormer member (Zeng et al. 2024, arXiv 2411.09852): interleaved learning of the
non-sequence tokens X and the behaviour sequence S through a cross arch (summaries), an
interaction arch (X with the sequence summary) and a sequence arch (S personalised by X)."""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cetnet.data.schema import Schema
from cetnet.models.dhen import DHENLayer
from cetnet.models.front import MemberInputs
from cetnet.models.layers import MLP, SchemaShape, check_dim

__all__ = ["InterFormer", "Gate", "PMA", "RotarySelfAttention", "CrossArch", "SequenceLayer"]


def _heads(x: Tensor, h: int) -> Tensor:
    """``[B, L, d] -> [B, h, L, d/h]``."""
    B, L, d = x.shape
    return x.view(B, L, h, d // h).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    B, h, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, h * dh)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (rotate-half form) of ``x [..., L, dh]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Gate(nn.Module):
    """Token-wise gating of summary tokens ``[B, n, d]``.

    ``mode="self"`` (default): ``Y ⊙ σ(MLP(Y))``, a self-gate that selects features and keeps
    their scale; ``mode="sigmoid"``: ``σ(Y ⊙ MLP(Y))``, the paper's formula (quoted in
    docs/MODELS.md; bounds the summaries to (0, 1)).
    """

    def __init__(self, dim: int, mode: str = "self", act: str = "swish") -> None:
        super().__init__()
        if mode not in ("self", "sigmoid"):
            raise ValueError(f"InterFormer: gate must be 'self' or 'sigmoid', got {mode!r}")
        self.mode = mode
        self.mlp = MLP(dim, [dim], dim, act=act)

    def forward(self, y: Tensor) -> Tensor:
        if self.mode == "self":
            return y * torch.sigmoid(self.mlp(y))
        return torch.sigmoid(y * self.mlp(y))


class PMA(nn.Module):
    """Pooling by multi-head attention: ``seeds`` learned queries attend over ``S`` (padding
    masked) -> ``[B, seeds, d]``."""

    def __init__(self, dim: int, seeds: int, heads: int) -> None:
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(seeds, dim) * dim ** -0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, s: Tensor, mask: Tensor) -> Tensor:
        B = s.shape[0]
        q = _heads(self.q(self.seeds).expand(B, -1, -1), self.heads)
        k, v = (_heads(t, self.heads) for t in self.kv(s).chunk(2, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(_merge_heads(o))


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions and a key padding mask."""

    inv_freq: Tensor

    def __init__(self, dim: int, heads: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"InterFormer: dim {dim} must split into {heads} heads of even size "
                             "(rotary positions rotate pairs)")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        dh = dim // heads
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dh, 2).float() / dh),
                             persistent=False)

    def forward(self, s: Tensor, mask: Tensor) -> Tensor:
        L = s.shape[1]
        angles = torch.arange(L, device=s.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(s.dtype), angles.sin().to(s.dtype)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(s).chunk(3, dim=-1))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(_merge_heads(o))


class CrossArch(nn.Module):
    """The summaries of one layer.

    ``x_summary(X) = Gate(MLP over the token axis(X))``: ``[B, n, d] -> [B, n_sum, d]``.
    ``s_summary(S) = Gate([CLS ‖ PMA(S) ‖ K most recent])``: the first ``n_cls`` positions of S
    (the prepended CLS tokens), ``n_pma`` attention-pooled tokens and the ``K`` items right after
    the CLS tokens (column 0 of a sequence is the most recent; padding there is zero).
    """

    def __init__(self, n_tokens: int, dim: int, n_cls: int, n_pma: int, n_recent: int,
                 heads: int, act: str, gate: str) -> None:
        super().__init__()
        self.token_mlp = MLP(n_tokens, [n_tokens], n_cls, act=act)
        self.x_gate = Gate(dim, gate, act)
        self.pma = PMA(dim, n_pma, heads) if n_pma else None
        self.s_gate = Gate(dim, gate, act)
        self.n_cls, self.n_recent = n_cls, n_recent

    def x_summary(self, x: Tensor) -> Tensor:
        return self.x_gate(self.token_mlp(x.transpose(1, 2)).transpose(1, 2))

    def s_summary(self, s: Tensor, mask: Tensor) -> Tensor:
        parts = [s[:, :self.n_cls]]
        if self.pma is not None:
            parts.append(self.pma(s, mask))
        recent = s[:, self.n_cls:self.n_cls + self.n_recent]
        if recent.shape[1] < self.n_recent:  # a sequence shorter than K
            recent = F.pad(recent, (0, 0, 0, self.n_recent - recent.shape[1]))
        parts.append(recent)
        return self.s_gate(torch.cat(parts, dim=1))


class SequenceLayer(nn.Module):
    """``S ← LayerNorm(S' + MHA(S'))``, ``S' = PFFN(X_sum, S) = S · M(X_sum)`` where
    ``M = reshape(flatten(X_sum) W + b)`` is a per-row d×d mixing (``b`` starts at the identity,
    so M starts near it). Padding positions are zeroed after the layer."""

    def __init__(self, dim: int, n_sum: int, heads: int) -> None:
        super().__init__()
        self.pffn = nn.Linear(n_sum * dim, dim * dim)
        with torch.no_grad():
            self.pffn.weight.mul_(0.1)
            self.pffn.bias.copy_(torch.eye(dim).flatten())
        self.attn = RotarySelfAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, x_sum: Tensor, s: Tensor, mask: Tensor) -> Tensor:
        m = self.pffn(x_sum.flatten(1)).view(-1, self.dim, self.dim)
        s = torch.bmm(s, m)
        s = self.norm(s + self.attn(s, mask))
        return s * mask.unsqueeze(-1).to(s.dtype)


class InterFormer(nn.Module):
    """InterFormer CTR member.

    Tokens X: the dense values projected to one token (when there are any) and one token per
    sparse/multihot field. Sequence S: a single sequence as is; several are merged either by
    ``seq_merge="concat"`` (padded to the longest, concatenated along features, ``Linear(n·d,
    d)``; a position is real if any sequence has an item there; suits aligned sequences such as
    items and their genres) or ``"masknet"`` (concatenated along positions, ``S ⊙ MLP(S)``, then a
    linear compression of the positions to the longest T; every compressed position counts as
    real unless the row has no item at all).

    Before layer 1 the layer-1 summary ``X_sum`` (``num_cls`` tokens) is prepended to S as CLS
    tokens (always unmasked, so an empty sequence is fine). Each of ``num_layers`` layers, on
    its input (X, S): cross arch ``X_sum, S_sum``; interaction arch ``X ← Interaction([X ‖
    S_sum])`` back to n tokens (a :class:`~cetnet.models.dhen.DHENLayer` with DOT + DCN modules
    for ``interaction="dhen"``, DOT only for ``"dot"``; their MLPs are the paper's MLP; the
    modules' outputs are concatenated, or summed when n is 1);
    sequence arch ``S ← MHA(PFFN(X_sum, S))``. A final cross arch gives the head's input
    ``[X_sum ‖ S_sum]`` -> MLP -> logit.

    Args:
        schema: the dataset's features (at least one sequence feature).
        dim: embedding dim d (split among ``num_heads`` heads of even size).
        num_layers: InterFormer layers.
        num_cls, num_pma, num_recent: CLS / PMA / recent tokens of the sequence summary
            (``num_cls`` is also the number of non-sequence summary tokens).
        num_heads: attention heads (PMA and the sequence arch).
        interaction: ``"dhen"`` or ``"dot"``.
        seq_merge: ``"concat"`` or ``"masknet"`` (several sequences; see above).
        gate: ``"self"`` or ``"sigmoid"`` (see :class:`Gate`).
        dot_hidden: hidden widths of the DOT module's MLP.
        head: hidden widths of the output MLP.
        activation: of every MLP (Swish by default, as in the paper).
        dropout: before the head.
    """

    def __init__(self, schema: Schema, dim: int, *, num_layers: int = 2, num_cls: int = 4,
                 num_pma: int = 2, num_recent: int = 2, num_heads: int = 2,
                 interaction: str = "dhen", seq_merge: str = "concat", gate: str = "self",
                 dot_hidden: Sequence[int] = (64,), head: Sequence[int] = (64,),
                 activation: str = "swish", dropout: float = 0.0) -> None:
        super().__init__()
        dim = check_dim(dim, "InterFormer")
        self.shape = s = SchemaShape(schema)
        if not s.sequences:
            raise ValueError("InterFormer: the schema has no sequence feature")
        if interaction not in ("dhen", "dot"):
            raise ValueError(f"InterFormer: interaction must be 'dhen' or 'dot', got "
                             f"{interaction!r}")
        if seq_merge not in ("concat", "masknet"):
            raise ValueError(f"InterFormer: seq_merge must be 'concat' or 'masknet', got "
                             f"{seq_merge!r}")
        if num_cls < 1 or num_layers < 1:
            raise ValueError("InterFormer: num_cls and num_layers must be >= 1")
        n = s.n_fields + (1 if s.n_dense else 0)
        if n < 1:
            raise ValueError("InterFormer: the schema gives no non-sequence token")
        self.dim, self.num_cls, self.seq_merge = dim, num_cls, seq_merge
        self.dense_proj = nn.Linear(s.n_dense, dim) if s.n_dense else None
        self.max_t = max(s.max_len.values())
        if s.n_seq > 1 and seq_merge == "concat":
            self.merge = nn.Linear(s.n_seq * dim, dim)
        elif s.n_seq > 1:
            self.mask_mlp = MLP(dim, [dim], dim, act=activation)
            self.merge = nn.Linear(sum(s.max_len.values()), self.max_t, bias=False)
        n_ssum = num_cls + num_pma + num_recent
        self.cross = nn.ModuleList(
            CrossArch(n, dim, num_cls, num_pma, num_recent, num_heads, activation, gate)
            for _ in range(num_layers + 1))
        modules = ("dot", "dcn") if interaction == "dhen" else ("dot",)
        # concat splits the n output tokens among the modules: with one token (e.g. an item and
        # its history) each module outputs the token and they are summed instead
        ensemble = "concat" if n >= len(modules) else "sum"
        self.interaction = nn.ModuleList(
            DHENLayer(n + n_ssum, n, dim, modules=modules, ensemble=ensemble,
                      dot_hidden=dot_hidden, activation=activation) for _ in range(num_layers))
        self.sequence = nn.ModuleList(SequenceLayer(dim, num_cls, num_heads)
                                      for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = MLP((2 * num_cls + num_pma + num_recent) * dim, list(head), 1,
                        act=activation)

    def tokens(self, inputs: MemberInputs) -> Tensor:
        """``[B, n, d]`` non-sequence tokens: the dense token first, then the fields."""
        if self.dense_proj is None:
            return inputs.fields
        return torch.cat([self.dense_proj(inputs.dense).unsqueeze(1), inputs.fields], dim=1)

    def merged_sequence(self, inputs: MemberInputs) -> tuple[Tensor, Tensor]:
        """``(S [B, T, d], mask [B, T])`` of the behaviour sequences (see the class doc)."""
        names = self.shape.sequences
        masks = [inputs.seq_mask[n] for n in names]
        # padding zeroed here, not trusted to the front (MemberInputs promises zeros, a front
        # of a user's may not keep it): the recent tokens, the merges and masknet's position
        # compression read padded positions. A no-op on zeros: the same bits (and NaN there
        # becomes 0, which a product would keep).
        seqs = [torch.where(m.unsqueeze(-1), inputs.sequences[n], 0.0)
                for n, m in zip(names, masks)]
        if len(seqs) == 1:
            return seqs[0], masks[0]
        if self.seq_merge == "concat":
            T = max(x.shape[1] for x in seqs)
            seqs = [F.pad(x, (0, 0, 0, T - x.shape[1])) for x in seqs]
            masks = [F.pad(m, (0, T - m.shape[1])) for m in masks]
            mask = torch.stack(masks).any(0)
            # zero the padding again: the merge's bias would otherwise fill it
            return self.merge(torch.cat(seqs, dim=-1)) * mask.unsqueeze(-1), mask
        # pad each sequence to its schema length: the position compression has fixed inputs
        s = torch.cat([F.pad(x, (0, 0, 0, self.shape.max_len[n] - x.shape[1]))
                       for x, n in zip(seqs, names)], dim=1)
        s = s * self.mask_mlp(s)
        s = self.merge(s.transpose(1, 2)).transpose(1, 2)
        any_item = torch.cat(masks, dim=1).any(1, keepdim=True)
        return s, any_item.expand(-1, s.shape[1])

    def forward(self, inputs: MemberInputs) -> Tensor:
        """``[B]`` logits."""
        cross = cast("Sequence[CrossArch]", self.cross)  # a ModuleList of CrossArch
        x = self.tokens(inputs)
        s_seq, seq_mask = self.merged_sequence(inputs)
        x_sum = cross[0].x_summary(x)
        s = torch.cat([x_sum, s_seq], dim=1)
        cls_mask = seq_mask.new_ones(seq_mask.shape[0], self.num_cls)
        mask = torch.cat([cls_mask, seq_mask], dim=1)
        for i, (inter, seq) in enumerate(zip(self.interaction, self.sequence)):
            if i:
                x_sum = cross[i].x_summary(x)
            s_sum = cross[i].s_summary(s, mask)
            x, s = inter(torch.cat([x, s_sum], dim=1)), seq(x_sum, s, mask)
        x_sum = cross[-1].x_summary(x)
        s_sum = cross[-1].s_summary(s, mask)
        h = torch.cat([x_sum.flatten(1), s_sum.flatten(1)], dim=1)
        return self.head(self.dropout(h)).squeeze(-1)
