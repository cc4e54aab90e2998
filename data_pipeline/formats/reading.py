"""The readers' public API: every record of a source, as the format named for it reads it, in file order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.formats.convert import convert_item
from data_pipeline.formats.readers import (
    iter_json_items,
    json_layout,
    parse_line,
    record_lines,
    require_exists,
    require_nonempty,
)
from data_pipeline.formats.records import MAX_RECORD_BYTES
from data_pipeline.formats.registry import lookup, spec_of
from sft_stack.chat.conversation import InputError, Record


def read_records(
    path: Path, fmt: str, max_bytes: int = MAX_RECORD_BYTES, columns: Mapping[str, str] | None = None
) -> Iterator[Record]:
    """Yield one Conversation, Text or Reject per record of ``path`` read as ``fmt``, in file order.

    Every record carries ``source=str(path)`` and a stable ``index``: line number - 1 for JSON lines, array index
    for a JSON array, running index across scenarios for safety, data-row index for csv, sorted-file index for a
    MOSS directory. Problems with the whole input (missing file, unknown format, a csv without a prompt,output
    header, a JSON array broken mid-file) raise InputError; problems with one record yield a Reject.

    A record over ``max_bytes`` is rejected as ``too_large`` before it is parsed: a JSON line, a document (a MOSS
    file, a .txt file) by its bytes, without reading it whole; an element of a JSON array or of a safety scenario
    while it streams, by the characters of its strings and keys (plus one per value), so at most its largest single
    string is held; a csv row by its fields' characters. Nesting deeper than MAX_DEPTH, and text holding lone
    UTF-16 surrogates (valid JSON escapes, but no text a tokenizer encodes), are rejected too. ``columns``
    (field -> column, JSON-record formats only) renames a record's columns to the fields ``fmt`` reads.
    """
    path = Path(path)
    spec = spec_of(fmt, path)
    require_exists(path)
    if path.is_dir():
        if spec.read_directory is None:
            raise InputError(f"{path} is a directory; only the moss format reads directories; pass a file instead")
        return spec.read_directory(path, max_bytes)
    require_nonempty(path)
    if spec.read_file is not None and spec.reads_whole_file(path):
        return spec.read_file(path, max_bytes)
    source, mapping = str(path), tuple((columns or {}).items())
    return (convert_item(spec, item, source, mapping) for item in iter_json_items(path, max_bytes))


@dataclass(frozen=True, kw_only=True)
class Line:
    """One record of a JSON-lines file, read but not parsed: ``convert_line`` turns it into what ``read_records``
    yields for it. prepare hands lines to the process that tokenizes them, so its reading process stays cheap."""

    source: str
    fmt: str
    index: int
    """The line number - 1, as the record's index."""
    data: bytes
    columns: tuple[tuple[str, str], ...] = ()
    """The source's column mapping, (field, column) pairs."""


def read_lines(
    path: Path, fmt: str, max_bytes: int = MAX_RECORD_BYTES, columns: Mapping[str, str] | None = None
) -> Iterator[Line | Record] | None:
    """The records of ``path`` as unparsed Lines when it is a JSON-lines file read as ``fmt``, else None.

    ``convert_line`` of each yields exactly the records ``read_records(path, fmt)`` yields, in the same order. A
    line over ``max_bytes`` comes as its Reject (too_large), never read whole."""
    path = Path(path)
    spec = lookup(fmt)
    if spec is None or spec.convert is None or spec.reads_whole_file(path):
        return None
    if not path.is_file() or path.stat().st_size == 0 or json_layout(path) != "lines":
        return None
    source, mapping = str(path), tuple((columns or {}).items())
    return (
        Line(source=source, fmt=fmt, index=number, data=line, columns=mapping)
        if isinstance(line, bytes)
        else convert_item(spec, line, source, mapping)
        for number, line in record_lines(path, max_bytes)
    )


def convert_line(line: Line) -> Record:
    """The Conversation, Text or Reject that ``read_records`` yields for this line."""
    return convert_item(spec_of(line.fmt, line.source), parse_line(line.index, line.data), line.source, line.columns)
