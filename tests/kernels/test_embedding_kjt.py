"""torchrec KeyedJaggedTensor input of MultiTableEmbedding: every key is a bag (with the KJT's
weights as per-sample weights). Checked with a duck-typed stand-in always, and with real torchrec
when it is importable (it is not a dependency: the test is skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

from cetnet_kernels import MultiTableEmbedding
from embedding_support import reference_outputs

FEATURES = [("user", 20), ("tags", 11, "mean"), ("scores", 7)]


class DuckKJT:
    """The part of torchrec's KeyedJaggedTensor API the module reads (key-major lengths)."""

    def __init__(self, keys, values, lengths, weights=None):
        self._keys, self._values, self._weights = keys, values, weights
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])

    def keys(self):
        return self._keys

    def values(self):
        return self._values

    def offsets(self):
        return self._offsets

    def weights_or_none(self):
        return self._weights


def _kjt_parts():
    # B = 3; user: one id per row; tags: bags of 2, 0, 3; scores: 1, 2, 1
    lengths = torch.tensor([1, 1, 1, 2, 0, 3, 1, 2, 1])
    values = torch.tensor([3, 19, 0, 1, 10, 4, 4, 5, 6, 0, 2, 6])
    weights = torch.rand(values.shape)
    return ["user", "tags", "scores"], values, lengths, weights


def _as_bags(keys, values, lengths, weights, B=3):
    off = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    out = {}
    for k, key in enumerate(keys):
        lo, hi = int(off[k * B]), int(off[(k + 1) * B])
        o = off[k * B:(k + 1) * B + 1] - lo
        out[key] = (values[lo:hi], o) if weights is None else (values[lo:hi], o, weights[lo:hi])
    return out


def _check(mod, kjt, bags):
    outs = mod(kjt)
    refs = reference_outputs(mod, bags)
    for o, r in zip(outs, refs):
        assert o.shape == (3, 3, r.shape[-1])
        torch.testing.assert_close(o.double(), r, rtol=1e-12, atol=1e-12)
    assert mod.columns("tags") == slice(1, 2)
    # a key whose lengths are all 1 gives the single-id lookup
    single = mod({"user": bags["user"][0], "tags": bags["tags"], "scores": bags["scores"]})
    for o, s in zip(outs, single):
        torch.testing.assert_close(o, s)


def test_duck_typed_kjt():
    keys, values, lengths, weights = _kjt_parts()
    mod = MultiTableEmbedding(2, FEATURES, [4, 1], weights_dtype=torch.float64)
    _check(mod, DuckKJT(keys, values, lengths), _as_bags(keys, values, lengths, None))
    # weights need pooling="sum" on every key
    mod_w = MultiTableEmbedding(1, [("user", 20), ("tags", 11), ("scores", 7)], 3,
                                weights_dtype=torch.float64)
    out = mod_w(DuckKJT(keys, values, lengths, weights))[0]
    ref = reference_outputs(mod_w, _as_bags(keys, values, lengths, weights))[0]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # float32 weights
    with pytest.raises(ValueError, match="unknown feature"):
        mod(DuckKJT(["user", "tags", "nope"], values, lengths))
    with pytest.raises(ValueError, match=r"keys must be unique, repeated: \['user'\]"):
        mod(DuckKJT(["user", "tags", "user"], values, lengths))


def test_real_torchrec_kjt():
    jt = pytest.importorskip("torchrec.sparse.jagged_tensor",
                             reason="torchrec is not importable here (not a dependency)")
    keys, values, lengths, weights = _kjt_parts()
    mod = MultiTableEmbedding(2, FEATURES, [4, 1], weights_dtype=torch.float64)
    kjt = jt.KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    _check(mod, kjt, _as_bags(keys, values, lengths, None))
    mod_w = MultiTableEmbedding(1, [("user", 20), ("tags", 11), ("scores", 7)], 3,
                                weights_dtype=torch.float64)
    kjt_w = jt.KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths,
                                                   weights=weights)
    torch.testing.assert_close(mod_w(kjt_w)[0],
                               reference_outputs(mod_w, _as_bags(keys, values, lengths,
                                                                 weights))[0],
                               rtol=1e-6, atol=1e-6)
