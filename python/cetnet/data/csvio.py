"""Streaming readers for delimited text files, with errors that name the file, line and column.

Files are read a chunk of rows at a time, so a 25M-row csv never sits in memory as text at once.
Every problem with a file (missing column, wrong column count, bad value, bytes that are not
text, a quote left open, a directory or device instead of a file, no permission to read) is one
:class:`DataFormatError` naming the file and, where it applies, the line and column; values from
the file are quoted short (:func:`shorten`), so a 10 MB cell or a system file is never printed.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import itertools
import math
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from cetnet.messages import SHORT, clip, shorten, shorten_list  # noqa: F401  (re-exported)

__all__ = ["DataFormatError", "read_chunks", "parse_float", "shorten", "clip", "shorten_list",
           "check_data_file"]

# Sequence columns of the BARS csv files can be long strings of ids.
csv.field_size_limit(1 << 30)

_SNIFF = 8192       # bytes looked at for NULs (a binary file) before reading


class DataFormatError(ValueError):
    """Malformed input: a missing column, a line with the wrong number of columns, a bad value,
    or a file that cannot be read as text (naming the file, and the line and column if known)."""

    def __init__(self, path: str | Path, line: int | None, column: str | None,
                 message: str) -> None:
        where = str(path) + (f", line {line}" if line is not None else "")
        where += f", column {shorten(column, 60)}" if column is not None else ""
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.column, self.reason = str(path), line, column, message


def check_data_file(path: str | Path, what: str = "a data file") -> os.stat_result:
    """The ``stat`` of a data file that exists, is a regular file and can be opened.

    Raises:
        FileNotFoundError: no such file (a missing folder on the way included).
        DataFormatError: a directory, a device, a pipe or socket (reading one could hang), or a
            file that cannot be opened (permissions and other OS errors).
    """
    path = Path(path)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise DataFormatError(path, None, None, f"cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # an embedded NUL byte
        raise DataFormatError(path, None, None, f"not a usable file name ({e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataFormatError(path, None, None, f"is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise DataFormatError(path, None, None, f"is not a regular file (a device, pipe or "
                              f"socket), expected {what}")
    if not os.access(path, os.R_OK):
        raise DataFormatError(path, None, None, "cannot read it (permission denied)")
    return st


def _open_binary(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise DataFormatError(path, None, None, f"cannot read it ({e.strerror or e})") from None


def _text_encoding(encoding: str) -> tuple[str, bool]:
    """(the codec to open with, whether the encoding is byte-oriented like UTF-8). UTF-8 is
    opened as ``utf-8-sig``: a byte-order mark (Excel writes one) is dropped from the header."""
    name = codecs.lookup(encoding).name
    return ("utf-8-sig" if name == "utf-8" else encoding,
            not name.startswith(("utf-16", "utf-32")))


def _sniff_binary(path: Path, head: bytes) -> None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataFormatError(path, 1, None, "UTF-16 text; save the file as UTF-8")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataFormatError(path, head.count(b"\n", 0, nul) + 1, None,
                              "a NUL byte: this looks like a binary file, not delimited text")


def _decode_error(path: Path, encoding: str, delimiter: str, found: dict,
                  exc: UnicodeDecodeError) -> DataFormatError:
    """The error for bytes that are not ``encoding`` text, naming the first bad line (and its
    column when the line is a row); rescans the file, which only happens on this error."""
    name = exc.encoding.upper() if exc.encoding.startswith("utf") else exc.encoding
    decoder = codecs.getincrementaldecoder(encoding)()
    header, header_line = found["header"], found["line"]
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                prefix = raw[:e.start].decode(encoding, "replace")
                fields = next(csv.reader([prefix], delimiter=delimiter), [])
                k = max(len(fields) - 1, 0)
                column = (header[k] if header is not None and number > header_line
                          and k < len(header) else None)
                return DataFormatError(path, number, column,
                                       f"not valid {name} text (byte 0x{raw[e.start]:02x} at "
                                       f"character {e.start + 1} of the line); is it a {name} "
                                       f"text file?")
            if header is None and text.strip():  # the header line, read before the error
                header = next(csv.reader([text], delimiter=delimiter), [])
                header_line = number
    return DataFormatError(path, None, None, f"not valid {name} text ({exc.reason})")


def _line_breaks(text: str) -> int:
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _quote_line(start: int, row: Sequence[str], last: bool = False) -> int:
    """The line where the quoted field of a multi-line row opens (the first field with a line
    break, or with ``last`` the row's last field: the one an unclosed quote runs to the end in)."""
    k = len(row) - 1 if last else next((i for i, f in enumerate(row) if _line_breaks(f)), 0)
    return start + sum(_line_breaks(f) for f in row[:k])


def _unclosed_quote(path: Path, encoding: str, delimiter: str, start: int, end: int,
                    row: Sequence[str]) -> int | None:
    """For a row spanning lines ``start..end`` at the end of the file: the line where a quote
    opens that is never closed, or None when the row's quotes are balanced.

    The csv module silently ends an open quoted field at the end of the file; reparsing the
    row's lines with a sentinel line after them tells the two apart (an open quote swallows it).
    """
    with open(path, newline="", encoding=encoding) as f:
        text = "".join(itertools.islice(f, start - 1, end))
    sentinel = "cetnet-end-of-file-sentinel"
    rows = list(csv.reader(io.StringIO(f"{text}\n{sentinel}\n", newline=""),
                           delimiter=delimiter))
    if rows and rows[-1] == [sentinel]:
        return None
    return _quote_line(start, row, last=True)


def _missing_column(path: Path, line: int, name: str, header: list[str],
                    delimiter: str) -> DataFormatError:
    hint = ""
    close = [h for h in header if h.strip().lower() == name.strip().lower()] or \
        difflib.get_close_matches(name, [h for h in header if len(h) <= 200], 1, 0.8)
    if close:
        hint = f"; did you mean {shorten(close[0])}?"
    elif len(header) == 1:
        hint = f"; the header has one column: is the file {delimiter!r}-separated text?"
    return DataFormatError(path, line, name,
                           f"column is missing; the header has {shorten_list(header)}{hint}")


def read_chunks(path: str | Path, required: Sequence[str], *, delimiter: str = ",",
                chunk_size: int = 100_000, header: Sequence[str] | None = None,
                encoding: str = "utf-8", allow_empty: bool = False,
                optional: Sequence[str] = (),
                ) -> Iterator[tuple[list[int], dict[str, tuple[str, ...]]]]:
    """Yields ``(line_numbers, {column: values})`` for consecutive chunks of data rows.

    A row's line number is the line it starts on (a quoted field may span lines). A UTF-8
    byte-order mark before the header is dropped; blank lines are skipped.

    Args:
        path: the file.
        required: the columns that must be present (only these are returned).
        delimiter: field separator (``","`` for csv, ``"\\t"`` for tsv).
        chunk_size: rows per chunk (bounds the text held in memory).
        header: the column names when the file has no header line; by default the first line.
        encoding: text encoding.
        allow_empty: a file without data rows yields nothing instead of raising.
        optional: columns returned too when the header has them (absent ones are left out of
            the chunks).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: the file is not readable text (a directory, device, binary file, bytes
            that are not ``encoding``, no permission), is empty or has no data rows, a required
            column is missing or a header column is duplicated, a line has a different number
            of fields than the header, or a quote is never closed (naming its line).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    path = Path(path)
    check_data_file(path)
    text_encoding, bytewise = _text_encoding(encoding)
    raw = _open_binary(path)
    try:
        if bytewise:
            _sniff_binary(path, raw.peek(_SNIFF)[:_SNIFF])
        f = io.TextIOWrapper(raw, encoding=text_encoding, newline="")
    except BaseException:
        raw.close()
        raise
    found: dict = {"header": header, "line": 0}  # the header as read, for error messages
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            yield from _read_rows(path, reader, required, chunk_size, found, allow_empty,
                                  text_encoding, delimiter, optional)
        except UnicodeDecodeError as e:
            raise _decode_error(path, text_encoding, delimiter, found, e) from None
        except csv.Error as e:
            raise DataFormatError(path, reader.line_num or 1, None,
                                  f"malformed delimited text ({e})") from None


def _read_rows(path: Path, reader, required: Sequence[str], chunk_size: int, found: dict,
               allow_empty: bool, encoding: str, delimiter: str, optional: Sequence[str] = (),
               ) -> Iterator[tuple[list[int], dict[str, tuple[str, ...]]]]:
    header, header_line = found["header"], 0
    if header is None:
        header = next((row for row in reader if row), None)  # blank lines before it: skipped
        if header is None:
            raise DataFormatError(path, 1, None, "empty file, expected a header line")
        header_line = reader.line_num
    header = found["header"] = list(header)
    found["line"] = header_line
    counts = Counter(header)
    dup = next((h for h in header if h and counts[h] > 1), None)  # unnamed ones may repeat
    if dup is not None:
        first, second = [k + 1 for k, h in enumerate(header) if h == dup][:2]
        raise DataFormatError(path, header_line or 1, dup, f"the header names this column twice "
                              f"(fields {first} and {second})")
    for name in required:
        if name not in counts:
            raise _missing_column(path, header_line or 1, name, header, delimiter)
    required = [*required, *(n for n in optional if n in counts and n not in required)]
    pos = [header.index(name) for name in required]
    width = len(header)
    rows: list[list[str]] = []
    lines: list[int] = []
    total = 0
    last = header_line   # the last line read
    multiline = None     # (start, end, row) of the latest row that spans lines
    for row in reader:
        start, last = last + 1, reader.line_num
        if start != last and row:
            multiline = (start, last, row)
        if len(row) != width:
            if not row:  # a blank line (e.g. trailing) carries no data
                continue
            col = header[len(row)] if len(row) < width else f"<extra #{len(row)}>"
            message = f"expected {width} columns, got {len(row)}"
            if start != last:
                message += (f"; this row runs from line {start} to line {last}: a quote opened "
                            f"on line {_quote_line(start, row)} is probably never closed")
            raise DataFormatError(path, start, col, message)
        rows.append(row)
        lines.append(start)
        if len(rows) == chunk_size:
            total += len(rows)
            yield lines, _columns(rows, required, pos)
            rows, lines = [], []
    if multiline is not None and multiline[1] == last:
        opened = _unclosed_quote(path, encoding, delimiter, *multiline)
        if opened is not None:
            raise DataFormatError(path, opened, None, "a quote opened on this line is never "
                                  "closed (the quoted field runs to the end of the file)")
    total += len(rows)
    if total == 0 and not allow_empty:
        raise DataFormatError(path, header_line or 1, None,
                              "no data rows (the file has a header line only)" if header_line
                              else "no data rows")
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
        raise DataFormatError(path, lines[k], column, f"not a finite number: {shorten(v)}")
    return out
