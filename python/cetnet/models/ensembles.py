"""Ensembles of members over one fused embedding: CETNet, NaiveEnsemble, KDEF, MultiEmbedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cetnet.data.schema import Batch, Schema
from cetnet.metrics import information_abundance
from cetnet.models.dcnv2 import CrossNetV2
from cetnet.models.front import EmbeddingFront, MemberInputs
from cetnet.models.layers import MLP, SchemaShape, check_dim, flat_inputs, pooled_sequences
from cetnet_kernels import CETNetFusion, MultiTableEmbedding, kdef_loss

__all__ = ["CETNet", "CrossBranch", "Ensemble", "EnsembleOutput", "KDEF", "MultiEmbedding",
           "NaiveEnsemble", "unique_names"]


@dataclass
class EnsembleOutput:
    """What an ensemble returns.

    Attributes:
        logits: ``[B, K]`` member logits.
        prob: ``[B]`` the ensemble's prediction (fused / mean / teacher).
        weights: ``[B, K]`` fusion weights (CETNet, without gradient in ``loss``), else None.
    """

    logits: Tensor
    prob: Tensor
    weights: Tensor | None = None


def unique_names(kinds: Sequence[str]) -> list[str]:
    """Member names from kinds: the first of a kind keeps its name, repeats get ``_1``, ``_2``…
    (``["dnn", "dnn", "dhen"] -> ["dnn", "dnn_1", "dhen"]``)."""
    seen: dict[str, int] = {}
    names = []
    for k in kinds:
        n = seen.get(k, 0)
        seen[k] = n + 1
        names.append(k if n == 0 else f"{k}_{n}")
    return names


class Ensemble(nn.Module):
    """K members (``forward(MemberInputs) -> [B]`` logits) behind one :class:`EmbeddingFront`.

    Subclasses define how the member logits become a prediction (``forward``) and the training
    loss (``loss``).

    Args:
        front: the embedding front end (``front.num_members`` must equal K).
        members: name -> member, or a list of members (named by their lower-cased class names,
            made unique).
    """

    def __init__(self, front: EmbeddingFront,
                 members: Mapping[str, nn.Module] | Sequence[nn.Module]) -> None:
        super().__init__()
        if not isinstance(members, Mapping):
            members = dict(zip(unique_names([type(m).__name__.lower() for m in members]),
                               members))
        if not members:
            raise ValueError(f"{type(self).__name__}: needs at least one member")
        if front.num_members != len(members):
            raise ValueError(f"{type(self).__name__}: the front feeds {front.num_members} "
                             f"members, got {len(members)}")
        self.front = front
        self.members = nn.ModuleDict(members)
        self.member_names: list[str] = list(members)

    @property
    def embedding(self) -> MultiTableEmbedding:
        """The fused embedding of every member's tables."""
        return self.front.embedding

    def member_logits(self, batch: Batch) -> Tensor:
        """``[B, K]``: one embedding lookup, then every member on its own view (a member returns
        ``[B]`` or ``[B, 1]`` logits; another shape is a ValueError naming the member: stacked
        or broadcast against the labels, it would fail without a name, or give a wrong loss)."""
        views = self.front(batch)
        rows = batch.label.shape[0]
        logits = []
        for name, member, view in zip(self.member_names, self.members.values(), views):
            z = member(view)
            if z.dim() == 2 and z.shape[1] == 1:
                z = z[:, 0]
            if z.dim() != 1 or z.shape[0] != rows:
                raise ValueError(f"{type(self).__name__}: member '{name}' returned logits of "
                                 f"shape {tuple(z.shape)}; a member returns [B] or [B, 1] "
                                 f"logits (B = {rows})")
            logits.append(z)
        return torch.stack(logits, dim=1)

    def embedding_sets(self) -> list[str]:
        """A name per embedding set of the front: the member names, ``["shared"]`` for one
        shared set, ``["set0", ...]`` when sets and members do not match one to one."""
        n = self.embedding.num_models
        if self.front.shared:
            return ["shared"]
        return list(self.member_names) if len(self.member_names) == n else \
            [f"set{i}" for i in range(n)]

    def information_abundance(self) -> dict[str, dict[str, float]]:
        """Embedding set -> feature -> :func:`cetnet.metrics.information_abundance` of that
        set's table of the feature without its padding row (a table collapses when its rows
        crowd onto few directions; rows never seen in training keep their initial values and
        count, as in the papers)."""
        emb = self.embedding

        def used_rows(table: Tensor) -> Tensor:
            # the padding row is never read (padding ids give zero vectors): leave it out
            pad = emb.padding_idx
            if pad is None or not 0 <= pad < table.shape[0]:  # an id, not a Python index
                return table
            keep = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
            keep[pad] = False
            return table[keep]

        return {name: {f.name: information_abundance(used_rows(emb.table(i, f.name)))
                       for f in emb.features}
                for i, name in enumerate(self.embedding_sets())}

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the tables a fused optimizer updates in backward
        (``front.fused_parameters()``: the fused embedding's flat weight unless
        ``optimizer=None``, every table of a TorchRec front)."""
        fused = {id(p) for p in self.front.fused_parameters()}
        return [p for p in self.parameters() if id(p) not in fused]

    def forward(self, batch: Batch) -> EnsembleOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: Batch) -> tuple[Tensor, EnsembleOutput]:  # pragma: no cover
        raise NotImplementedError

    @property
    def loss_reduction(self) -> str:
        """How :meth:`loss` reduces over the batch's rows: ``"mean"`` or ``"sum"``."""
        return "mean"


def _mean_bce(z: Tensor, y: Tensor) -> Tensor:
    """The mean binary cross-entropy of logits ``z`` and labels ``y``; 0 for an empty batch
    (as the fused losses give), not the NaN of a mean over nothing."""
    if z.numel() == 0:
        return z.sum()
    return F.binary_cross_entropy_with_logits(z, y)


class CETNet(Ensemble):
    """Collaborative Ensemble Training Network: confidence-weighted fusion of the members and the
    collaborative loss, both the fused ops of :class:`~cetnet_kernels.CETNetFusion`.

    Args:
        front, members: see :class:`Ensemble`.
        fusion: the fusion layer (default ``CETNetFusion(K)``: τ = 1, prob space, ensemble and
            member BCE weights 1); its ``backend`` picks the kernels.
    """

    def __init__(self, front: EmbeddingFront,
                 members: Mapping[str, nn.Module] | Sequence[nn.Module],
                 fusion: CETNetFusion | None = None) -> None:
        super().__init__(front, members)
        K = len(self.member_names)
        self.fusion = fusion if fusion is not None else CETNetFusion(K)
        if self.fusion.num_models != K:
            raise ValueError(f"CETNet: the fusion is for {self.fusion.num_models} members, "
                             f"got {K}")

    def forward(self, batch: Batch) -> EnsembleOutput:
        out = self.fusion(self.member_logits(batch))
        return EnsembleOutput(out.logits, out.prob, out.weights)

    def loss(self, batch: Batch) -> tuple[Tensor, EnsembleOutput]:
        """The collaborative loss (one fused kernel) and the output (weights without grad)."""
        out = self.fusion(self.member_logits(batch), batch.label)
        return out.loss, EnsembleOutput(out.logits, out.prob, out.weights)

    @property
    def loss_reduction(self) -> str:
        return self.fusion.reduction


class NaiveEnsemble(Ensemble):
    """Independently trained members: loss = mean of the member BCEs (no collaboration);
    prediction = mean of the member probabilities (``average="prob"``, default) or σ of the mean
    logit (``average="logit"``)."""

    def __init__(self, front: EmbeddingFront,
                 members: Mapping[str, nn.Module] | Sequence[nn.Module],
                 average: str = "prob") -> None:
        super().__init__(front, members)
        if average not in ("prob", "logit"):
            raise ValueError(f"NaiveEnsemble: average must be 'prob' or 'logit', got {average!r}")
        self.average = average

    def _output(self, z: Tensor) -> EnsembleOutput:
        prob = torch.sigmoid(z).mean(1) if self.average == "prob" else torch.sigmoid(z.mean(1))
        return EnsembleOutput(z, prob)

    def forward(self, batch: Batch) -> EnsembleOutput:
        return self._output(self.member_logits(batch))

    def loss(self, batch: Batch) -> tuple[Tensor, EnsembleOutput]:
        z = self.member_logits(batch)
        y = batch.label.to(z.dtype).unsqueeze(1).expand_as(z)
        return _mean_bce(z, y), self._output(z)


class KDEF(Ensemble):
    """Knowledge-Driven Ensemble Framework: the teacher ``σ(mean_k z_k)`` is the prediction, the
    loss is the fused :func:`~cetnet_kernels.kdef_loss` (label + exam-weighted teacher-to-student
    and student-to-student transfer). Shared embedding: build the front with ``shared=True``.

    Args:
        front, members: see :class:`Ensemble`.
        backend: the loss kernel's backend (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
            ``"reference"``).
        validate: check the label values at every step on the non-CPU backends (a host
            synchronization on a GPU; see :class:`~cetnet_kernels.CETNetFusion`); ``build_model``
            turns it off, cetnet's datasets having validated their labels.
    """

    def __init__(self, front: EmbeddingFront,
                 members: Mapping[str, nn.Module] | Sequence[nn.Module],
                 backend: str = "auto", validate: bool = True) -> None:
        super().__init__(front, members)
        self.backend = backend
        self.validate = bool(validate)
        #: the data-parallel group whose ranks' shares make the batch (:meth:`set_process_group`)
        self.process_group: Any = None

    def set_process_group(self, group: Any) -> "KDEF":
        """Exam scores and batch means of the whole data-parallel batch, whose shares the ranks
        of the ``torch.distributed`` process ``group`` hold (``loss`` is then a collective: see
        :func:`~cetnet_kernels.kdef_loss`'s ``process_group``), or of this rank's share again
        (None)."""
        self.process_group = group
        return self

    def forward(self, batch: Batch) -> EnsembleOutput:
        z = self.member_logits(batch)
        return EnsembleOutput(z, torch.sigmoid(z.mean(1)))

    def loss(self, batch: Batch) -> tuple[Tensor, EnsembleOutput]:
        z = self.member_logits(batch)
        loss, teacher = kdef_loss(z, batch.label, backend=self.backend, validate=self.validate,
                                  process_group=self.process_group)
        return loss, EnsembleOutput(z, teacher.detach())


class CrossBranch(nn.Module):
    """One embedding set's interaction module in :class:`MultiEmbedding`: a DCNv2 cross network
    over the flattened inputs (fields, mean-pooled sequences, dense) and the first MLP layer,
    ``[B, width]``."""

    def __init__(self, schema: Schema, dim: int, *, cross_layers: int = 3,
                 rank: int | None = None, width: int = 256, activation: str = "relu") -> None:
        super().__init__()
        dim = check_dim(dim, "MultiEmbedding")
        self.shape = s = SchemaShape(schema)
        in_dim = (s.n_fields + s.n_seq) * dim + s.n_dense
        self.cross = CrossNetV2(in_dim, cross_layers, rank)
        self.first = MLP(in_dim, [width], act=activation)

    def forward(self, inputs: MemberInputs) -> Tensor:
        pooled = pooled_sequences(inputs.sequences, inputs.seq_mask, self.shape.sequences)
        return self.first(self.cross(flat_inputs(inputs.fields, inputs.dense, pooled)))


class MultiEmbedding(Ensemble):
    """The multi-embedding paradigm (Guo et al., arXiv 2310.04400): M embedding sets, each
    feeding its own :class:`CrossBranch`; the M outputs are averaged, then a shared MLP gives
    one logit. It is one model, not an ensemble of members: ``logits`` is ``[B, 1]``,
    ``member_names == ["multi_embedding"]``, ``prob = σ(logit)``, loss = BCE.

    Args:
        front: an :class:`EmbeddingFront` with ``num_models = M`` (not shared).
        branches: M branch modules ``MemberInputs -> [B, width]``.
        top: the shared MLP ``[B, width] -> [B, 1]``.
    """

    def __init__(self, front: EmbeddingFront, branches: Sequence[nn.Module],
                 top: nn.Module) -> None:
        nn.Module.__init__(self)
        if front.num_members != len(branches) or front.shared:
            raise ValueError(f"MultiEmbedding: the front must feed {len(branches)} separate "
                             f"embedding sets")
        self.front = front
        self.branches = nn.ModuleList(branches)
        self.top = top
        self.member_names = ["multi_embedding"]

    @classmethod
    def build(cls, schema: Schema, dims: int | Sequence[int], *, num_sets: int = 2,
              cross_layers: int = 3, rank: int | None = None, hidden: Sequence[int] = (256, 128),
              activation: str = "relu", optimizer: str | None = None, lr: float = 0.01,
              bounds_check: str = "error", backend: str = "auto") -> "MultiEmbedding":
        """M = ``num_sets`` embedding sets of ``dims``; each branch is a cross net and the first
        MLP layer (``hidden[0]``), the shared top the rest of the MLP (``hidden[1:]``) -> 1."""
        if num_sets < 1 or not hidden:
            raise ValueError("MultiEmbedding: num_sets must be >= 1 and hidden non-empty")
        front = EmbeddingFront(schema, dims, num_sets, optimizer=optimizer, lr=lr,
                               bounds_check=bounds_check, backend=backend)
        branches = [CrossBranch(schema, d, cross_layers=cross_layers, rank=rank,
                                width=hidden[0], activation=activation) for d in front.dims]
        top = MLP(hidden[0], list(hidden[1:]), 1, act=activation)
        return cls(front, branches, top)

    def member_logits(self, batch: Batch) -> Tensor:
        """``[B, 1]``: the one logit."""
        views = self.front(batch)
        h = torch.stack([f(v) for f, v in zip(self.branches, views)]).mean(0)
        return self.top(h)

    def forward(self, batch: Batch) -> EnsembleOutput:
        z = self.member_logits(batch)
        return EnsembleOutput(z, torch.sigmoid(z[:, 0]))

    def loss(self, batch: Batch) -> tuple[Tensor, EnsembleOutput]:
        z = self.member_logits(batch)
        loss = _mean_bce(z[:, 0], batch.label.to(z.dtype))
        return loss, EnsembleOutput(z, torch.sigmoid(z[:, 0]))
