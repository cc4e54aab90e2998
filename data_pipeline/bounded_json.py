"""JSON read with bounds: one record's size and nesting are checked while it streams, before it is built.

What the format readers (data_pipeline/formats/) need to read any bytes without one record costing more than its bound:

- ``read_line``: one line of a JSON-lines file, read in pieces; a line over the bound is skipped to its end and
  only its first bytes and its size come back.
- ``iter_array`` / ``iter_scenarios``: the elements of a top-level JSON array, the items of a Safety-Prompts
  object, built from ijson's ``basic_parse`` events (yajl2_c) by ``build``, which counts the characters of the
  strings and keys (plus one per value) and the depth as the events arrive, and stops building past either
  bound. ijson's own ``items``/``parse`` keep a dotted prefix per level, which costs the square of the depth
  (100,000 nested ``[`` take tens of GB); ``basic_parse`` keeps none.
- ``peek_keys``: the keys of the first record, for format detection, from the same events.

Errors of the JSON text itself (ijson.JSONError, UnicodeDecodeError) propagate: the callers know the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import ijson

T = TypeVar("T")
BOM = b"\xef\xbb\xbf"
_READ = 1 << 20
"""Bytes read at a time while skipping the rest of an overlong line."""


@dataclass(frozen=True, kw_only=True)
class Built:
    """One record built from events, or why it was not: ``reason`` (too_large, malformed_json) and ``detail``."""

    value: Any = None
    reason: str = ""
    detail: str = ""
    size: int = 0
    """Characters of its strings and keys plus one per value: a lower bound on its JSON text's bytes."""


def skip_bom(f: BinaryIO) -> BinaryIO:
    """Position ``f`` after a UTF-8 byte-order mark at its start, if it has one."""
    if f.read(len(BOM)) != BOM:
        f.seek(0)
    return f


def read_line(f: BinaryIO, max_bytes: int) -> tuple[bytes, int] | None:
    """The next line of ``f`` and its size without the line break; None at end of file.

    A line longer than ``max_bytes`` is read on to its end in pieces and dropped: its first ``max_bytes`` bytes
    come back, with its full size, so the caller can tell (size > max_bytes) and never holds more."""
    line = f.readline(max_bytes + 2)  # + "\r\n"
    if not line:
        return None
    if line.endswith(b"\n"):
        return line, len(line.rstrip(b"\r\n"))
    size = len(line)
    if size <= max_bytes:
        return line, size  # the last line, without a line break
    while piece := f.readline(_READ):
        size += len(piece.rstrip(b"\r\n"))
        if piece.endswith(b"\n"):
            break
    return line[:max_bytes], size


def build(events: Iterator[tuple[str, Any]], first: tuple[str, Any], max_bytes: int, max_depth: int) -> Built:
    """Build the value that starts with event ``first`` from ``events``, consuming exactly its events.

    Past ``max_bytes`` (see Built.size) or ``max_depth`` levels the partial value is dropped and the remaining
    events are only counted, so a refused record costs its largest single string at most."""
    stack: list[Any] = []
    keys: list[Any] = []
    size, depth, refused = 0, 0, ""
    event, value = first
    while True:
        size += 1 + (len(value) if isinstance(value, str) else 0)
        if not refused and size > max_bytes:
            refused, stack, keys = "too_large", [], []
        if event in ("start_map", "start_array"):
            depth += 1
            if not refused and depth > max_depth:
                refused, stack, keys = "malformed_json", [], []
            if not refused:
                stack.append({} if event == "start_map" else [])
                keys.append(None)
        elif event in ("end_map", "end_array"):
            depth -= 1
            if not refused:
                keys.pop()
                done = stack.pop()
                if not stack:
                    return Built(value=done, size=size)
                _add(stack, keys, done)
        elif event == "map_key":
            if not refused:
                keys[-1] = value
        elif not refused:
            if not stack:
                return Built(value=value, size=size)
            _add(stack, keys, value)
        if depth == 0:
            break
        event, value = next(events)
    if refused == "too_large":
        return Built(reason=refused, detail=f"over {max_bytes} bytes (max_record_bytes)", size=size)
    return Built(reason=refused, detail=f"nested deeper than {max_depth} levels", size=size)


def _add(stack: list[Any], keys: list[Any], value: Any) -> None:
    top = stack[-1]
    if isinstance(top, dict):
        top[keys[-1]] = value
    else:
        top.append(value)


def _with_fallback(f: BinaryIO, read: Callable[[Iterator[tuple[str, Any]]], Iterator[T]]) -> Iterator[T]:
    """``read`` over yajl2_c's events of ``f``; from where a UnicodeDecodeError stops them, over the Python backend's.

    yajl turns a lone low surrogate escape (``"\\udfff"``, valid JSON) into bytes no UTF-8 decoder takes, which
    would end the whole file; ijson's Python backend reads it as the standard library does (a str with the
    surrogate, which the readers then reject as invalid_unicode). Bytes that are not UTF-8 fail there too."""
    start = f.tell()
    done = 0
    try:
        for value in read(ijson.basic_parse(f, use_float=True)):
            yield value
            done += 1
    except UnicodeDecodeError:
        f.seek(start)
        for number, value in enumerate(read(ijson.get_backend("python").basic_parse(f, use_float=True))):
            if number >= done:
                yield value


def iter_array(f: BinaryIO, max_bytes: int, max_depth: int) -> Iterator[Built]:
    """The elements of the JSON array that ``f`` holds, in order (``f`` positioned at it)."""

    def read(events: Iterator[tuple[str, Any]]) -> Iterator[Built]:
        if next(events, ("", None))[0] != "start_array":
            raise ijson.JSONError("the file does not hold a JSON array")
        for event in events:
            if event[0] == "end_array":
                return
            yield build(events, event, max_bytes, max_depth)

    return _with_fallback(f, read)


def iter_scenarios(f: BinaryIO, max_bytes: int, max_depth: int) -> Iterator[tuple[str, bool, Built]]:
    """(key, is an element of a list, record) for a JSON object of key -> list of records (Safety-Prompts).

    A value that is a list yields one record per element; any other value yields itself, with False."""
    return _with_fallback(f, lambda events: _scenarios(events, max_bytes, max_depth))


def _scenarios(events: Iterator[tuple[str, Any]], max_bytes: int, max_depth: int) -> Iterator[tuple[str, bool, Built]]:
    if next(events, ("", None))[0] != "start_map":
        raise ijson.JSONError("the file does not hold a JSON object")
    for event, key in events:
        if event == "end_map":
            return
        first = next(events)
        if first[0] != "start_array":
            yield key, False, build(events, first, max_bytes, max_depth)
            continue
        for element in events:
            if element[0] == "end_array":
                break
            yield key, True, build(events, element, max_bytes, max_depth)


def peek_keys(f: BinaryIO, keys: list[str], item_keys: list[str]) -> bool:
    """Fill ``keys`` with the keys of the first record (the top object, or the first element of a top array) and
    ``item_keys`` with those of the first element of its first value when that is a list of objects (how a
    Safety-Prompts object shows); False when the file starts with neither. Stops once a Safety-Prompts shape is
    seen (such a file may be one huge line). The lists keep what was seen when the JSON breaks part way."""
    events = ijson.basic_parse(f, multiple_values=True, use_float=True)
    match next(events, ("", None))[0]:
        case "start_map":
            pass
        case "start_array":
            if next(events, ("", None))[0] != "start_map":
                return False
        case _:
            return False
    # phase: where the first value's first element stands: value (its first event next), element (the list's
    # first event next), keys (inside that element), done.
    depth, phase = 1, "done"
    for event, value in events:
        if event in ("end_map", "end_array"):
            depth -= 1
            if depth == 0:
                break
            if phase == "keys" and depth == 2:
                phase = "done"
                if {"prompt", "response"} <= set(item_keys) and len(keys) == 1:
                    break
            continue
        if depth == 1 and event == "map_key":
            keys.append(value)
            phase = "value" if len(keys) == 1 else "done"
            continue
        if phase == "value":
            phase = "element" if event == "start_array" else "done"
        elif phase == "element":
            phase = "keys" if event == "start_map" else "done"
        elif phase == "keys" and depth == 3 and event == "map_key":
            item_keys.append(value)
        if event in ("start_map", "start_array"):
            depth += 1
    return True
