"""Scale-out on paper: memory, communication and step time of sharded ensemble embeddings.

``cetnet plan`` prints these numbers for one configuration; docs/SCALING.md explains every
formula and its tables are written by :func:`doc_blocks` (``python -m cetnet.plan
docs/SCALING.md`` rewrites them, and tests/library/test_plan.py checks that they still match).

Everything here is arithmetic on plain numbers (no tensors). The notation of docs/SCALING.md:

- ``M`` embedding sets (one per member, or one when the members share their tables), member
  ``m`` at dim ``D_m``; ``F`` features, feature ``f`` with ``V_f`` rows; ``H`` ids per row
  and feature (1 for one-hot features); ``B`` the global batch, ``N`` GPUs,
  ``B_local = B / N``; ``C = F * sum_m D_m`` the output columns of one sample.
- ``w`` bytes per weight element (fp32 4, fp16 2); outputs and gradients are fp32 (4 bytes),
  ids int64 (8 bytes), as in ``cetnet_kernels.MultiTableEmbedding``.

Per GPU, per training step:

- memory: weights ``rows * D * w``; optimizer state: SGD none, row-wise Adagrad one fp32 per
  row (``4 * rows``), Adam (the library's dense-gradient path only, ``embedding_optimizer:
  null``) two fp32 moments per element plus the dense gradient (``rows * D * (8 + w)``);
- kernel bytes (FBGEMM's accounting, as bench/GPU_RESULTS.md): a lookup of ``n`` samples in
  a table piece of width ``d`` reads ``n*H*d*w`` and writes ``n*d*4``; its fused backward
  reads the output gradient ``n*d*4`` and reads and writes the rows ``2*n*H*d*w``;
- communication: bytes one GPU moves (the larger of what it sends and what it receives), per
  collective, summed; all-to-all traffic is spread evenly over the ranks, so a share
  ``(N - 1) / N`` leaves the GPU.
"""

from __future__ import annotations

import heapq
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence, TypedDict

from cetnet.config import ConfigError, load_config

__all__ = [
    "CPU_EPYC", "H200", "OPTIMIZERS", "SCHEMES", "WEIGHT_DTYPES", "Cost", "KernelRates",
    "Network", "Plan", "Workload", "all_to_all_seconds", "collective_seconds", "doc_blocks",
    "library_gather_bytes",
    "config_fields", "parse_counts", "plan", "plan_text", "recommend", "render_plan",
    "workloads_from_flags", "scheme_cost", "state_bytes", "touched_rows_bytes",
    "write_doc",
]

#: Bytes per weight element of the storage dtypes ``MultiTableEmbedding`` offers for training.
WEIGHT_DTYPES: Mapping[str, int] = {"fp32": 4, "fp16": 2}
#: The fused optimizers, and Adam on the dense gradient (``embedding_optimizer: null``).
OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam")
#: The sharding schemes, in the order a tie is broken (the simplest first).
SCHEMES = ("data-parallel", "table-wise", "column-wise", "row-wise")
OUT_BYTES = 4  # pooled outputs and their gradients: fp32
ID_BYTES = 8  # int64 ids
STATE_BYTES = 4  # row-wise Adagrad's one fp32 per row; Adam's moments are fp32 too
#: Column-wise sharding cuts a table into pieces of at most this many columns (one piece, i.e.
#: table-wise, for D <= 32).
COLUMN_WIDTH = 32
GB = 1e9


@dataclass(frozen=True)
class KernelRates:
    """Measured bandwidths of the fused kernels (bytes of the accounting above per second)."""

    name: str
    forward_gbs: float
    backward_gbs: Mapping[str, float]  # the fused backward alone, per optimizer
    copy_gbs: float  # a device-to-device copy: Adam's full-table pass runs at this rate


#: bench/GPU_RESULTS.md (the 2026-11-29 run), H200, M = 2, F = 26, 1e6 rows, D = 64, fp32,
#: uniform ids, cetnet-cuda with the default bounds check: forward 0.988 ms for 2*L*D*4 bytes
#: (L = 2*26*65536) = 1766 GB/s (42 % of the 4213 GB/s copy); the fused backward alone
#: 1182 GB/s (SGD, 28 %) and 633 GB/s (row-wise Adagrad, 15 %). Adam's scatter of the dense
#: gradient is taken at the SGD rate.
H200 = KernelRates("H200", 1766.0, {"sgd": 1182.0, "rowwise_adagrad": 633.0, "adam": 1182.0},
                   4213.0)
#: bench/EMBEDDING_RESULTS.md, AMD EPYC, 2 cores, M = 2, B = 4096, D = 64, SGD: a whole step
#: (lookup + fused backward) at 8.51 "useful" GB/s, i.e. the forward's 2*L*D*4 bytes per step
#: time. The step moves 5*L*D*4 bytes in this module's accounting, so forward and backward are
#: both given 8.51 * 5 / 2 GB/s. Row-wise Adagrad was not measured on the CPU: the SGD rate.
CPU_EPYC = KernelRates("EPYC-2core", 21.275,
                       {"sgd": 21.275, "rowwise_adagrad": 21.275, "adam": 21.275}, 10.0)
DEVICES: Mapping[str, KernelRates] = {"h200": H200, "cpu": CPU_EPYC}


@dataclass(frozen=True)
class Network:
    """The interconnect: NVLink inside a node, InfiniBand between nodes, per GPU, one way."""

    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0  # GB/s per GPU (H100/H200 NVLink 4: 900 GB/s both ways)
    link_gbit: float = 400.0  # Gb/s per GPU between nodes (8 x 400 Gb/s per node of 8)

    @property
    def link_gbs(self) -> float:
        return self.link_gbit / 8


@dataclass(frozen=True)
class Workload:
    """One training configuration: the ensemble's tables, the batch, the machines."""

    dims: tuple[int, ...]  # one per embedding set (member), so M = len(dims)
    vocabs: tuple[int, ...]  # one per feature, so F = len(vocabs)
    batch: int  # global batch (train.batch_size)
    gpus: int
    optimizer: str = "rowwise_adagrad"
    weights_dtype: str = "fp32"
    ids_per_feature: int = 1  # H
    memory_gb: float = 100.0  # per GPU for the tables and their optimizer state
    device: KernelRates = H200
    network: Network = field(default_factory=Network)

    def __post_init__(self) -> None:
        checks = (("dims", all(d >= 1 for d in self.dims) and self.dims, "positive integers"),
                  ("vocabs", all(v >= 1 for v in self.vocabs) and self.vocabs,
                   "positive integers"),
                  ("batch", self.batch >= 1, "a positive integer"),
                  ("gpus", self.gpus >= 1, "a positive integer"),
                  ("ids_per_feature", self.ids_per_feature >= 1, "a positive integer"),
                  ("memory_gb", self.memory_gb > 0, "positive"),
                  ("optimizer", self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
                  ("weights_dtype", self.weights_dtype in WEIGHT_DTYPES,
                   f"one of {tuple(WEIGHT_DTYPES)}"))
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def w(self) -> int:
        return WEIGHT_DTYPES[self.weights_dtype]

    @property
    def columns(self) -> int:
        """C = F * sum_m D_m: the pooled output columns of one sample."""
        return len(self.vocabs) * sum(self.dims)

    @property
    def local_batch(self) -> float:
        """B_local = B / N (a mean when N does not divide B)."""
        return self.batch / self.gpus


def state_bytes(rows: int, dim: int, optimizer: str, w: int) -> int:
    """The optimizer's bytes for a table piece of ``rows x dim``: SGD 0, row-wise Adagrad one
    fp32 per row, Adam two fp32 moments per element and the dense gradient (``w`` bytes)."""
    if optimizer == "sgd":
        return 0
    if optimizer == "rowwise_adagrad":
        return STATE_BYTES * rows
    return rows * dim * (2 * STATE_BYTES + w)


@dataclass(frozen=True)
class _Piece:
    feature: int
    rows: int
    dim: int


@dataclass
class _Rank:
    weight: int = 0
    state: int = 0
    columns: int = 0  # sum of the pieces' widths: the output columns it computes per sample
    pieces: int = 0
    elements: int = 0
    features: set[int] = field(default_factory=set)


def _pieces(work: Workload, scheme: str) -> list[_Piece]:
    """Table-wise: every (set, feature) table whole; column-wise: cut into pieces of at most
    COLUMN_WIDTH columns (at most N of them)."""
    out = []
    for d in work.dims:
        cuts = 1 if scheme == "table-wise" else min(work.gpus, math.ceil(d / COLUMN_WIDTH))
        widths = [d // cuts + (i < d % cuts) for i in range(cuts)]
        out += [_Piece(f, v, wd) for f, v in enumerate(work.vocabs) for wd in widths]
    return out


def _place(work: Workload, pieces: Sequence[_Piece]) -> list[_Rank]:
    """Greedy placement (largest piece first, onto the GPU holding the fewest bytes so far;
    ties: the lowest rank), the usual heuristic for table-wise sharding."""
    ranks = [_Rank() for _ in range(work.gpus)]
    heap = [(0, r) for r in range(work.gpus)]
    size = {p: p.rows * p.dim * work.w + state_bytes(p.rows, p.dim, work.optimizer, work.w)
            for p in set(pieces)}
    for p in sorted(pieces, key=lambda p: (-size[p], p.feature, -p.dim)):
        load, r = heapq.heappop(heap)
        rank = ranks[r]
        rank.weight += p.rows * p.dim * work.w
        rank.state += state_bytes(p.rows, p.dim, work.optimizer, work.w)
        rank.columns += p.dim
        rank.pieces += 1
        rank.elements += p.rows * p.dim
        rank.features.add(p.feature)
        heapq.heappush(heap, (load + size[p], r))
    return ranks


def all_to_all_seconds(nbytes: float, gpus: int, net: Network) -> float:
    """An all-to-all moving ``nbytes`` out of each GPU, spread evenly over the other ranks:
    the share ``(G - 1) / (N - 1)`` to the node's own GPUs goes over NVLink, the rest over
    the inter-node link, both at once (the slower one sets the time)."""
    if gpus == 1 or nbytes == 0:
        return 0.0
    g = min(gpus, net.gpus_per_node)
    intra = nbytes * (g - 1) / (gpus - 1)
    return max(intra / (net.nvlink_gbs * GB), (nbytes - intra) / (net.link_gbs * GB))


def collective_seconds(nbytes: float, gpus: int, net: Network) -> float:
    """A ring collective (reduce-scatter, all-gather, all-reduce) moving ``nbytes`` per GPU:
    NVLink speed inside one node, the inter-node link's speed once the ring spans nodes."""
    if gpus == 1 or nbytes == 0:
        return 0.0
    gbs = net.nvlink_gbs if gpus <= net.gpus_per_node else net.link_gbs
    return nbytes / (gbs * GB)


@dataclass(frozen=True)
class Cost:
    """One scheme's numbers for the busiest GPU of one step."""

    scheme: str
    weight_bytes: int
    state_bytes: int
    pieces: int  # table pieces on the busiest GPU (one fused launch covers them all)
    comm_bytes: float  # forward + backward, summed over the collectives
    compute_s: float
    comm_s: float
    fits: bool

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

    @property
    def step_s(self) -> float:
        """Compute plus communication, no overlap assumed (an upper bound)."""
        return self.compute_s + self.comm_s


def _compute_seconds(work: Workload, fwd_samples_cols: float, bwd_samples_cols: float,
                     partial_cols: float = 0.0, elements: int = 0) -> float:
    """Kernel time from the bytes of the accounting above: ``samples x columns`` looked up in
    the forward (``fwd_samples_cols``) and updated in the backward; ``partial_cols`` output
    cells written (forward) and read (backward) beyond one per lookup (row-wise's partial
    sums); Adam's full pass over ``elements`` (gradient read and zeroed, weights and moments
    read and written) at the copy rate."""
    h, w, rates = work.ids_per_feature, work.w, work.device
    fwd = fwd_samples_cols * (h * w + OUT_BYTES) + partial_cols * OUT_BYTES
    bwd = bwd_samples_cols * (OUT_BYTES + 2 * h * w) + partial_cols * OUT_BYTES
    full = elements * (4 * w + 4 * STATE_BYTES) if work.optimizer == "adam" else 0
    return (fwd / (rates.forward_gbs * GB) + bwd / (rates.backward_gbs[work.optimizer] * GB)
            + full / (rates.copy_gbs * GB))


def scheme_cost(work: Workload, scheme: str) -> Cost:
    """The busiest GPU's memory, communication and embedding step time under ``scheme``
    (formulas: docs/SCALING.md, section "The formulas")."""
    n, b, bl, c = work.gpus, work.batch, work.local_batch, work.columns
    h, net, out = work.ids_per_feature, work.network, (work.gpus - 1) / work.gpus
    nf = len(work.vocabs)
    if scheme in ("table-wise", "column-wise"):
        ranks = _place(work, _pieces(work, scheme))
        top = max(ranks, key=lambda r: (r.weight + r.state, r.columns))
        owners = [sum(f in r.features for r in ranks) for f in range(nf)]
        # ids: each GPU sends its rows' ids of feature f to the c_f GPUs holding a piece of
        # f's tables; an owner receives the whole batch's ids of its features
        ids = max(bl * h * ID_BYTES * sum(owners) * out,
                  max(b * h * ID_BYTES * len(r.features) * out for r in ranks))
        # pooled outputs: the owner sends its columns of the whole batch, every GPU receives
        # all C columns of its local rows; the gradients go back the same way
        pooled = max(bl * c * OUT_BYTES * out, max(b * r.columns * OUT_BYTES * out
                                                   for r in ranks))
        comm = ids + 2 * pooled
        comm_s = all_to_all_seconds(ids, n, net) + 2 * all_to_all_seconds(pooled, n, net)
        busiest = max(r.columns for r in ranks)
        compute = _compute_seconds(work, b * busiest, b * busiest,
                                   elements=max(r.elements for r in ranks))
        weight, state, pieces = top.weight, top.state, max(r.pieces for r in ranks)
    elif scheme == "row-wise":
        rows = [math.ceil(v / n) for v in work.vocabs]
        weight = sum(r * d * work.w for d in work.dims for r in rows)
        state = sum(state_bytes(r, d, work.optimizer, work.w) for d in work.dims for r in rows)
        pieces = len(work.dims) * nf
        # ids go to the one GPU holding their row (every set of a feature has the same rows);
        # forward: a reduce-scatter of every GPU's partial pooled sums [B, C]; backward: an
        # all-gather of the output gradients [B, C]
        ids = bl * nf * h * ID_BYTES * out
        partial = b * c * OUT_BYTES * out
        comm = ids + 2 * partial
        comm_s = all_to_all_seconds(ids, n, net) + 2 * collective_seconds(partial, n, net)
        compute = _compute_seconds(work, b * c / n, b * c / n, partial_cols=b * c * (1 - 1 / n),
                                   elements=sum(rows) * sum(work.dims))
    elif scheme == "data-parallel":
        weight = sum(v * d * work.w for d in work.dims for v in work.vocabs)
        state = sum(state_bytes(v, d, work.optimizer, work.w)
                    for d in work.dims for v in work.vocabs)
        pieces = len(work.dims) * nf
        if work.optimizer == "adam":  # DDP all-reduces the dense gradient of every table
            comm = 2 * out * sum(work.vocabs) * sum(work.dims) * work.w
            compute = _compute_seconds(work, bl * c, bl * c,
                                       elements=sum(work.vocabs) * sum(work.dims))
        else:
            # the cheaper of (a) the library's fused update: all-gather the ids and output
            # gradients, every GPU applies the whole global batch's update, and (b) an
            # all-reduce of the touched rows' gradients, every GPU updating those rows
            gather, reduce = library_gather_bytes(work), touched_rows_bytes(work)
            if gather <= reduce:
                comm, compute = gather, _compute_seconds(work, bl * c, b * c)
            else:
                touched = sum(_touched(work, v) * d for d in work.dims for v in work.vocabs)
                comm = reduce
                compute = _compute_seconds(work, bl * c, bl * c) + touched * (
                    OUT_BYTES + 2 * work.w) / (work.device.backward_gbs[work.optimizer] * GB)
        comm_s = collective_seconds(comm, n, net)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    fits = weight + state <= work.memory_gb * GB
    return Cost(scheme, weight, state, pieces, comm, compute, comm_s, fits)


def _touched(work: Workload, vocab: int) -> int:
    """U_f: the most rows of a table one global batch can touch."""
    return min(work.batch * work.ids_per_feature, vocab)


def library_gather_bytes(work: Workload) -> float:
    """Per GPU, the library's data-parallel backward: an all-gather of every rank's ids and
    output gradients, ``B * (C * 4 + F * H * 8) * (N - 1) / N``."""
    return work.batch * (work.columns * OUT_BYTES + len(work.vocabs) * work.ids_per_feature
                         * ID_BYTES) * (work.gpus - 1) / work.gpus


def touched_rows_bytes(work: Workload) -> float:
    """Per GPU, a data-parallel step that all-reduces the gradients of the touched rows (ring:
    ``2 (N - 1) / N`` times the buffer): per table the smaller of ``B * H`` rows with their ids
    (``D * 4 + 8`` bytes each) and the whole table's gradient (``V_f * D * 4``)."""
    out = (work.gpus - 1) / work.gpus
    return 2 * out * sum(min(work.batch * work.ids_per_feature * (d * OUT_BYTES + ID_BYTES),
                             v * d * OUT_BYTES) for d in work.dims for v in work.vocabs)


def recommend(costs: Sequence[Cost], work: Workload) -> tuple[str | None, str]:
    """The fastest scheme that fits (ties: the simplest, SCHEMES order), and why."""
    fitting = [c for c in costs if c.fits]
    budget = f"{work.memory_gb:g} GB"
    if not fitting:
        least = min(costs, key=lambda c: c.total_bytes)
        return None, (f"nothing fits in {budget} per GPU: {least.scheme} needs "
                      f"{least.total_bytes / GB:.3g} GB; use more GPUs, fp16 weights, SGD or "
                      f"smaller tables")
    best = min(fitting, key=lambda c: (round(c.step_s, 12), SCHEMES.index(c.scheme)))
    left = [c.scheme for c in costs if not c.fits]
    why = f"fastest that fits ({best.step_s * 1e3:.3g} ms"
    others = sorted((c for c in fitting if c is not best), key=lambda c: c.step_s)
    if others:
        why += f"; next {others[0].scheme} {others[0].step_s * 1e3:.3g} ms"
    why += ")"
    if left:
        why += f"; {', '.join(left)} exceed {budget} per GPU"
    return best.scheme, why


@dataclass(frozen=True)
class Plan:
    work: Workload
    costs: tuple[Cost, ...]
    choice: str | None
    reason: str


def plan(work: Workload) -> Plan:
    """Every scheme's cost for ``work`` and the recommendation."""
    costs = tuple(scheme_cost(work, s) for s in SCHEMES)
    choice, reason = recommend(costs, work)
    return Plan(work, costs, choice, reason)


def _gb(x: float) -> str:
    return f"{x / GB:.3g}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}"


HEADER = ("| GPUs | sharding | weights GB | optimizer GB | total GB | fits | pieces | "
          "comm GB/step | kernels ms | comm ms | step ms |\n"
          "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")


def render_plan(works: Iterable[Workload]) -> str:
    """A Markdown table (per GPU, per step) of every scheme for each workload, with a
    recommendation line per workload under it."""
    lines, notes = [HEADER], []
    for work in works:
        p = plan(work)
        for c in p.costs:
            mark = " **←**" if c.scheme == p.choice else ""
            lines.append(f"| {work.gpus} | {c.scheme}{mark} | {_gb(c.weight_bytes)} | "
                         f"{_gb(c.state_bytes)} | {_gb(c.total_bytes)} | "
                         f"{'yes' if c.fits else 'no'} | {c.pieces} | {_gb(c.comm_bytes)} | "
                         f"{_ms(c.compute_s)} | {_ms(c.comm_s)} | {_ms(c.step_s)} |")
        notes.append(f"- {work.gpus} GPUs: **{p.choice or 'none'}**: {p.reason}")
    return "\n".join(lines + [""] + notes)


def describe(work: Workload) -> str:
    """One line of the workload and the assumptions (the header ``cetnet plan`` prints)."""
    net = work.network
    vocab = (f"{work.vocabs[0]:,}" if len(set(work.vocabs)) == 1
             else f"{min(work.vocabs):,}-{max(work.vocabs):,}")
    dims = ",".join(map(str, work.dims)) if len(set(work.dims)) > 1 else str(work.dims[0])
    return (f"M = {len(work.dims)} embedding sets x F = {len(work.vocabs)} features, rows "
            f"{vocab} per table, D = {dims}, {work.weights_dtype} weights, {work.optimizer}, "
            f"global batch {work.batch:,}, {work.ids_per_feature} id(s) per feature; kernels at "
            f"{work.device.name} rates, NVLink {net.nvlink_gbs:g} GB/s and {net.link_gbit:g} "
            f"Gb/s between nodes per GPU, {net.gpus_per_node} GPUs per node, {work.memory_gb:g} "
            f"GB per GPU for the tables")


# --- cetnet plan ---------------------------------------------------------------------------------


def parse_counts(flag: str, text: str) -> tuple[int, ...]:
    """``"1e9"`` / ``"1000000,500"`` as positive integers (``1e9``, ``10**9`` and ``2^20``
    allowed); ConfigError naming ``flag`` otherwise."""
    out = []
    for item in str(text).split(","):
        item = item.strip().replace("_", "")
        try:
            if "**" in item or "^" in item:
                base, _, exp = item.replace("**", "^").partition("^")
                if not 0 <= int(exp) <= 63:
                    raise ValueError
                value = int(base) ** int(exp)
            else:
                number = float(item)
                value = int(number)
                if value != number:
                    raise ValueError
        except (ValueError, OverflowError):
            raise ConfigError(f"{flag}: expected positive integers separated by commas, got "
                              f"{text!r}") from None
        if not 1 <= value <= 2 ** 63:
            raise ConfigError(f"{flag}: expected positive integers up to 2^63, got {item!r}")
        out.append(value)
    return tuple(out)


class ConfigFields(TypedDict):
    """What :func:`config_fields` reads from a train config."""

    dims: tuple[int, ...]
    optimizer: str
    batch: int


def _repeat(values: tuple[int, ...], count: int | None, flag: str, count_flag: str,
            what: str) -> tuple[int, ...]:
    """One value for all ``count`` items, or one per item (``--vocab`` per ``--features``,
    ``--dim`` per ``--members``); ConfigError naming the flags otherwise."""
    if count is None:
        return values
    if count < 1:
        raise ConfigError(f"{count_flag}: expected a positive integer, got {count}")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConfigError(f"{flag} has {len(values)} values for {count_flag} {count}: give one "
                          f"value, or one per {what}")
    return values


def config_fields(path: str | Path) -> ConfigFields:
    """What ``cetnet plan --config`` takes from a ``cetnet train`` config: the embedding sets
    and their dims (``model.members`` / ``multi_embedding.num_sets``, ``embedding_dim``, one
    set when ``shared_embedding``), the optimizer (null: Adam on the dense gradient) and the
    global batch (``train.batch_size``). The features and their rows come from the flags."""
    config = load_config(path)
    model, train = config["model"], config["train"]
    dims = model.get("embedding_dim", 16)
    if model.get("ensemble") == "multi_embedding":
        count = (model.get("multi_embedding") or {}).get(
            "num_sets", 2 if isinstance(dims, int) else len(dims))
    else:
        members = model.get("members", [None, None])  # build_model's default: two members
        members = [members] if isinstance(members, str) else members  # an ensemble of one
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{path}: model.members must be a non-empty list, got "
                              f"{members!r}")
        count = len(members)
    if model.get("shared_embedding"):
        count, dims = 1, dims if isinstance(dims, int) else dims[:1]
    if not isinstance(dims, int) and len(dims) != count:
        raise ConfigError(f"{path}: model.embedding_dim has {len(dims)} values for {count} "
                          f"embedding sets (one per member)")
    dims = (dims,) * count if isinstance(dims, int) else tuple(dims)
    optimizer = model.get("embedding_optimizer", "rowwise_adagrad") or "adam"
    return {"dims": tuple(dims), "optimizer": str(optimizer),
            "batch": int(train["batch_size"])}


#: Bounds of the flags whose work grows with them (tables are placed GPU by GPU, feature by
#: feature): far above any cluster or model, far below what would take minutes here.
MAX_GPUS = 100_000
MAX_FEATURES = 100_000
MAX_MEMBERS = 1_000

#: The flag that sets each Workload field (for the error messages).
FLAGS = {"dims": "--dim", "vocabs": "--vocab", "batch": "--batch", "gpus": "--gpus",
         "optimizer": "--optimizer", "weights_dtype": "--weights-dtype",
         "ids_per_feature": "--ids-per-feature", "memory_gb": "--memory-gb"}


def workloads_from_flags(members: int | None, features: int | None, vocab: str | None,
                         dim: str | None, batch: int | None, gpus: str, *,
                         optimizer: str | None = None, weights_dtype: str = "fp32",
                         ids_per_feature: int = 1, memory_gb: float = 100.0,
                         device: str = "h200", gpus_per_node: int = 8,
                         nvlink_gbytes: float = 450.0, link_gbps: float = 400.0,
                         config: str | Path | None = None) -> list[Workload]:
    """The workloads of ``cetnet plan``'s flags (one per value of ``--gpus``); a flag given
    wins over ``--config``. ConfigError naming the flag on bad input."""
    base: ConfigFields | None = config_fields(config) if config is not None else None
    if vocab is None:
        raise ConfigError("--vocab is required (rows per table: one value, or one per feature)")
    vocabs = _repeat(parse_counts("--vocab", vocab), features, "--vocab", "--features",
                     "feature")
    if dim is not None:
        dims = parse_counts("--dim", dim)
        if members is None and base is not None and len(dims) == 1:
            members = len(base["dims"])  # one --dim for each of the config's members
    elif base is not None:
        dims = base["dims"]
    else:
        raise ConfigError("--dim is required without --config")
    dims = _repeat(dims, members, "--dim", "--members", "member")
    if batch is None:
        if base is None:
            raise ConfigError("--batch is required without --config")
        batch = base["batch"]
    if device not in DEVICES:
        raise ConfigError(f"--device: choose from {tuple(DEVICES)}, got {device!r}")
    for flag, value in (("--gpus-per-node", gpus_per_node), ("--nvlink-gbytes", nvlink_gbytes),
                        ("--link-gbps", link_gbps)):
        if not value > 0:
            raise ConfigError(f"{flag}: expected a positive number, got {value}")
    net = Network(int(gpus_per_node), float(nvlink_gbytes), float(link_gbps))
    if features is not None and features > MAX_FEATURES:
        raise ConfigError(f"--features: at most {MAX_FEATURES:,} (one table per feature is "
                          f"planned), got {features:,}")
    if members is not None and members > MAX_MEMBERS:
        raise ConfigError(f"--members: at most {MAX_MEMBERS:,}, got {members:,}")
    works = []
    for n in parse_counts("--gpus", gpus):
        if n > MAX_GPUS:
            raise ConfigError(f"--gpus: at most {MAX_GPUS:,} (the tables are placed GPU by "
                              f"GPU), got {n:,}")
        try:
            works.append(Workload(
                dims=dims, vocabs=vocabs, batch=batch, gpus=n,
                optimizer=optimizer or (base["optimizer"] if base else "rowwise_adagrad"),
                weights_dtype=weights_dtype, ids_per_feature=ids_per_feature,
                memory_gb=memory_gb, device=DEVICES[device], network=net))
        except ValueError as e:
            field_name = str(e).split()[0]
            raise ConfigError(f"{FLAGS.get(field_name, field_name)}: {e}") from None
    return works


def plan_text(works: Sequence[Workload]) -> str:
    """What ``cetnet plan`` prints: the assumptions, the table, the recommendations."""
    return (f"{describe(works[0])}\n\n{render_plan(works)}\n\nper GPU, per training step of "
            f"the embedding part: kernels at measured rates plus communication, no overlap "
            f"(docs/SCALING.md)")


# --- the tables of docs/SCALING.md ---------------------------------------------------------------

def _scenarios() -> dict[str, list[Workload]]:
    gpus = (8, 128, 1024)
    base = {
        "small": Workload(dims=(64,) * 4, vocabs=(10 ** 7,) * 26, batch=65536, gpus=8),
        "huge": Workload(dims=(64,) * 4, vocabs=(10 ** 9,) * 26, batch=65536, gpus=8),
        "wide": Workload(dims=(256,) * 2, vocabs=(10 ** 8,) * 8, batch=65536, gpus=8),
        "many": Workload(dims=(16,) * 4, vocabs=(10 ** 3,) * 500, batch=65536, gpus=8),
    }
    return {k: [replace(w, gpus=n) for n in gpus] for k, w in base.items()}


def _memory_block() -> str:
    lines = ["| D | weights | GB per 1e9-row table | + row-wise Adagrad | + Adam (dense) |",
             "|---:|---|---:|---:|---:|"]
    for d in (16, 64, 256):
        for dt, w in WEIGHT_DTYPES.items():
            weights = 10 ** 9 * d * w
            lines.append(f"| {d} | {dt} | {_gb(weights)} | "
                         f"{_gb(weights + state_bytes(10 ** 9, d, 'rowwise_adagrad', w))} | "
                         f"{_gb(weights + state_bytes(10 ** 9, d, 'adam', w))} |")
    return "\n".join(lines)


def _ensemble_block() -> str:
    n, vocabs, batch = 128, (10 ** 8,) * 26, 65536
    rows = [("4 members, separate tables, D = 64", (64,) * 4),
            ("1 model, D = 256", (256,)),
            ("1 model, D = 64 (4x wider MLPs: same tables)", (64,)),
            ("4 members sharing one set, D = 64", (64,))]
    lines = ["| model | tables GB (all GPUs) | table-wise GB/GPU | table-wise comm GB/step | "
             "chosen | its GB/GPU | its step ms |", "|---|---:|---:|---:|---|---:|---:|"]
    for name, dims in rows:
        p = plan(Workload(dims=dims, vocabs=vocabs, batch=batch, gpus=n))
        costs = {c.scheme: c for c in p.costs}
        tw, best = costs["table-wise"], costs.get(p.choice or "", None)
        lines.append(f"| {name} | {_gb(costs['data-parallel'].total_bytes)} | "
                     f"{_gb(tw.total_bytes)} | {_gb(tw.comm_bytes)} | {p.choice or 'none'} | "
                     f"{_gb(best.total_bytes) if best else '-'} | "
                     f"{_ms(best.step_s) if best else '-'} |")
    return "\n".join(lines)


def _touched_block() -> str:
    lines = ["| workload | GPUs | library all-gather GB | touched-row all-reduce GB | "
             "full-table all-reduce GB |", "|---|---:|---:|---:|---:|"]
    for key, works in _scenarios().items():
        for work in works:
            lib = library_gather_bytes(work)
            full = scheme_cost(replace(work, optimizer="adam"), "data-parallel").comm_bytes
            lines.append(f"| {key} | {work.gpus} | {_gb(lib)} | {_gb(touched_rows_bytes(work))} "
                         f"| {_gb(full)} |")
    return "\n".join(lines)


def doc_blocks() -> dict[str, str]:
    """The generated blocks of docs/SCALING.md, by name."""
    blocks = {"memory": _memory_block(), "ensemble": _ensemble_block(),
              "data-parallel": _touched_block()}
    for key, works in _scenarios().items():
        blocks[key] = describe(works[0]) + "\n\n" + render_plan(works)
    return blocks


def _marker(name: str, end: bool = False) -> str:
    return f"<!-- plan:{name}{':end' if end else ''} -->"


def write_doc(path: str | Path, check: bool = False) -> list[str]:
    """Rewrites the generated blocks of ``path`` (between ``<!-- plan:NAME -->`` and
    ``<!-- plan:NAME:end -->``); with ``check``, writes nothing. Returns the stale blocks'
    names."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stale = []
    for name, block in doc_blocks().items():
        start, end = _marker(name), _marker(name, True)
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f"{path}: no {start} ... {end} block")
        new = f"{start}\n{block}\n{end}"
        if text[i:j + len(end)] != new:
            stale.append(name)
            text = text[:i] + new + text[j + len(end):]
    if stale and not check:
        path.write_text(text, encoding="utf-8")
    return stale


if __name__ == "__main__":  # python -m cetnet.plan docs/SCALING.md [--check]
    changed = write_doc(sys.argv[1], check="--check" in sys.argv[2:])
    print(f"{'stale' if '--check' in sys.argv[2:] else 'rewrote'}: {', '.join(changed) or 'none'}")
    sys.exit(1 if changed and "--check" in sys.argv[2:] else 0)
