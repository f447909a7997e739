"""The studies of ``cetnet reproduce --study``: each is a list of :class:`~cetnet.reproduce.rows.Row`
made from its parameters, trained and cached like the main table's rows.

- ``main``: the registered rows (:data:`~cetnet.reproduce.rows.ROWS`).
- ``embedding-size``: CETNet and multi-embedding at several embedding dims (CETNet's claim:
  comparable or better AUC than multi-embedding with smaller embeddings).
- ``scaling``: K members of one architecture, with separate tables or one shared table, under
  the naive ensemble, CETNet with collaboration and KDEF (KDEF's claims: naive members degrade as
  K grows, knowledge transfer keeps them near the ensemble, separate tables collapse less).
"""

from __future__ import annotations

from typing import Any, Sequence

from cetnet.config import ConfigError
from cetnet.models.build import MEMBERS
from cetnet.reproduce.rows import DELETE, Row

__all__ = ["STUDIES", "DEFAULT_DIMS", "DEFAULT_KS", "DEFAULT_ARCHS", "SCALING_METHODS",
           "COLLABORATION", "embedding_size_rows", "scaling_rows", "parse_ints", "parse_archs"]

STUDIES = ("main", "embedding-size", "scaling")
DEFAULT_DIMS = (4, 8, 16, 32)
DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_ARCHS = ("dnn", "dcnv2")
#: CETNet's collaboration in the scaling study: distillation to the ensemble and mutual learning.
COLLABORATION = {"distill_weight": 0.5, "mutual_weight": 0.5}
#: method -> (what, model overrides) of the scaling study
SCALING_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "naive": ("naive ensemble (independent members, mean probability)",
              {"ensemble": "naive", "fusion": DELETE}),
    "cetnet": ("CETNet with collaboration (distill and mutual weights 0.5)",
               {"ensemble": "cetnet", "fusion": COLLABORATION}),
    "kdef": ("KDEF", {"ensemble": "kdef", "fusion": DELETE}),
}


def embedding_size_rows(dims: Sequence[int] = DEFAULT_DIMS) -> list[Row]:
    """``cetnet_d<dim>`` (the base CETNet at that embedding dim) and ``multi_embedding_d<dim>``
    (the multi-embedding model, 2 sets of that dim) for every dim."""
    rows = []
    for d in dims:
        rows.append(Row(f"cetnet_d{d}", f"CETNet (the base members) at embedding dim {d}",
                        {"embedding_dim": d}, "embedding-size", {"kind": "cetnet", "dim": d}))
        rows.append(Row(f"multi_embedding_d{d}", f"multi-embedding (2 sets) at embedding dim {d}",
                        {"ensemble": "multi_embedding", "fusion": DELETE, "embedding_dim": d},
                        "embedding-size", {"kind": "multi_embedding", "dim": d}))
    return rows


def scaling_rows(archs: Sequence[str] = DEFAULT_ARCHS,
                 ks: Sequence[int] = DEFAULT_KS) -> list[Row]:
    """For each architecture and K: ``<arch>_k<K>_<tables>_<method>`` with tables ``separate``
    or ``shared`` and a method of :data:`SCALING_METHODS`. K = 1 is one row per architecture
    (``<arch>_k1``: the member alone), since every variant is then the same model trained on
    its own BCE (up to CETNet's loss counting it twice)."""
    rows = []
    for arch in archs:
        for k in ks:
            if k == 1:
                rows.append(Row(f"{arch}_k1", f"{arch} alone (K = 1)",
                                {"ensemble": "naive", "members": [arch], "fusion": DELETE,
                                 "shared_embedding": False},
                                "scaling", {"arch": arch, "k": 1, "tables": "separate",
                                            "method": "single"}))
                continue
            for tables in ("separate", "shared"):
                for method, (what, model) in SCALING_METHODS.items():
                    rows.append(Row(
                        f"{arch}_k{k}_{tables}_{method}",
                        f"{k} x {arch}, {tables} tables, {what}",
                        {**model, "members": [arch] * k, "shared_embedding": tables == "shared"},
                        "scaling", {"arch": arch, "k": k, "tables": tables, "method": method}))
    return rows


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """``"4,8,16"`` -> ``[4, 8, 16]``; ConfigError naming ``option`` otherwise."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise ConfigError(f"reproduce: {option} must be comma-separated integers >= {minimum}, "
                          f"got {text!r}")
    return list(dict.fromkeys(values))


def parse_archs(text: str) -> list[str]:
    """``"dnn,dcnv2"`` -> member kinds; ConfigError for an unknown one."""
    archs = [t.strip() for t in text.split(",") if t.strip()]
    bad = [a for a in archs if a not in MEMBERS]
    if not archs or bad:
        raise ConfigError(f"reproduce: --archs must name member kinds ({', '.join(MEMBERS)}), "
                          f"got {text!r}")
    return list(dict.fromkeys(archs))
