"""Seeding and the RNG states a checkpoint carries, as tensors (``torch.load(weights_only=True)``
reads them back without unpickling arbitrary objects)."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state", "shuffle_seed"]


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device).
    ``seed`` may pass torch's range (a per-rank ``seed + rank`` of the largest seed): it is
    taken modulo 2**64 there, which changes no seed in range."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)


def shuffle_seed(seed: int, epoch: int) -> int:
    """The train split's shuffle seed of an epoch: a function of (seed, epoch) only, so a
    resumed run shuffles as the uninterrupted one did."""
    return (seed * 1_000_003 + epoch) % 2**63


def rng_state() -> dict[str, object]:
    """Every global RNG's state, as tensors and primitives."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    if not isinstance(np_state, tuple):  # a dict only for a non-MT19937 bit generator
        raise TypeError(f"numpy's global RNG is not MT19937 ({np_state.get('bit_generator')}); "
                        f"its state cannot be checkpointed")
    kind, keys, pos, has_gauss, cached = np_state
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
