"""The flat table layout (cetnet_kernels/layout.py): its invariants, its use by the module and
the Triton plan, and its agreement with the C++ layout (csrc/embedding_layout.h) through
``cetnet_kernels._C.table_layout`` where the built extension exposes it."""

from __future__ import annotations

import pytest
import torch

from cetnet_kernels import MultiTableEmbedding
from cetnet_kernels._extension import _C
from cetnet_kernels.layout import table_layout

# (dims, vocab, ncols): odd dims, dim 1, one member / one feature, many features, sequences.
CONFIGS = [
    ([1], [1], [1]),
    ([3], [5, 7], [1, 4]),
    ([1, 10, 16], [40, 31, 25, 17, 9, 12], [1, 1, 5, 1, 1, 1]),
    ([7, 1, 33], [100, 3], [1, 1]),
    ([2, 5], [3] * 64, [1 + f % 3 for f in range(64)]),
    ([4] * 9, list(range(1, 30)), [0] + [1] * 28),  # a [B, 0] sequence takes no column
]


@pytest.mark.parametrize("dims,vocab,ncols", CONFIGS)
def test_layout_invariants(dims, vocab, ncols):
    L = table_layout(dims, vocab, ncols)
    M, F = len(dims), len(vocab)
    assert L.rows == sum(vocab) and L.state_rows == M * L.rows
    assert L.weight_numel == sum(d * L.rows for d in dims)
    # the M x F tables tile the weight in (m, f) order, without gaps
    end = 0
    for m in range(M):
        assert L.table_base[m] == end
        for f in range(F):
            assert L.table_offsets[m * F + f] == end == L.table_base[m] + dims[m] * L.row_base[f]
            assert L.state_offsets[m * F + f] == m * L.rows + L.row_base[f]
            end += vocab[f] * dims[m]
    assert end == L.weight_numel
    assert L.num_columns == sum(ncols)
    assert [L.columns(f) for f in range(F)] == [
        slice(L.col_start[f], L.col_start[f] + ncols[f]) for f in range(F)]


def test_default_is_one_column_per_feature():
    assert table_layout([2], [3, 4, 5]).col_start == (0, 1, 2)


def test_module_tables_follow_the_layout():
    mod = MultiTableEmbedding(3, [("a", 5), ("b", 7, "mean")], [1, 4, 3])
    assert mod.layout == table_layout([1, 4, 3], [5, 7])
    assert mod.weight.numel() == mod.layout.weight_numel
    t = mod.table(2, "b")
    assert t.data_ptr() == mod.weight.data_ptr() + 4 * mod.layout.table_offsets[2 * 2 + 1]
    ids = {"a": torch.tensor([[0, 1, 2]]), "b": torch.tensor([3])}
    assert mod.columns("a", ids) == slice(0, 3) and mod.columns("b", ids) == slice(3, 4)


_C_LAYOUT = getattr(_C, "table_layout", None) if _C is not None else None
# C++ field names (csrc/embedding_layout.h TableLayout, as _C.table_layout returns them) -> the
# TableLayout attributes.
_FIELDS = {"table_off": "table_offsets", "state_off": "state_offsets", "row_base": "row_base",
           "table_base": "table_base", "Vtot": "rows", "weight_numel": "weight_numel",
           "state_rows": "state_rows", "col_start": "col_start", "N": "num_columns"}


def _as_python(c_layout: dict) -> dict[str, object]:
    """The C++ layout's fields under the Python names, lists as tuples."""
    return {py: tuple(c_layout[c]) if isinstance(c_layout[c], list) else c_layout[c]
            for c, py in _FIELDS.items()}


@pytest.mark.skipif(_C_LAYOUT is None,
                    reason="cetnet_kernels._C has no table_layout (extension not built, or built "
                           "before csrc/python_module.cpp exposed it)")
@pytest.mark.parametrize("dims,vocab,ncols", CONFIGS)
def test_python_layout_equals_cpp(dims, vocab, ncols):
    py = table_layout(dims, vocab, ncols)
    assert _as_python(_C_LAYOUT(dims, vocab, ncols)) == {p: getattr(py, p) for p in
                                                         _FIELDS.values()}
    # the default: one column per feature, on both sides
    assert _as_python(_C_LAYOUT(dims, vocab)) == {p: getattr(table_layout(dims, vocab), p)
                                                  for p in _FIELDS.values()}
