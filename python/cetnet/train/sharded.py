"""Sharded member tables: TorchRec's ``DistributedModelParallel`` around an ensemble whose
front is a :class:`~cetnet.models.torchrec_front.TorchRecEmbeddingFront`
(``embedding: torchrec``, docs/DISTRIBUTED.md).

:func:`shard` hands the model to TorchRec's planner, which places every table of every member
table-wise, row-wise or column-wise over the ranks (``train.embedding_sharding`` narrows the
choice) with FBGEMM's fused kernel (the config's embedding optimizer applied in backward);
DMP wraps the dense rest (members, fusion) in DistributedDataParallel. One process without
torchrun gets a process group of its own with one rank, so a run trains with the same kernels
and optimizer whatever its world size.

Checkpoints of sharded tables are ``torch.distributed.checkpoint`` (DCP) folders: every rank
writes its shards, so no rank ever holds another's rows. :func:`save_tables` writes one under
a temporary name and renames it once complete; the ``last.pt`` / ``best.pt`` that names it is
written after, so a step is saved entirely or not visible. :func:`load_tables` reads one back
into sharded tables (every rank its shards) or, in one process, into the unsharded tables
(evaluation and export of a finished run).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import torch
from torch import nn

from cetnet import distributed
from cetnet.config import EMBEDDING_SHARDINGS, ConfigError
from cetnet.train.checkpoint import DCP_METADATA, CheckpointError
from cetnet.train.rundir import RUN_FOLDER

if TYPE_CHECKING:
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront

# cetnet.models (hence cetnet_kernels) is imported inside the functions: the CLI imports the
# trainer before it loads the kernels (which may refuse $CETNET_CPU_CAPABILITY in one line)

__all__ = ["SHARDINGS", "TABLES_DIR", "use_torchrec", "is_torchrec", "check_sharding", "shard",
           "ShardedRun", "save_tables", "load_tables", "check_tables", "prune_tables",
           "dense_state", "check_model_checkpoint", "load_model_state", "copy_into_shards", "gather_tables"]

#: ``train.embedding_sharding``: ``auto`` lets the planner choose per table among the three.
SHARDINGS = EMBEDDING_SHARDINGS
#: Where a run directory keeps its DCP folders of tables (``tables/last-e3-<token>``,
#: ``tables/best-e2-<token>``: a token per write, see :func:`save_tables`).
TABLES_DIR = RUN_FOLDER
_METADATA = DCP_METADATA


def is_torchrec(model: nn.Module) -> bool:
    """Whether ``model``'s front is a TorchRec one."""
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront

    return isinstance(getattr(model, "front", None), TorchRecEmbeddingFront)


def _front(model: nn.Module) -> TorchRecEmbeddingFront:
    """``model.front``, a TorchRecEmbeddingFront (TypeError otherwise)."""
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront

    front = getattr(model, "front", None)
    if not isinstance(front, TorchRecEmbeddingFront):
        raise TypeError(f"{type(model).__name__}.front is {type(front).__name__}, not a "
                        f"TorchRecEmbeddingFront (see use_torchrec)")
    return front


def use_torchrec(model: nn.Module) -> nn.Module:
    """Replaces ``model.front`` (a fused :class:`~cetnet.models.front.EmbeddingFront`) by a
    :class:`TorchRecEmbeddingFront` with the same features, dims and optimizer; returns
    ``model``. ConfigError when TorchRec is missing or the model has no such front."""
    from cetnet.models.front import EmbeddingFront
    from cetnet.models.torchrec_front import TorchRecEmbeddingFront, torchrec_available

    missing = torchrec_available()
    if missing:
        raise ConfigError(f"config: {missing}")
    front = getattr(model, "front", None)
    if not isinstance(front, EmbeddingFront):
        raise ConfigError(f"config: embedding: torchrec needs an ensemble built on "
                          f"cetnet.models.EmbeddingFront; {type(model).__name__} has "
                          f"{type(front).__name__}")
    if front.embedding.bounds_check != "error":
        raise ConfigError("config: model.embedding_bounds_check applies to the fused embedding "
                          "(embedding: cetnet); TorchRec's tables check ids their own way, "
                          f"remove it (got {front.embedding.bounds_check!r})")
    device = next((t.device for t in front.parameters()), None)
    try:
        model.front = TorchRecEmbeddingFront.from_front(front, device=device)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    return model


def _fused_params(front: Any) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kind = {"sgd": EmbOptimType.EXACT_SGD,
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[front.optimizer]
    # eps as the fused front's row-wise Adagrad (s += mean(g^2); w -= lr g / (sqrt(s) + eps))
    return {"optimizer": kind, "learning_rate": front.lr, "eps": 1e-8}


def _constraints(front: Any, sharding: str, sharders: list[Any],
                 compute: str) -> dict[str, Any]:
    """The planner's choices per table: the shardings ``sharding`` allows that TorchRec's
    sharder of the table's collection offers on ``compute`` (on a CPU the pooled collection
    has no row-wise sharding), always with the fused kernel: the tables' optimizer runs in
    backward, never a dense gradient of a whole table or a data-parallel replica."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner.types import ParameterConstraints

    wanted = ["table_wise", "row_wise", "column_wise"] if sharding == "auto" else [sharding]
    out = {}
    pooled_sharder, sequence_sharder = sharders
    modules = [(front.tables, pooled_sharder)] if front.tables is not None else []
    modules += [(m, sequence_sharder) for m in front.sequence_tables.values()]
    for module, sharder in modules:
        offered = sharder.sharding_types(compute)
        types = [t for t in wanted if t in offered]
        what = "pooled (sparse, multihot)" if module is front.tables else "sequence"
        if not types:
            raise ConfigError(
                f"config: train.embedding_sharding={sharding}: TorchRec does not shard "
                f"{what} tables {sharding} on {compute} (it offers "
                f"{', '.join(t for t in offered if t in ('table_wise', 'row_wise', 'column_wise'))})")
        configs = module.embedding_bag_configs() if module is front.tables else \
            module.embedding_configs()
        for c in configs:
            out[c.name] = ParameterConstraints(
                sharding_types=types, compute_kernels=[EmbeddingComputeKernel.FUSED.value],
                min_partition=_whole_rows(front, c.embedding_dim))
    return out


def _whole_rows(front: Any, dim: int) -> int | None:
    """The narrowest column-wise shard the planner may cut a table of width ``dim`` into:
    row-wise Adagrad's one accumulator per row is the mean of g^2 over the row's ``dim``
    columns, and FBGEMM keeps it per shard, so its tables are cut in whole rows only (TorchRec
    cuts a table wider than 128 into 128-wide blocks otherwise: one accumulator per block, a
    result that depends on the plan, and optimizer state of another shape on another world
    size). SGD's update is per element: any cut."""
    return dim if front.optimizer == "rowwise_adagrad" else None


class ShardedRun:
    """A model under DMP: ``run(batch) -> (loss, output)`` trains a step (the tables' rows are
    updated in backward), ``run.model`` is the ensemble (its front's modules now sharded: its
    ``forward`` predicts, a collective on every rank), ``run.plan`` the sharding chosen.

    Attributes:
        group: the process group the tables are sharded over (a private one-rank group in a
            single process).
    """

    def __init__(self, dmp: nn.Module, model: nn.Module, group: Any, plan: Any,
                 own_group: bool) -> None:
        self.dmp, self.model, self.group, self.plan = dmp, model, group, plan
        self.own_group = own_group

    def __call__(self, batch: Any) -> Any:
        return self.dmp(batch)

    @property
    def fused_optimizer(self) -> Any:
        return self.dmp.fused_optimizer

    def describe(self) -> dict[str, dict[str, Any]]:
        """Table -> ``{"sharding": ..., "ranks": [...]}``: the plan, for ``metrics.json``."""
        return {table: {"sharding": str(ps.sharding_type), "ranks": list(ps.ranks or [])}
                for module_plan in self.plan.plan.values()
                for table, ps in module_plan.items()}

    def close(self) -> None:
        """Drops the private one-rank process group. The model's front is first replaced by
        an unsharded TorchRec front holding the trained tables, so the model stays usable in
        this process (with a group of several ranks the model stays sharded: the group is
        the caller's)."""
        if self.own_group:
            import torch.distributed as dist

            from cetnet.models.torchrec_front import TorchRecEmbeddingFront

            try:
                front = _front(self.model)
                tables = gather_tables(self.model)
                plain = TorchRecEmbeddingFront(
                    front.fields, front.sequences, front.n_dense, front.dims,
                    front.num_members, shared=front.shared, optimizer=front.optimizer,
                    lr=front.lr, device=next(iter(tables.values())).device if tables else None)
                plain.load_state_dict(tables)
                self.model.front = plain
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
                self.own_group = False


def _sharders_and_constraints(front: Any, device: torch.device, sharding: str
                              ) -> tuple[list[Any], str, dict[str, Any]]:
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    if sharding not in SHARDINGS:
        raise ConfigError(f"config: train.embedding_sharding must be one of {SHARDINGS}, got "
                          f"{sharding!r}")
    fused = _fused_params(front)
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused),
                EmbeddingCollectionSharder(fused_params=fused)]
    compute = "cuda" if device.type == "cuda" else "cpu"
    return sharders, compute, _constraints(front, sharding, sharders, compute)


def check_sharding(model: nn.Module, device: torch.device, sharding: str = "auto") -> None:
    """What :func:`shard` checks before any process group or collective: ConfigError when
    ``sharding`` is none of :data:`SHARDINGS` or TorchRec does not offer it for one of the
    model's tables on ``device`` (``cetnet train --dry-run`` says so, as the run would)."""
    _sharders_and_constraints(_front(model), device, sharding)


def shard(model: nn.Module, device: torch.device, sharding: str = "auto") -> ShardedRun:
    """``model`` (with a :class:`TorchRecEmbeddingFront`) under DistributedModelParallel over
    the default process group, or over a one-rank group of its own when there is none.
    A collective: every rank calls it with the same model config."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    from cetnet.train.loop import _LossOf  # what DDP wraps too (imported here: loop imports us)

    front = _front(model)
    sharders, compute, constraints = _sharders_and_constraints(front, device, sharding)
    own = not dist.is_initialized()
    if own:  # a process group of one rank, in memory: DMP and the planner need one
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        world = dist.get_world_size()
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device=compute,
                              local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world))),
            constraints=constraints)
        wrapper = _LossOf(model)
        # DMP initializes the fused shards afresh: keep the tables as built (the seed's)
        initial = {k: v.detach().clone() for k, v in front.state_dict().items()} \
            if not any(t.is_meta for t in front.parameters()) else None
        plan = planner.collective_plan(wrapper, sharders, group)
        dmp = DistributedModelParallel(wrapper, env=ShardingEnv.from_process_group(group),
                                       device=device, plan=plan, sharders=sharders)
        if initial is not None:
            copy_into_shards(_front(model).state_dict(), initial)
    except BaseException:
        if own:
            dist.destroy_process_group()
        raise
    return ShardedRun(dmp, model, group, plan, own)


def _local_shards(value: Any, name: str) -> list[tuple[torch.Tensor, tuple[slice, ...]]]:
    """``(local tensor, the slice of the full table it holds)`` of a sharded table."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [(s.tensor, tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets,
                                                                  s.metadata.shard_sizes)))
                for s in value.local_shards()]
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:  # replicated
        return [(value, tuple(slice(0, n) for n in value.shape))]
    raise TypeError(f"{name}: a {type(value).__name__}, not a ShardedTensor or a tensor")


@torch.no_grad()
def copy_into_shards(sharded_state: dict[str, Any], full: dict[str, torch.Tensor]) -> None:
    """Writes the full tables ``full`` (state-dict keys of the unsharded front) into this
    rank's shards of them."""
    for name, value in sharded_state.items():
        for local, where in _local_shards(value, name):
            local.copy_(full[name][where].to(local.device, local.dtype))


@torch.no_grad()
def gather_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the front's full tables (state-dict keys of the unsharded front), on the
    CPU, on every rank (for tests and small models: each rank holds every row)."""
    import torch.distributed as dist

    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for name, value in _front(model).state_dict().items():
        full = torch.zeros(value.size(), dtype=value.dtype)
        for local, where in _local_shards(value, name):
            full[where] = local.detach().cpu()
        if isinstance(value, ShardedTensor) and dist.is_initialized() \
                and dist.get_world_size() > 1:
            # shards do not overlap: a sum puts every row in place (a whole, replicated
            # tensor is already complete on every rank)
            dist.all_reduce(full)
        out[name] = full
    return out


def _table_state(model: nn.Module) -> dict[str, Any]:
    return {f"front.{k}": v for k, v in _front(model).state_dict().items()}


def dense_state(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` without the front's tables (what ``last.pt`` / ``best.pt`` hold
    of a TorchRec model; the tables are in its DCP folder)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("front.")}


def save_tables(run: ShardedRun, run_dir: Path, tag: str, *, optimizer: bool) -> str:
    """Collective: writes the tables (and, with ``optimizer``, their fused optimizer's state)
    to ``run_dir/tables/<tag>-<token>`` as a DCP folder, complete or absent (written under a
    temporary name, renamed by rank 0 once every rank's shards and the metadata are in).
    Returns the folder's name relative to ``run_dir``.

    The token (rank 0's, random) makes every write a folder of its own: an epoch trained again
    (a resume that fell back to ``last.prev.pt``) must not replace the folder a checkpoint of
    the first attempt still names, which would then pair that checkpoint's dense weights with
    the other attempt's tables."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tag = f"{tag}-{distributed.from_main(lambda: secrets.token_hex(4))}"
    final = Path(run_dir) / TABLES_DIR / tag
    tmp = final.with_name(f".{tag}.tmp")
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=run.group)
    state: dict[str, Any] = {"tables": _table_state(run.model)}
    if optimizer:
        state["optimizer"] = run.fused_optimizer.state_dict()
    try:
        dcp.save(state, checkpoint_id=str(tmp), process_group=run.group)
    except (RuntimeError, ValueError, OSError, CheckpointException) as e:
        if distributed.collective_failure(e):
            raise  # another rank died or timed out: the runner says so
        # e.g. a full disk: one line (an OSError, as when last.pt cannot be written), not
        # DCP's traceback of a BaseException; a later save or pruning removes the temporary folder
        raise OSError(f"{tmp}: cannot write the tables ({_dcp_failure_text(e)})") from None
    dist.barrier(group=run.group)
    if distributed.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier(group=run.group)
    return f"{TABLES_DIR}/{tag}"


def check_tables(run_dir: Path, ref: Any, path: Path) -> Path:
    """The DCP folder ``run_dir/ref`` a checkpoint names; CheckpointError naming ``path``
    when it is missing or incomplete."""
    if not isinstance(ref, str) or not ref.startswith(f"{TABLES_DIR}/") or ".." in ref:
        raise CheckpointError(f"{path}: names no tables folder (got {ref!r})")
    folder = Path(run_dir) / ref
    if not (folder / _METADATA).is_file():
        raise CheckpointError(f"{path}: its tables folder {folder} is missing or incomplete "
                              f"(no {_METADATA})")
    return folder


def load_tables(model: nn.Module, folder: Path, run: ShardedRun | None = None, *,
                optimizer: bool = False) -> None:
    """Reads the DCP folder ``folder`` into the model's tables: into the shards (every rank
    its own, a collective) when ``run`` is given, else into the unsharded tables of this one
    process. With ``optimizer``, the fused optimizer's state too (``run`` only).
    CheckpointError naming the folder when it does not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        state: dict[str, Any] = {"tables": _table_state(model)}
        if run is not None and optimizer:
            state["optimizer"] = run.fused_optimizer.state_dict()
        if run is None:
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
            _front(model).load_state_dict({k[len("front."):]: v
                                           for k, v in state["tables"].items()})
        else:
            dcp.load(state, checkpoint_id=str(folder), process_group=run.group)
            if optimizer:
                run.fused_optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as e:
        if distributed.collective_failure(e):
            raise  # another rank died or timed out: not the folder's fault
        text = _dcp_failure_text(e)
        hint = ""
        if optimizer and "Size mismatch" in text and "optimizer" in text:
            # written by a cetnet that cut row-wise Adagrad tables into column blocks (one
            # accumulator per block); the whole-row state cannot be made of it exactly
            hint = ("; its row-wise Adagrad state was saved per column block of a table (a "
                    "cetnet before 2026-11-30 cut tables wider than 128 so): the run cannot "
                    "continue, start it again (--overwrite); its best.pt still evaluates")
        raise CheckpointError(f"{folder}: cannot load the tables ({text}){hint}") from None


def _dcp_failure_text(e: BaseException) -> str:
    """The first line of a DCP failure: of the first rank's exception that DCP's
    CheckpointException (a BaseException) holds, else of ``e``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first_failure = next(iter(failures.values()))  # (exception, stack summary)
        if isinstance(first_failure, tuple):
            first_failure = first_failure[0]
        e_text = f"{type(first_failure).__name__}: {first_failure}"
    else:
        e_text = f"{type(e).__name__}: {e}"
    return (e_text.strip().splitlines() or [type(e).__name__])[0][:160]


def prune_tables(run_dir: Path, keep: set[str], keep_tags: Collection[str] = ()) -> None:
    """Removes the DCP folders of ``run_dir/tables`` not named in ``keep`` nor written for a
    tag of ``keep_tags`` (``last-e2``: ``tables/last-e2-<token>`` of any attempt, and the
    untokened ``tables/last-e2`` of runs written before tokens) (rank 0, after the checkpoints
    naming the kept ones are written)."""
    root = Path(run_dir) / TABLES_DIR
    if not root.is_dir():
        return
    for child in root.iterdir():
        tag = child.name.rsplit("-", 1)[0] if child.name.count("-") >= 2 else child.name
        if f"{TABLES_DIR}/{child.name}" not in keep and tag not in keep_tags:
            shutil.rmtree(child, ignore_errors=True)


def check_model_checkpoint(model: nn.Module, checkpoint: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` when ``checkpoint`` does not fit ``model`` (which may
    live on the meta device): its state dict, and for a TorchRec model the DCP folder of
    tables it names (present and complete)."""
    from cetnet.train.checkpoint import check_model_state

    path = Path(path)
    if not is_torchrec(model):
        if "tables" in checkpoint:
            raise CheckpointError(f"{path}: holds TorchRec tables (embedding: torchrec); the "
                                  f"config builds cetnet's fused embedding")
        check_model_state(checkpoint["model"], model, path)
        return
    check_tables(path.parent, checkpoint.get("tables"), path)
    check_model_state(checkpoint["model"], model, path, expected=dense_state(model))


def load_model_state(model: nn.Module, checkpoint: dict, path: str | Path,
                     run: ShardedRun | None = None, *, optimizer: bool = False) -> None:
    """Loads a checkpoint's ``model`` into ``model`` (checked first,
    :func:`check_model_checkpoint`): the whole state dict of a fused model; for a TorchRec
    model its dense state and then the tables from the DCP folder the checkpoint names (into
    ``run``'s shards when given: a collective; with ``optimizer`` their fused optimizer's
    state too)."""
    path = Path(path)
    check_model_checkpoint(model, checkpoint, path)
    if not is_torchrec(model):
        model.load_state_dict(checkpoint["model"])
        return
    # the tables' own (sharded) tensors stand in for them: TorchRec's load hooks want every
    # key; their values come from the DCP folder next
    model.load_state_dict({**checkpoint["model"], **_table_state(model)})
    load_tables(model, check_tables(path.parent, checkpoint["tables"], path), run,
                optimizer=optimizer)
