"""The flat table layout of the multi-table embedding, in one Python definition.

All M x F tables live in one flat 1-D weight, member-major (FBGEMM's TBE layout): member m's
table of feature f is a row-major ``[V_f, D_m]`` block, followed by member m's table of feature
f + 1, then member m + 1's tables. The row-wise optimizer state holds one value per table row in
the same order. The outputs are M tensors ``[B, N, D_m]`` whose columns follow the features:
feature f takes ``ncols[f]`` columns (T for a ``[B, T]`` sequence, else 1) from ``col_start[f]``.

The C++ kernels compute the same layout (``TableLayout`` in csrc/embedding_layout.h, exposed
as ``cetnet_kernels._C.table_layout``); ``tests/kernels/test_layout.py`` checks the two agree.
Used by :class:`MultiTableEmbedding` (its tables and columns) and by the Triton kernels' plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

__all__ = ["TableLayout", "table_layout"]


@dataclass(frozen=True)
class TableLayout:
    """Where every table, state row and output column of an M-member, F-feature embedding is.

    Attributes:
        table_offsets: ``[M * F]`` element offset of table (m, f) in the flat weight, at
            ``m * F + f`` (= ``table_base[m] + dims[m] * row_base[f]``).
        state_offsets: ``[M * F]`` offset of table (m, f)'s first row in the row-wise state
            (= ``m * rows + row_base[f]``).
        row_base: ``[F]`` feature f's first row among one member's rows: ``row_base[f] + id``
            is the key of a row, the same for every member.
        table_base: ``[M]`` element offset of member m's first table.
        rows: rows of one member's tables, ``sum_f V_f`` (``Vtot`` in the kernels).
        weight_numel: elements of the flat weight, ``sum_m D_m * rows``.
        state_rows: elements of the row-wise state, ``M * rows``.
        col_start: ``[F]`` first output column of feature f.
        num_columns: N, the output columns of all features.
    """

    table_offsets: tuple[int, ...]
    state_offsets: tuple[int, ...]
    row_base: tuple[int, ...]
    table_base: tuple[int, ...]
    rows: int
    weight_numel: int
    state_rows: int
    col_start: tuple[int, ...]
    num_columns: int

    def columns(self, f: int) -> slice:
        """Feature f's column slice of the ``[B, N, D_m]`` outputs."""
        end = self.col_start[f + 1] if f + 1 < len(self.col_start) else self.num_columns
        return slice(self.col_start[f], end)


def table_layout(dims: Sequence[int], vocab: Sequence[int],
                 ncols: Sequence[int] | None = None) -> TableLayout:
    """The layout of tables of ``dims[m]`` columns and ``vocab[f]`` rows (unchecked: the callers
    validate their arguments first, each with its own messages), with ``ncols[f]`` output
    columns per feature (default: one per feature). Cached: the Triton ops ask for it twice
    per call, with the same arguments call after call."""
    return _layout(tuple(dims), tuple(vocab),
                   tuple(ncols) if ncols is not None else (1,) * len(vocab))


@functools.lru_cache(maxsize=256)
def _layout(dims: tuple[int, ...], vocab: tuple[int, ...], ncols: tuple[int, ...]
            ) -> TableLayout:
    row_base, rows = [], 0
    for v in vocab:
        row_base.append(rows)
        rows += v
    table_base, numel = [], 0
    for d in dims:
        table_base.append(numel)
        numel += d * rows
    col_start, n = [], 0
    for c in ncols:
        col_start.append(n)
        n += c
    return TableLayout(
        table_offsets=tuple(tb + d * rb for tb, d in zip(table_base, dims) for rb in row_base),
        state_offsets=tuple(m * rows + rb for m in range(len(dims)) for rb in row_base),
        row_base=tuple(row_base), table_base=tuple(table_base), rows=rows, weight_numel=numel,
        state_rows=len(dims) * rows, col_start=tuple(col_start), num_columns=n)
