"""Reading corpus files without one record costing more than its bound: JSON lines (with their line numbers),
one JSON array (item by item, through bounded_json), one JSON document, and the checks on a file as a whole.

What comes out is an :class:`Item` per record, parsed or refused; the mappers never see a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import ijson
import orjson

from data_pipeline import bounded_json
from data_pipeline.formats.records import DEEP, MAX_DEPTH, RAW_LIMIT, Item, first_line
from sft_stack.chat.conversation import InputError

SNIFF_LINES = 20
"""Leading non-empty lines looked at when the first one is not JSON (a malformed first record)."""
_SNIFF_BYTES = 1 << 20
"""Bytes of each leading line kept for detection; a longer line is cut there (and is a record of a JSON-lines file)."""

_WHITESPACE = b" \t\r\n"
_BOM = bounded_json.BOM

Layout = Literal["array", "lines", "document"]


# ---------------------------------------------------------------------------------------------------------------
# The file as a whole


def require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the --source path")


def require_nonempty(path: Path) -> None:
    with path.open("rb") as f:
        if first_byte(f) == b"":
            raise InputError(f"{path}: the file is empty; remove it from the sources")


def first_byte(f: Any) -> bytes:
    """The first byte that is not whitespace or a UTF-8 byte-order mark, or b"" at end of file."""
    start = True
    while chunk := f.read(1 << 16):
        if start and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
        start = False
        stripped = chunk.lstrip(_WHITESPACE)
        if stripped:
            return bytes(stripped[:1])
    return b""


def leading_lines(f: Any) -> Iterator[bytes]:
    """Up to SNIFF_LINES non-empty lines from the start of a binary file, stripped; a line is cut at _SNIFF_BYTES."""
    found = 0
    bounded_json.skip_bom(f)
    while (read := bounded_json.read_line(f, _SNIFF_BYTES)) is not None:
        stripped = read[0].strip(_WHITESPACE)
        if not stripped:
            continue
        yield stripped
        found += 1
        if found == SNIFF_LINES:
            return


# ---------------------------------------------------------------------------------------------------------------
# JSON: lines, one array, or one document

# ---------------------------------------------------------------------------------------------------------------
# JSON: lines, one array, or one document


def json_layout(path: Path) -> Layout:
    """How a JSON file holds its records: one array, one object per line, or one (pretty-printed) document."""
    with path.open("rb") as f:
        if first_byte(f) == b"[":
            return "array"
        f.seek(0)
        lines = list(leading_lines(f))
    if _is_json(lines[0]):
        return "lines"
    if lines[0] == b"{":  # json.dump(indent=...) opens every document on a line of its own
        return "document"
    if any(_is_json(line) or len(line) >= _SNIFF_BYTES for line in lines):
        # JSON lines whose first record is malformed, or a line too long to sniff: a record of JSON lines, or a
        # minified one-line document, which reads as the same one record either way.
        return "lines"
    return "document"


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def iter_json_items(path: Path, max_bytes: int) -> Iterator[Item]:
    match json_layout(path):
        case "array":
            return _iter_array(path, max_bytes)
        case "lines":
            return _iter_lines(path, max_bytes)
        case "document":
            return iter([read_document(path, index=0, max_bytes=max_bytes)])


def _iter_lines(path: Path, max_bytes: int) -> Iterator[Item]:
    for number, line in record_lines(path, max_bytes):
        yield line if isinstance(line, Item) else parse_line(number, line)


def record_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes | Item]]:
    """(line number, bytes) of every non-blank line: the records of a JSON-lines file, not yet parsed. A line over
    ``max_bytes`` comes as its refused Item (too_large), with only its first bytes read into memory."""
    with path.open("rb") as f:
        bounded_json.skip_bom(f)
        number = -1
        while (read := bounded_json.read_line(f, max_bytes)) is not None:
            number += 1
            line, size = read
            if size > max_bytes:
                raw = line[: RAW_LIMIT * 4].decode("utf-8", errors="replace")
                detail = f"line of {size} bytes > max_record_bytes {max_bytes}; not parsed"
                yield number, Item(index=number, value=None, raw=raw, error=detail, reason="too_large")
            elif line.strip(_WHITESPACE):  # a blank line is no record; the line numbering of the others is kept
                yield number, line


def parse_line(number: int, line: bytes) -> Item:
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
        return Item(index=number, value=None, raw=raw, error=f"line is not UTF-8 ({error.reason})")
    try:
        value = _loads_line(text)
    except json.JSONDecodeError as error:
        return Item(index=number, value=None, raw=text, error=f"not JSON: {error.msg} at column {error.colno}")
    except RecursionError:
        return Item(index=number, value=None, raw=text, error=f"not JSON: {DEEP}")
    return Item(index=number, value=value, raw=text)


def _loads_line(text: str) -> Any:
    """Parse one JSON line: orjson (about 3x faster), and the standard library for whatever orjson refuses.

    The standard library decides what is an error and how it is worded (NaN, lone surrogates and integers over
    64 bits parse there, not in orjson), so records and reject messages are the same as with json.loads alone.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _iter_array(path: Path, max_bytes: int) -> Iterator[Item]:
    with path.open("rb") as f:
        items = bounded_json.iter_array(bounded_json.skip_bom(f), max_bytes, MAX_DEPTH)
        index = 0
        while True:
            try:
                built = next(items)
            except StopIteration:
                return
            except (ijson.JSONError, UnicodeDecodeError) as error:
                # The array itself is broken: nothing after this point can be located, so the file is unusable.
                raise InputError(
                    f"{path}: the JSON array is broken after record {index}: {first_line(error)}; "
                    f"fix the file or convert it to JSON lines"
                ) from error
            yield _built_item(index, built)
            index += 1


def _built_item(index: int, built: bounded_json.Built) -> Item:
    if built.reason:
        return Item(index=index, value=None, raw="", error=built.detail, reason=built.reason)
    return Item(index=index, value=built.value, raw=None)


def read_document(path: Path, *, index: int, max_bytes: int, where: str = "") -> Item:
    size = path.stat().st_size
    if size > max_bytes:
        with path.open("rb") as f:
            raw = f.read(RAW_LIMIT * 4).decode("utf-8", errors="replace")
        detail = f"file of {size} bytes > max_record_bytes {max_bytes}; not parsed"
        return Item(index=index, value=None, raw=raw, error=detail, reason="too_large", where=where)
    data = path.read_bytes()
    raw = data.decode("utf-8", errors="replace")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return Item(index=index, value=None, raw=raw, error=f"not JSON: {first_line(error)}", where=where)
    except RecursionError:
        return Item(index=index, value=None, raw=raw, error=f"not JSON: {DEEP}", where=where)
    return Item(index=index, value=value, raw=raw, where=where)
