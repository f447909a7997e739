"""The torchrec ``KeyedJaggedTensor`` input of :class:`MultiTableEmbedding`, duck-typed
(torchrec is not a dependency): every key becomes a ``(values, offsets[, weights])`` bag."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["is_kjt", "kjt_to_ids"]


def is_kjt(x: object) -> bool:
    """Duck-typed torchrec ``KeyedJaggedTensor`` (torchrec is not a dependency)."""
    return (not isinstance(x, Mapping) and callable(getattr(x, "keys", None))
            and callable(getattr(x, "values", None)) and callable(getattr(x, "offsets", None)))


def kjt_to_ids(kjt: Any) -> dict[str, tuple]:
    """Turns a ``KeyedJaggedTensor`` into ``{key: (values, offsets[, weights])}`` bags.

    Every key is a bag, also when all its lengths are 1: bags are the faithful mapping of a
    jagged tensor (a length can be 0), and a one-value bag pools to that value's row (sum and
    mean alike), so the result equals a single-id lookup, one column per key. Weights, when the
    KJT has them, become per-sample weights (they need pooling="sum"). One host sync reads the
    key boundaries. Variable batch sizes per key are not supported.
    """
    keys = list(kjt.keys())
    if len(set(keys)) != len(keys):  # the dict below would keep the last one silently
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"MultiTableEmbedding: KeyedJaggedTensor keys must be unique, "
                         f"repeated: {dup}")
    vsk = getattr(kjt, "variable_stride_per_key", None)
    if callable(vsk) and vsk():
        raise ValueError("MultiTableEmbedding: KeyedJaggedTensor with a variable batch size per "
                         "key is not supported")
    values, offsets = kjt.values(), kjt.offsets()
    wfn = getattr(kjt, "weights_or_none", None)
    weights = wfn() if callable(wfn) else None
    F = len(keys)
    if F == 0:
        return {}
    n = offsets.numel() - 1
    if n < 0 or n % F:
        raise ValueError(f"MultiTableEmbedding: KeyedJaggedTensor offsets of length {n + 1} do "
                         f"not hold {F} keys of one batch size")
    B = n // F
    bounds = offsets[::B].tolist() if B > 0 else [int(offsets[0])] * (F + 1)
    out: dict[str, tuple] = {}
    for k, key in enumerate(keys):
        lo, hi = bounds[k], bounds[k + 1]
        o = offsets[k * B:(k + 1) * B + 1] - lo
        v = values[lo:hi]
        out[key] = (v, o) if weights is None else (v, o, weights[lo:hi])
    return out
