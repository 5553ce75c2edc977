"""Local data files -> raw rows, each tagged with its place (`file:line 7`) for messages.

Files are read leniently: a line that cannot be read (invalid JSON or UTF-8, a truncated gzip tail, a
CSV record with the wrong number of fields) becomes an `Unreadable` row in its place, so the `--bad_rows`
policy decides about it like any other malformed row and the row positions (the phase split) stay put.
Only a file that cannot be read in part (a JSON array, parquet) is an error as a whole.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import zlib
from typing import Any

from rlhf_reward.utils.data.fields import Unreadable
from rlhf_reward.utils.errors import UserError, first_line

LOCAL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) rejects long texts; this reads any field
GZIP_CHUNK = 1 << 20


def place(where: str) -> str:
    """`file:line 7` as `file, line 7`, for messages."""
    origin, _, spot = where.rpartition(":")
    return f"{origin}, {spot}" if origin else where


def _gunzip(path: str) -> tuple[bytes, Unreadable | None]:
    """The data of a gzip file up to where it ends early or turns corrupt, and why it stops there (None: it
    does not). Read by hand because the gzip module loses the data it holds when it meets the break."""
    out: list[bytes] = []
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    with open(path, "rb") as handle:
        while chunk := handle.read(GZIP_CHUNK):
            try:
                out.append(inflater.decompress(chunk))
                while inflater.eof and inflater.unused_data:  # another member follows (concatenated files)
                    rest, inflater = inflater.unused_data, zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
                    out.append(inflater.decompress(rest))
            except zlib.error as err:
                return b"".join(out), Unreadable("corrupt gzip data", f" ({err})")
    if out and not inflater.eof:
        return b"".join(out), Unreadable("truncated gzip file", " (it ends before its end-of-stream marker)")
    return b"".join(out), None


def _read_json_lines(path: str, data: bytes, broken: Unreadable | None) -> list[tuple[str, Any]]:
    """One row per non-blank line; a line that cannot be read is an `Unreadable` row in its place, and so is
    the incomplete last line of a broken gzip file."""
    lines = data.split(b"\n")  # not splitlines(): U+2028 is valid in JSON
    if broken:
        lines.pop()
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            line_text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append((f"{path}:line {number}", Unreadable(
                "not UTF-8 text", f" (byte 0x{line[err.start]:02x} at column {err.start + 1})")))
            continue
        if line_text.strip():
            rows.append((f"{path}:line {number}", _parse_json_line(line_text)))
    if broken:
        rows.append((f"{path}:line {len(lines) + 1}", broken))
    return rows


def _gist(err: BaseException) -> str:
    """The first clause of a parser's message ("Exceeds the limit (4300 digits) for integer string conversion")."""
    return first_line(err).split(": ")[0]


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return Unreadable("not valid JSON", f" ({err.msg}, column {err.colno})")
    except RecursionError:
        return Unreadable("not valid JSON", " (nested too deeply)")
    except ValueError as err:  # an integer literal beyond Python's digit limit
        return Unreadable("not valid JSON", f" ({_gist(err)})")


def _read_json_array(path: str, data: bytes, broken: Unreadable | None) -> list[tuple[str, Any]]:
    """A `[...]` file is parsed whole, so a broken one cannot be read in part: an error in either mode."""
    if broken:
        raise UserError(f"{path}: {broken.reason}{broken.hint}; a JSON array cannot be read in part")
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); a JSON array "
                        "cannot be read in part") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except (RecursionError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({_gist(err)})") from None
    return [(f"{path}:item {i + 1}", row) for i, row in enumerate(rows)]


def _read_csv(path: str, data: bytes) -> list[tuple[str, Any]]:
    """Records as {header: value} rows, tagged with the line they start on. Bytes that are not UTF-8 become
    lone surrogates, which the field checks report; a record with the wrong number of fields is unreadable."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
    header = next((record for record in reader if record), [])  # blank lines are no records
    rows: list[tuple[str, Any]] = []
    while True:
        where = f"{path}:line {reader.line_num + 1}"
        try:
            record = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:  # the reader cannot go on: the rest of the file is one unreadable row
            rows.append((where, Unreadable("unreadable CSV record", f" ({err})")))
            return rows
        if record and len(record) == len(header):
            rows.append((where, dict(zip(header, record, strict=True))))
        elif record:
            rows.append((where, Unreadable("wrong number of fields", f" ({len(record)}; the header has "
                                                                    f"{len(header)})")))


def _read_parquet(path: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable parquet file ({first_line(err)})") from None
    return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]


def _read_text_file(path: str) -> list[tuple[str, Any]]:
    lower = path.lower()
    try:
        if lower.endswith(".gz"):
            data, broken = _gunzip(path)
        else:
            with open(path, "rb") as handle:
                data, broken = handle.read(), None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    if lower.endswith(".csv"):
        return _read_csv(path, data)
    if lower.endswith((".json", ".json.gz")) and data.lstrip().startswith(b"["):
        return _read_json_array(path, data, broken)
    return _read_json_lines(path, data, broken)


def read_file(path: str) -> list[tuple[str, Any]]:
    """Rows of one local file, each tagged with `file:line` (or `file:row`, `file:item`) for messages."""
    rows = _read_parquet(path) if path.lower().endswith(".parquet") else _read_text_file(path)
    if not rows:
        raise UserError(f"{path}: empty file, no rows")
    return rows
