"""Streaming readers for delimited text files, with errors that name the file, line and column.

Files are read a chunk of rows at a time, so a 25M-row csv never sits in memory as text at once.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["DataFormatError", "read_chunks", "parse_float"]

# Sequence columns of the BARS csv files can be long strings of ids.
csv.field_size_limit(1 << 30)


class DataFormatError(ValueError):
    """Malformed input: a missing column, a line with the wrong number of columns, a bad value."""

    def __init__(self, path: str | Path, line: int, column: str | None, message: str) -> None:
        where = f"{path}, line {line}" + (f", column {column!r}" if column is not None else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.column = str(path), line, column


def read_chunks(path: str | Path, required: Sequence[str], *, delimiter: str = ",",
                chunk_size: int = 100_000, header: Sequence[str] | None = None,
                encoding: str = "utf-8") -> Iterator[tuple[list[int], dict[str, tuple[str, ...]]]]:
    """Yields ``(line_numbers, {column: values})`` for consecutive chunks of data rows.

    Args:
        path: the file.
        required: the columns that must be present (only these are returned).
        delimiter: field separator (``","`` for csv, ``"\\t"`` for tsv).
        chunk_size: rows per chunk (bounds the text held in memory).
        header: the column names when the file has no header line; by default the first line.
        encoding: text encoding.

    Raises:
        DataFormatError: a required column is missing from the header, or a line has a different
            number of fields than the header.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    with open(path, newline="", encoding=encoding) as f:
        reader = csv.reader(f, delimiter=delimiter)
        if header is None:
            try:
                header = next(reader)
            except StopIteration:
                raise DataFormatError(path, 1, None, "empty file, expected a header line") from None
        header = list(header)
        for name in required:
            if name not in header:
                raise DataFormatError(path, 1, name, f"column is missing; the header has {header}")
        pos = [header.index(name) for name in required]
        width = len(header)
        rows: list[list[str]] = []
        lines: list[int] = []
        for row in reader:
            if len(row) != width:
                if not row:  # a blank line (e.g. trailing) carries no data
                    continue
                col = header[len(row)] if len(row) < width else f"<extra #{len(row)}>"
                raise DataFormatError(path, reader.line_num, col,
                                      f"expected {width} columns, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
            if len(rows) == chunk_size:
                yield lines, _columns(rows, required, pos)
                rows, lines = [], []
        if rows:
            yield lines, _columns(rows, required, pos)


def _columns(rows: list[list[str]], names: Sequence[str], pos: list[int]) -> dict[str, tuple]:
    cols = list(zip(*rows))
    return {name: cols[p] for name, p in zip(names, pos)}


def parse_float(values: Sequence[str], path: str | Path, lines: Sequence[int],
                column: str) -> list[float]:
    """Parses a column of numbers; empty cells become NaN (missing, imputed later).

    Raises:
        DataFormatError: a non-empty cell is not a finite number (names the line).
    """
    out = []
    for k, v in enumerate(values):
        v = v.strip()
        if not v:
            out.append(math.nan)
            continue
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        else:
            if math.isfinite(x):
                out.append(x)
                continue
        raise DataFormatError(path, lines[k], column, f"not a finite number: {v!r}")
    return out
