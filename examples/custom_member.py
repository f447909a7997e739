"""A member of your own inside a CETNet ensemble, trained by the ``cetnet`` trainer.

This module is a *plugin*: importing it registers the ensemble ``cetnet_fm`` with
:func:`cetnet.train.register_model`. Its factory builds a CETNet whose members may be the
:class:`FM` below (``fm``) and any library member (``dnn``, ``dcnv2``, ``dhen``,
``interformer``), all reading their own tables of one fused embedding. From the repository
root (``python -m`` puts it on the import path; with the ``cetnet`` script, set
``PYTHONPATH=.``)::

    python -m cetnet --plugin examples.custom_member train \\
        --set 'data={name: synthetic, num_rows: 20000}' model.ensemble=cetnet_fm \\
              'model.members=[fm, dnn]' model.embedding_dim=8 'model.dnn={hidden: [64]}' \\
              train.epochs=3 --out runs/custom-member

or ``python examples/custom_member.py`` (the same command, with arguments for its sizes).
``cetnet --plugin examples.custom_member evaluate runs/custom-member`` scores it again later:
a run of a registered model needs its plugin wherever it is rebuilt (evaluate, resume,
``cetnet.serve``).

The ``model:`` section reads as the library's: ``members``, ``embedding_dim`` (one or one per
member), ``embedding_optimizer``, ``embedding_lr``, ``shared_embedding``, ``fusion``
(``CETNetFusion`` keywords) and one section of keyword arguments per member kind (``fm:
{}``, ``dnn: {hidden: [64]}``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from cetnet.config import ConfigError
from cetnet.data.schema import Schema
from cetnet.models import CETNet, EmbeddingFront, MemberInputs, build_member, unique_names
from cetnet.models.build import DEFAULTS
from cetnet.models.layers import SchemaShape, check_dim, pooled_sequences
from cetnet.train import register_model
from cetnet_kernels import CETNetFusion

ENSEMBLE = "cetnet_fm"


class FM(nn.Module):
    """Factorization machine member: a bias, a linear term over the embedded tokens and the
    dense values, and every pairwise dot product of the tokens.

    A member is any ``nn.Module`` built as ``Member(schema, dim, **options)`` whose forward
    takes its :class:`~cetnet.models.MemberInputs` (field tokens ``[B, n_fields, D]``, dense
    values, padded sequences and their masks) and returns ``[B]`` logits.
    """

    def __init__(self, schema: Schema, dim: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        dim = check_dim(dim, "FM")
        self.shape = s = SchemaShape(schema)
        self.first = nn.Linear((s.n_fields + s.n_seq) * dim + s.n_dense, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: MemberInputs) -> Tensor:
        # one token per field and one per sequence (its real items mean-pooled): [B, n, D]
        pooled = pooled_sequences(inputs.sequences, inputs.seq_mask, self.shape.sequences)
        tokens = torch.cat([inputs.fields, *(p.unsqueeze(1) for p in pooled)], dim=1)
        tokens = self.dropout(tokens)
        # sum_{i<j} <e_i, e_j> = ((sum_i e_i)^2 - sum_i e_i^2) / 2, summed over the dim
        total = tokens.sum(1)
        pairs = 0.5 * (total * total - (tokens * tokens).sum(1)).sum(1)
        linear = self.first(torch.cat([tokens.flatten(1), inputs.dense], dim=1)).squeeze(-1)
        return linear + pairs


#: The member kinds this plugin adds to the library's.
CUSTOM_MEMBERS: dict[str, type[nn.Module]] = {"fm": FM}


def build_cetnet_fm(config: Mapping[str, Any], schema: Schema, *,
                    backend: str = "auto") -> CETNet:
    """The factory of ``model.ensemble: cetnet_fm``: ``factory(model_section, schema,
    backend=...) -> Ensemble``, what :func:`cetnet.train.register_model` expects."""
    cfg = {**DEFAULTS, "members": ["fm", "dnn"], **config}
    kinds = [cfg["members"]] if isinstance(cfg["members"], str) else list(cfg["members"])
    if not kinds:
        raise ConfigError("config: model.members must name at least one member")
    dims = cfg["embedding_dim"]
    dims = [dims] * len(kinds) if isinstance(dims, int) else list(dims)
    if len(dims) != len(kinds):
        raise ConfigError(f"config: model.embedding_dim has {len(dims)} entries for "
                          f"{len(kinds)} members")
    front = EmbeddingFront(schema, dims, len(kinds), shared=cfg["shared_embedding"],
                           optimizer=cfg["embedding_optimizer"], lr=cfg["embedding_lr"],
                           backend=backend)
    members: dict[str, nn.Module] = {}
    for name, kind, dim in zip(unique_names(kinds), kinds, dims):
        options = dict(cfg.get(kind) or {})
        if kind in CUSTOM_MEMBERS:
            try:
                members[name] = CUSTOM_MEMBERS[kind](schema, dim, **options)
            except TypeError as e:  # an option FM does not take
                raise ConfigError(f"config: model.{kind}: {e}") from None
        else:  # a library member: its options are checked as in cetnet.models.build_model
            members[name] = build_member(kind, schema, dim, **options)
    fusion = CETNetFusion(len(kinds), backend=backend, **(cfg.get("fusion") or {}))
    return CETNet(front, members, fusion)


# Importing the module (``--plugin examples.custom_member``) registers the ensemble.
register_model(ENSEMBLE, build_cetnet_fm)


def train_command(args: argparse.Namespace) -> list[str]:
    """The ``cetnet`` command line this script runs."""
    data = (f"data={{name: synthetic, num_rows: {args.rows}, num_users: {args.users}, "
            f"num_items: {args.items}, max_seq_len: {args.seq_len}, seed: {args.seed}}}")
    # the partner's keyword arguments (its section of the model config)
    partner = f"{{hidden: [{args.hidden}]}}" if args.partner == "dnn" else "{}"
    command = ["--plugin", "examples.custom_member", "train", "--set", data,
               f"model.ensemble={ENSEMBLE}", f"model.members=[fm, {args.partner}]",
               f"model.embedding_dim={args.dim}", f"model.{args.partner}={partner}",
               f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
               "train.warmup_steps=0", f"train.seed={args.seed}", "--out", str(args.out),
               "--no-plots"]
    return command + (["--overwrite"] if args.overwrite else []) + \
        (["--quiet"] if args.quiet else [])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train CETNet with a custom FM member and a library "
                                             "member through `cetnet --plugin ... train`.")
    ap.add_argument("--rows", type=int, default=20_000, help="synthetic rows (all splits)")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--items", type=int, default=1_000)
    ap.add_argument("--seq-len", type=int, default=10, help="history length")
    ap.add_argument("--partner", default="dnn", help="the library member next to the FM")
    ap.add_argument("--hidden", type=int, default=64, help="the DNN partner's hidden width")
    ap.add_argument("--dim", type=int, default=8, help="embedding dim of every member")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/custom-member"))
    ap.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    # `--plugin examples.custom_member` imports this file as a module of the `examples`
    # package: the repository root must be importable (python -m does that from the root).
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from cetnet.cli import main as cetnet

    command = train_command(args)
    print("cetnet " + " ".join(command))
    return cetnet(command)


if __name__ == "__main__":
    sys.exit(main())
