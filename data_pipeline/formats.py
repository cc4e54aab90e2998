"""Format readers: SFT corpus files, as published, streamed into normalized records.

``detect_format`` names the format of a file from its extension and its first record; ``read_records`` yields one
:class:`Conversation`, :class:`Text` or :class:`Reject` per source record, in file order, and never holds a whole
corpus in memory: JSON lines are read line by line, a JSON array item by item (ijson), a Safety-Prompts object
scenario by scenario (``ijson.kvitems``), CSV row by row. docs/formats.md has an example of every format, the
reject reasons, and the MOSS plugin rule.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ijson
import orjson

from data_pipeline import bounded_json
from sft_stack.chat.conversation import (
    Conversation,
    InputError,
    Message,
    Record,
    Reject,
    Role,
    Text,
    ToolCall,
    tool_schemas,
)

FORMATS: tuple[str, ...] = (
    "alpaca",
    "firefly",
    "moss",
    "conversation",
    "sharegpt",
    "messages",
    "safety",
    "csv",
    "text",
)
"""Every format name ``--format`` accepts, in the order docs/formats.md lists them."""

COLUMN_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "firefly": ("input", "target"),
    "moss": ("meta_instruction", "chat"),
    "conversation": ("conversation", "system"),
    "sharegpt": ("conversations", "system", "tools"),
    "messages": ("messages", "tools"),
    "text": ("text",),
}
"""The record fields each JSON-record format reads: what a source's column mapping (``field=column``) may name."""

REJECT_REASONS: tuple[str, ...] = (
    "malformed_json",
    "malformed_csv",
    "missing_field",
    "non_string_field",
    "empty_user",
    "empty_assistant",
    "empty_text",
    "wrong_role_order",
    "unknown_role",
    "unsupported_role",
    "unsupported_content",
    "malformed_tools",
    "malformed_tool_call",
    "multimodal",
    "too_large",
    "invalid_unicode",
)
"""Every ``Reject.reason`` a reader can give. Stable keys: manifests and rejects.jsonl count by them."""

RAW_LIMIT = 500
"""Characters of the raw record a Reject keeps (the rest is cut and the cut length noted)."""

_SNIFF_LINES = 20
"""Leading non-empty lines looked at when the first one is not JSON (a malformed first record)."""
_SNIFF_BYTES = 1 << 20
"""Bytes of each leading line kept for detection; a longer line is cut there (and is a record of a JSON-lines file)."""

MAX_RECORD_BYTES = 4 << 20
"""Default bound on one record's size (PrepareOptions.max_record_bytes); see ``read_records``."""
MAX_DEPTH = 512
"""Deepest nesting of arrays and objects a record may have; deeper ones are rejected as malformed_json. Python's
own parser and printer recurse once per level (about 1,000 levels at most); real records nest under 20."""
_DEEP = "nested deeper than Python's JSON parser allows"

_WHITESPACE = b" \t\r\n"
_BOM = bounded_json.BOM

# ShareGPT dumps name the speakers many ways; these are the ones that mean a plain chat role.
_SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    # Tool results: LLaMA-Factory's/glaive's "observation", ChatGLM3's "observation" and OpenAI-style "tool".
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
_MESSAGES_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # OpenAI's legacy name for a function's result
    "ipython": "tool",  # Llama 3.1's name for a tool's result
}
# Tool-use roles seen in published data whose shape no reader here knows (a call or a result with no fixed schema).
_TOOL_ROLES = frozenset({"tool_call", "tool_response"})
_MEDIA_FIELDS = ("images", "videos", "audios")
_MEDIA_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
_MEDIA_PARTS = frozenset({"image_url", "image", "input_audio", "audio", "video", "video_url", "file"})

_MOSS_PLUGIN_FIELDS = ("Inner Thoughts", "Commands", "Tool Responses")
_MOSS_START = re.compile(r"\A<\|[^|<>]+\|>: ?")  # <|Human|>: , <|MOSS|>: , <|Results|>:
_MOSS_END = re.compile(r"<eo[a-z]>\s*\Z")  # <eoh> <eom> <eot> <eoc> <eor>, then the newline after it
_MOSS_TURN = re.compile(r"\Aturn_(\d+)\Z")
_MOSS_COMMAND = re.compile(r"\s*([A-Za-z_][\w.]*)\(")  # Search("...") Calculate("...") Text2Image("...")

Layout = Literal["array", "lines", "document"]
Turn = tuple[Role, str] | Message
"""What a record converter yields per message: (role, text) for plain text, a Message when it carries tool use."""


class _Refused(Exception):
    """Raised inside a converter: the record cannot be used, for ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class _Item:
    """One parsed JSON record before conversion."""

    index: int
    value: Any
    raw: str | None
    """The record as read (a JSON line, a file's text); None when only the parsed value exists (array items)."""
    error: str | None = None
    """Why the record could not be parsed; ``value`` is None then."""
    reason: str = "malformed_json"
    """The reject reason when ``error`` is set: malformed_json, or too_large for a record over the size bound."""
    where: str = ""
    """Prefix for a Reject's detail, e.g. the file name inside a MOSS directory."""


# ---------------------------------------------------------------------------------------------------------------
# Public API


def detect_format(path: Path, columns: Mapping[str, str] | None = None) -> str:
    """The format of ``path``: by extension for .csv/.txt, else by the keys of its first JSON record, seen through
    the source's column mapping (``columns``: field -> the column that holds it) when it has one.

    A directory is a MOSS directory (one conversation object per .json file). Raises InputError, in one line that
    names the file and the formats known, when the file is missing, empty, or its first record fits no format.
    """
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        return _detect_directory(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".txt":
        return "text"
    _require_nonempty(path)
    shape = _peek_first_record(path)
    if shape is None:
        raise InputError(
            f"{path}: cannot tell its format: none of its first {_SNIFF_LINES} records is a JSON object; "
            f"known formats: {', '.join(FORMATS)} (.csv and .txt by extension); fix the file or pass --format NAME"
        )
    keys, item_keys = shape
    keys |= {field for field, column in (columns or {}).items() if column in keys}
    fmt = _format_from_keys(keys, item_keys)
    if fmt is None:
        shown = ", ".join(sorted(keys)[:12]) or "none"
        raise InputError(
            f"{path}: cannot tell its format from the first record (keys: {shown}); known formats: "
            f"{', '.join(FORMATS)}; see docs/formats.md, pass --format NAME, or map its columns "
            f"(--columns instruction=question,output=answer)"
        )
    return fmt


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
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} for {path}; known formats: {', '.join(FORMATS)}")
    _require_exists(path)
    if path.is_dir():
        if fmt != "moss":
            raise InputError(f"{path} is a directory; only the moss format reads directories; pass a file instead")
        return _read_moss_directory(path, max_bytes)
    _require_nonempty(path)
    match fmt:
        case "csv":
            return _read_csv(path, _csv_columns(path), max_bytes)
        case "text" if path.suffix.lower() == ".txt":
            return _read_txt(path, max_bytes)
        case "safety":
            return _read_safety(path, max_bytes)
        case _:
            return _convert_items(path, fmt, _iter_json_items(path, max_bytes), tuple((columns or {}).items()))


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
    is_json_reader = (
        fmt in FORMATS and fmt not in ("csv", "safety") and not (fmt == "text" and path.suffix.lower() == ".txt")
    )
    if not is_json_reader or not path.is_file() or path.stat().st_size == 0 or _json_layout(path) != "lines":
        return None
    source, mapping = str(path), tuple((columns or {}).items())
    return (
        Line(source=source, fmt=fmt, index=number, data=line, columns=mapping)
        if isinstance(line, bytes)
        else _convert_item(fmt, line, source, mapping)
        for number, line in _record_lines(path, max_bytes)
    )


def convert_line(line: Line) -> Record:
    """The Conversation, Text or Reject that ``read_records`` yields for this line."""
    return _convert_item(line.fmt, _parse_line(line.index, line.data), line.source, line.columns)


# ---------------------------------------------------------------------------------------------------------------
# Input checks and detection


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the --source path")


def _require_nonempty(path: Path) -> None:
    with path.open("rb") as f:
        if _first_byte(f) == b"":
            raise InputError(f"{path}: the file is empty; remove it from the sources")


def _first_byte(f: Any) -> bytes:
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


def _detect_directory(path: Path) -> str:
    files = _moss_files(path)
    if not files:
        raise InputError(f"{path} is a directory without .json files; a directory source must hold MOSS .json files")
    shape = _peek_first_record(files[0])
    if shape is None or _format_from_keys(*shape) != "moss":
        raise InputError(
            f"{path} is a directory, which only the moss format reads, but {files[0].name} is not a MOSS "
            f"conversation (meta_instruction, chat); pass a file instead"
        )
    return "moss"


def _format_from_keys(keys: frozenset[str], item_keys: frozenset[str]) -> str | None:
    """The format whose record has these keys; ``item_keys``: keys of the first element of the first list value."""
    if {"meta_instruction", "chat"} <= keys:
        return "moss"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "conversation" in keys:
        return "conversation"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"input", "target"} <= keys:
        return "firefly"
    if "text" in keys:
        return "text"
    if {"prompt", "response"} <= item_keys:
        return "safety"
    return None


def _peek_first_record(path: Path) -> tuple[frozenset[str], frozenset[str]] | None:
    """Keys of the first record (the top object, or the first element of a top array), streamed.

    Also the keys of the first element of its first value when that is a list of objects, which is how a
    Safety-Prompts object (scenario -> [{prompt, response, type}]) shows. Falls back to the first lines that
    parse when the very first record is broken before its keys tell the format. None when no record can be read.
    """
    keys: list[str] = []
    item_keys: list[str] = []
    try:
        with path.open("rb") as f:
            if bounded_json.peek_keys(bounded_json.skip_bom(f), keys, item_keys):
                return frozenset(keys), frozenset(item_keys)
    except (ijson.JSONError, UnicodeDecodeError):
        # A record broken after its keys still says what it is (its reader then rejects it as malformed_json).
        shape = frozenset(keys), frozenset(item_keys)
        if _format_from_keys(*shape) is not None:
            return shape
    with path.open("rb") as f:
        for line in _leading_lines(f):
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(value, dict):
                return frozenset(value), _first_item_keys(value)
    return None


def _first_item_keys(record: dict[str, Any]) -> frozenset[str]:
    for value in record.values():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return frozenset(value[0])
        break
    return frozenset()


def _leading_lines(f: Any) -> Iterator[bytes]:
    """Up to _SNIFF_LINES non-empty lines from the start of a binary file, stripped; a line is cut at _SNIFF_BYTES."""
    found = 0
    bounded_json.skip_bom(f)
    while (read := bounded_json.read_line(f, _SNIFF_BYTES)) is not None:
        stripped = read[0].strip(_WHITESPACE)
        if not stripped:
            continue
        yield stripped
        found += 1
        if found == _SNIFF_LINES:
            return


# ---------------------------------------------------------------------------------------------------------------
# JSON: lines, one array, or one document


def _json_layout(path: Path) -> Layout:
    """How a JSON file holds its records: one array, one object per line, or one (pretty-printed) document."""
    with path.open("rb") as f:
        if _first_byte(f) == b"[":
            return "array"
        f.seek(0)
        lines = list(_leading_lines(f))
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


def _iter_json_items(path: Path, max_bytes: int) -> Iterator[_Item]:
    match _json_layout(path):
        case "array":
            return _iter_array(path, max_bytes)
        case "lines":
            return _iter_lines(path, max_bytes)
        case "document":
            return iter([_read_document(path, index=0, max_bytes=max_bytes)])


def _iter_lines(path: Path, max_bytes: int) -> Iterator[_Item]:
    for number, line in _record_lines(path, max_bytes):
        yield line if isinstance(line, _Item) else _parse_line(number, line)


def _record_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes | _Item]]:
    """(line number, bytes) of every non-blank line: the records of a JSON-lines file, not yet parsed. A line over
    ``max_bytes`` comes as its refused _Item (too_large), with only its first bytes read into memory."""
    with path.open("rb") as f:
        bounded_json.skip_bom(f)
        number = -1
        while (read := bounded_json.read_line(f, max_bytes)) is not None:
            number += 1
            line, size = read
            if size > max_bytes:
                raw = line[: RAW_LIMIT * 4].decode("utf-8", errors="replace")
                detail = f"line of {size} bytes > max_record_bytes {max_bytes}; not parsed"
                yield number, _Item(index=number, value=None, raw=raw, error=detail, reason="too_large")
            elif line.strip(_WHITESPACE):  # a blank line is no record; the line numbering of the others is kept
                yield number, line


def _parse_line(number: int, line: bytes) -> _Item:
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
        return _Item(index=number, value=None, raw=raw, error=f"line is not UTF-8 ({error.reason})")
    try:
        value = _loads_line(text)
    except json.JSONDecodeError as error:
        return _Item(index=number, value=None, raw=text, error=f"not JSON: {error.msg} at column {error.colno}")
    except RecursionError:
        return _Item(index=number, value=None, raw=text, error=f"not JSON: {_DEEP}")
    return _Item(index=number, value=value, raw=text)


def _loads_line(text: str) -> Any:
    """Parse one JSON line: orjson (about 3x faster), and the standard library for whatever orjson refuses.

    The standard library decides what is an error and how it is worded (NaN, lone surrogates and integers over
    64 bits parse there, not in orjson), so records and reject messages are the same as with json.loads alone.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _iter_array(path: Path, max_bytes: int) -> Iterator[_Item]:
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
                    f"{path}: the JSON array is broken after record {index}: {_first_line(error)}; "
                    f"fix the file or convert it to JSON lines"
                ) from error
            yield _built_item(index, built)
            index += 1


def _built_item(index: int, built: bounded_json.Built) -> _Item:
    if built.reason:
        return _Item(index=index, value=None, raw="", error=built.detail, reason=built.reason)
    return _Item(index=index, value=built.value, raw=None)


def _read_document(path: Path, *, index: int, max_bytes: int, where: str = "") -> _Item:
    size = path.stat().st_size
    if size > max_bytes:
        with path.open("rb") as f:
            raw = f.read(RAW_LIMIT * 4).decode("utf-8", errors="replace")
        detail = f"file of {size} bytes > max_record_bytes {max_bytes}; not parsed"
        return _Item(index=index, value=None, raw=raw, error=detail, reason="too_large", where=where)
    data = path.read_bytes()
    raw = data.decode("utf-8", errors="replace")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return _Item(index=index, value=None, raw=raw, error=f"not JSON: {_first_line(error)}", where=where)
    except RecursionError:
        return _Item(index=index, value=None, raw=raw, error=f"not JSON: {_DEEP}", where=where)
    return _Item(index=index, value=value, raw=raw, where=where)


def _convert_items(
    path: Path, fmt: str, items: Iterator[_Item], columns: tuple[tuple[str, str], ...] = ()
) -> Iterator[Record]:
    source = str(path)
    for item in items:
        yield _convert_item(fmt, item, source, columns)


def _convert_item(fmt: str, item: _Item, source: str, columns: tuple[tuple[str, str], ...] = ()) -> Record:
    try:
        if item.error is not None:
            raise _Refused(item.reason, item.error)
        if not isinstance(item.value, dict):
            raise _Refused("malformed_json", f"expected a JSON object, got {_type_name(item.value)}")
        _refuse_media_fields(item.value)
        return _checked_unicode(_convert(fmt, _mapped(item.value, columns), source, item.index))
    except RecursionError:
        # Parsed (orjson reads up to 1,024 levels), but deeper than the standard library's printer goes.
        refused = _Refused("malformed_json", _DEEP)
    except _Refused as caught:
        refused = caught
    return Reject(
        reason=refused.reason,
        source=source,
        index=item.index,
        raw=_truncate(item.raw if item.raw is not None else _safe_dump(item.value)),
        detail=item.where + refused.detail,
    )


def _safe_dump(value: Any) -> str:
    try:
        return _dump(value)
    except RecursionError:
        return f"[a JSON value {_DEEP}]"


def _checked_unicode(record: Conversation | Text) -> Conversation | Text:
    """``record``, or _Refused(invalid_unicode) when a string of it holds a lone UTF-16 surrogate: "\\ud800" is a
    valid JSON escape (the standard library parses it), but no UTF-8 text, so no tokenizer can encode it."""
    if isinstance(record, Text):
        strings: list[str] = [record.text]
    else:
        strings = [*record.tools]
        for m in record.messages:
            strings += [m.content, m.name, *(part for c in m.tool_calls for part in (c.name, c.arguments))]
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _Refused(
                "invalid_unicode",
                f"a lone UTF-16 surrogate \\u{ord(text[error.start]):04x} at character {error.start} of "
                f"{text[max(0, error.start - 20) : error.start]!r}...: valid JSON, but not text; fix the source",
            ) from None
    return record


def _mapped(record: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The record with each mapped field taken from its column; a column the record lacks refuses it."""
    if not columns:
        return record
    mapped = dict(record)
    for field, column in columns:
        if column not in record:
            raise _Refused("missing_field", f"no {column!r} column (mapped to {field}); the record has {_keys(record)}")
        mapped[field] = record[column]
    return mapped


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)[:12]) or "no keys"


def _convert(fmt: str, record: dict[str, Any], source: str, index: int) -> Conversation | Text:
    turns: list[Turn]
    tools: tuple[str, ...] = ()
    match fmt:
        case "alpaca":
            turns = _alpaca_turns(record)
        case "firefly":
            turns = [("user", _text_field(record, "input")), ("assistant", _text_field(record, "target"))]
        case "moss":
            turns = _moss_turns(record)
        case "conversation":
            turns = _conversation_turns(record)
        case "sharegpt":
            turns, tools = _sharegpt_turns(record), _tools_field(record)
        case "messages":
            turns, tools = _messages_turns(record), _tools_field(record)
        case "text":
            return _text_record(_text_field(record, "text"), source, index)
        case _:
            raise AssertionError(f"format {fmt} has no JSON record converter")
    messages, dropped = _validated(turns)
    return Conversation(messages=messages, source=source, index=index, tools=tools, dropped_turns=dropped)


# ---------------------------------------------------------------------------------------------------------------
# Record converters: a published record -> [(role, text), ...]; they raise _Refused


def _alpaca_turns(record: dict[str, Any]) -> list[Turn]:
    instruction = _text_field(record, "instruction")
    query = _optional_text(record, "input")
    output = _text_field(record, "output")
    turns: list[Turn] = list(_system_turn(record, "system"))
    # LLaMA-Factory's alpaca form: earlier rounds as [[user, assistant], ...] before the instruction.
    for number, pair in enumerate(_optional_list(record, "history")):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Refused("non_string_field", f"history[{number}] is not a [user, assistant] pair")
        for part in pair:
            if not isinstance(part, str):
                raise _Refused("non_string_field", f"history[{number}] holds {_type_name(part)}, not a string")
        turns += [("user", pair[0]), ("assistant", pair[1])]
    user = f"{instruction}\n{query}" if query else instruction
    return [*turns, ("user", user), ("assistant", output)]


def _moss_turns(record: dict[str, Any]) -> list[Turn]:
    system = _text_field(record, "meta_instruction")
    turns: list[Turn] = [("system", system)] if system.strip() else []
    chat = record.get("chat")
    if not isinstance(chat, dict):
        reason = "missing_field" if chat is None else "non_string_field"
        raise _Refused(reason, f"'chat' is {_type_name(chat)}, not an object of turn_N")
    names = []
    for name in chat:
        match = _MOSS_TURN.match(name)
        if match is None:
            raise _Refused("missing_field", f"chat key {name!r} is not turn_N")
        names.append((int(match.group(1)), name))
    for _, name in sorted(names):
        turn = chat[name]
        if not isinstance(turn, dict):
            raise _Refused("non_string_field", f"chat.{name} is {_type_name(turn)}, not an object")
        where = f"chat.{name}."
        turns.append(("user", _strip_moss_markers(_text_field(turn, "Human", where))))
        plugin = {field: _moss_plugin_text(turn, field, where) for field in _MOSS_PLUGIN_FIELDS}
        if plugin["Commands"]:
            # A plugin turn, as MOSS's fine-tuning trains it: the Inner Thoughts and the Commands are the assistant
            # calling tools, the Tool Responses a tool result (never trained), then the reply.
            if not plugin["Tool Responses"]:
                raise _Refused("malformed_tool_call", f"{where}Commands are given but no Tool Responses")
            calls = _moss_commands(plugin["Commands"], where)
            turns.append(Message(role="assistant", content=plugin["Inner Thoughts"], tool_calls=calls))
            turns.append(Message(role="tool", content=plugin["Tool Responses"]))
        # A turn with Inner Thoughts but no command keeps only its reply (docs/formats.md, MOSS plugin turns).
        turns.append(("assistant", _strip_moss_markers(_text_field(turn, "MOSS", where))))
    return turns


def _moss_plugin_text(turn: dict[str, Any], field: str, where: str) -> str:
    """A plugin field's text without its markers; "" when absent or MOSS's "None" (no plugin used)."""
    value = turn.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Refused("non_string_field", f"{where}{field} is {_type_name(value)}, not a string")
    text = _strip_moss_markers(value).strip()
    return "" if text == "None" else text


def _moss_commands(text: str, where: str) -> tuple[ToolCall, ...]:
    """``Search("a"), Calculate("1+1")`` -> the calls; each call's arguments become JSON text (see ToolCall)."""
    calls: list[ToolCall] = []
    position = 0
    while position < len(text):
        match = _MOSS_COMMAND.match(text, position)
        if match is None:
            raise _Refused("malformed_tool_call", f"{where}Commands: expected Name(...) at {text[position:][:40]!r}")
        end = _closing_paren(text, match.end())
        if end is None:
            raise _Refused("malformed_tool_call", f"{where}Commands: unclosed parenthesis in {text[:80]!r}")
        inner = text[match.end() : end]
        try:
            values = json.loads(f"[{inner}]")
            arguments: Any = values[0] if len(values) == 1 else values
        except json.JSONDecodeError:
            arguments = inner  # not JSON literals (e.g. an unquoted expression): the text itself
        calls.append(ToolCall(name=match.group(1), arguments=_dump(arguments)))
        position = end + 1
        while position < len(text) and text[position] in ", ;\n":
            position += 1
    if not calls:
        raise _Refused("malformed_tool_call", f"{where}Commands holds no command")
    return tuple(calls)


def _closing_paren(text: str, start: int) -> int | None:
    """Index of the ``)`` that closes the parenthesis opened just before ``start``; quotes are skipped."""
    depth, quote, escaped = 1, "", False
    for position in range(start, len(text)):
        char = text[position]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position
    return None


def _strip_moss_markers(value: str) -> str:
    """``<|Human|>: text<eoh>\\n`` -> ``text``; text without the markers is returned as it is."""
    return _MOSS_END.sub("", _MOSS_START.sub("", value, count=1), count=1)


def _conversation_turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = list(_system_turn(record, "system"))
    rounds = _list_field(record, "conversation")
    if not rounds:
        raise _Refused("missing_field", "'conversation' is an empty list")
    for number, pair in enumerate(rounds):
        where = f"conversation[{number}]."
        if not isinstance(pair, dict):
            raise _Refused("non_string_field", f"conversation[{number}] is {_type_name(pair)}, not an object")
        turns += [("user", _text_field(pair, "human", where)), ("assistant", _text_field(pair, "assistant", where))]
    return turns


def _sharegpt_turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = list(_system_turn(record, "system"))
    messages = _list_field(record, "conversations")
    if not messages:
        raise _Refused("missing_field", "'conversations' is an empty list")
    for number, message in enumerate(messages):
        where = f"conversations[{number}]."
        if not isinstance(message, dict):
            raise _Refused("non_string_field", f"conversations[{number}] is {_type_name(message)}, not an object")
        # Some ShareGPT exports (ChatGLM3's among them) use OpenAI's role/content keys inside "conversations".
        role_key, text_key = ("role", "content") if "from" not in message and "role" in message else ("from", "value")
        name = _text_field(message, role_key, where).lower()
        if name == "function_call":
            # LLaMA-Factory: the value is the JSON of one call {"name", "arguments"} or of a list of parallel calls.
            calls = _sharegpt_calls(_text_field(message, text_key, where), where)
            previous = turns[-1] if turns else None
            if isinstance(previous, Message) and previous.tool_calls:
                turns[-1] = Message(role="assistant", content=previous.content, tool_calls=previous.tool_calls + calls)
            else:
                turns.append(Message(role="assistant", content="", tool_calls=calls))
            continue
        if name == "tool" and "parameters" in message:
            # ChatGLM3's tool record: one call and its observation in one entry.
            call = _tool_call({"name": message.get("name"), "arguments": message["parameters"]}, where)
            turns.append(Message(role="assistant", content="", tool_calls=(call,)))
            observation = message.get("observation")
            text = observation if isinstance(observation, str) else _dump(observation)
            turns.append(Message(role="tool", content=text, name=call.name))
            continue
        role = _role(name, _SHAREGPT_ROLES, where)
        text = _text_field(message, text_key, where)
        if role == "system" and not turns and number == 0 and not text.strip():
            continue
        turns.append((role, text))
    return turns


def _sharegpt_calls(value: str, where: str) -> tuple[ToolCall, ...]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise _Refused("malformed_tool_call", f"{where}function_call is not JSON ({error.msg})") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise _Refused("malformed_tool_call", f"{where}function_call is an empty list")
    return tuple(_tool_call(item, where) for item in items)


def _tool_call(item: Any, where: str) -> ToolCall:
    """``{"name", "arguments"}`` (arguments an object, or its JSON text as OpenAI sends it) -> a ToolCall."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]  # OpenAI: {"id", "type": "function", "function": {"name", "arguments"}}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
        raise _Refused("malformed_tool_call", f"{where}a tool call needs a string 'name' (got {_dump(item)[:80]})")
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise _Refused(
                "malformed_tool_call", f"{where}{item['name']}: arguments are not JSON ({error.msg})"
            ) from None
    return ToolCall(name=item["name"], arguments=_dump(arguments))


def _tools_field(record: dict[str, Any]) -> tuple[str, ...]:
    """The ``tools`` of a record (a list, or its JSON text as LLaMA-Factory writes it), each in OpenAI's form."""
    try:
        return tool_schemas(record.get("tools"))
    except ValueError as error:
        raise _Refused("malformed_tools", str(error)) from None


def _messages_turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = []
    messages = _list_field(record, "messages")
    if not messages:
        raise _Refused("missing_field", "'messages' is an empty list")
    for number, message in enumerate(messages):
        where = f"messages[{number}]."
        if not isinstance(message, dict):
            raise _Refused("non_string_field", f"messages[{number}] is {_type_name(message)}, not an object")
        role = _role(_text_field(message, "role", where).lower(), _MESSAGES_ROLES, where)
        calls: tuple[ToolCall, ...] = ()
        raw_calls = message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else [])
        if raw_calls:
            if role != "assistant" or not isinstance(raw_calls, list):
                raise _Refused("malformed_tool_call", f"{where}tool_calls must be a list on an assistant message")
            calls = tuple(_tool_call(call, f"{where}tool_calls[{n}].") for n, call in enumerate(raw_calls))
        text = "" if calls and message.get("content") is None else _message_content(message, where)
        if role == "system" and number == 0 and not text.strip():
            continue
        name = message.get("name") if role == "tool" and isinstance(message.get("name"), str) else ""
        turns.append(Message(role=role, content=text, tool_calls=calls, name=name or ""))
    return turns


def _message_content(message: dict[str, Any], where: str) -> str:
    """A message's text: a string, or a list of text parts joined (OpenAI's multi-part form)."""
    if "content" not in message:
        raise _Refused("missing_field", f"{where}missing 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Refused("non_string_field", f"{where}content is {_type_name(content)}, not a string")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PARTS:
            raise _Refused("multimodal", f"{where}content[{number}] is a {kind} part; media records are not trained")
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = kind if isinstance(kind, str) else _type_name(part)
            raise _Refused("unsupported_content", f"{where}content[{number}] is a {shown} part; only text is rendered")
        texts.append(part["text"])
    return "".join(texts)


def _role(name: str, roles: dict[str, Role], where: str) -> Role:
    if name in roles:
        return roles[name]
    if name in _TOOL_ROLES:
        raise _Refused("unsupported_role", f"{where}role {name!r}: a tool-use role whose record shape is not known")
    raise _Refused("unknown_role", f"{where}role {name!r}; known: {', '.join(sorted(roles))}")


def _refuse_media_fields(record: dict[str, Any]) -> None:
    for field in _MEDIA_FIELDS:
        if record.get(field):
            raise _Refused("multimodal", f"'{field}' lists media files; media records are not trained (text only)")


def _validated(turns: Sequence[Turn]) -> tuple[tuple[Message, ...], int]:
    """Check a Conversation's role order and emptiness rules; return its messages (text kept exactly) and the
    number of trailing unanswered user turns dropped (0 or 1).

    A round is a user message, then zero or more steps of (assistant message, tool results), then an assistant
    message without calls; a message with calls is followed by results. A last user turn that nobody answered is
    dropped, not the record.
    """
    messages = [turn if isinstance(turn, Message) else Message(role=turn[0], content=turn[1]) for turn in turns]
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise _Refused("missing_field", "no user or assistant turn")
    dropped = 0
    if len(body) > 1 and body[-1].role == "user" and body[-2].role == "assistant" and not body[-2].tool_calls:
        body, messages, dropped = body[:-1], messages[:-1], 1
    expected = {"user"}
    for message in body:
        if message.role not in expected:
            raise _Refused(
                "wrong_role_order",
                f"roles {_roles(messages)}: expected an optional system, then rounds of a user turn and an "
                "assistant answer (tool calls each followed by their results), ending with an assistant turn",
            )
        match message.role:
            case "user":
                expected = {"assistant"}
            case "assistant" if message.tool_calls:
                expected = {"tool"}
            case "assistant":
                expected = {"user", "tool"}  # a result after a text-only turn: LLaMA-Factory's rule, real in glaive
            case _:
                expected = {"tool", "assistant"}
    if body[-1].role != "assistant" or body[-1].tool_calls:
        last = "a user turn with no answer" if body[-1].role == "user" else "not a final assistant answer"
        raise _Refused("wrong_role_order", f"roles {_roles(messages)}: the last turn is {last}")
    for position, message in enumerate(body):
        if message.role in ("user", "assistant") and not message.tool_calls and not message.content.strip():
            raise _Refused(f"empty_{message.role}", f"turn {position} ({message.role}) is empty or whitespace")
        if _MEDIA_PLACEHOLDER.search(message.content):
            found = _MEDIA_PLACEHOLDER.search(message.content)
            assert found is not None
            raise _Refused(
                "multimodal",
                f"turn {position} holds the media placeholder {found.group(0)}; media records are not trained",
            )
    return tuple(messages), dropped


def _roles(messages: list[Message]) -> str:
    return ",".join(f"{m.role}+calls" if m.tool_calls else m.role for m in messages)


def _text_record(text: str, source: str, index: int) -> Text:
    if not text.strip():
        raise _Refused("empty_text", "the text is empty or whitespace")
    return Text(text=text, source=source, index=index)


# ---------------------------------------------------------------------------------------------------------------
# Field access


def _text_field(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record:
        raise _Refused("missing_field", f"{where}{key} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise _Refused("non_string_field", f"{where}{key} is {_type_name(value)}, not a string")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str:
    """A text field that may be absent or null (alpaca's input): "" then."""
    if record.get(key) is None:
        return ""
    return _text_field(record, key)


def _system_turn(record: dict[str, Any], key: str) -> list[tuple[Role, str]]:
    """An optional system prompt; empty or whitespace counts as none."""
    system = _optional_text(record, key)
    return [("system", system)] if system.strip() else []


def _list_field(record: dict[str, Any], key: str) -> list[Any]:
    if key not in record:
        raise _Refused("missing_field", f"{key} is missing")
    value = record[key]
    if not isinstance(value, list):
        raise _Refused("non_string_field", f"{key} is {_type_name(value)}, not a list")
    return value


def _optional_list(record: dict[str, Any], key: str) -> list[Any]:
    return [] if record.get(key) is None else _list_field(record, key)


def _type_name(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "a list"
        case dict():
            return "an object"
        case _:
            return type(value).__name__


def _truncate(raw: str) -> str:
    if len(raw) <= RAW_LIMIT:
        return raw
    return f"{raw[:RAW_LIMIT]}...[{len(raw) - RAW_LIMIT} more characters]"


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _first_line(error: Exception) -> str:
    text = str(error)
    if isinstance(error.args[0] if error.args else None, bytes):
        text = error.args[0].decode("utf-8", errors="replace")
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


# ---------------------------------------------------------------------------------------------------------------
# MOSS directories, Safety-Prompts, CSV, plain text


def _moss_files(directory: Path) -> list[Path]:
    """The .json files under a MOSS directory (its category subfolders too), in sorted relative-path order."""
    files = [p for p in directory.rglob("*.json") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def _read_moss_directory(directory: Path, max_bytes: int) -> Iterator[Record]:
    files = _moss_files(directory)
    if not files:
        raise InputError(f"{directory} is a directory without .json files; a moss directory holds one .json per chat")
    items = (
        _read_document(file, index=index, max_bytes=max_bytes, where=f"{file.relative_to(directory).as_posix()}: ")
        for index, file in enumerate(files)
    )
    return _convert_items(directory, "moss", items)


def _read_safety(path: Path, max_bytes: int) -> Iterator[Record]:
    with path.open("rb") as f:
        if _first_byte(f) != b"{":
            raise InputError(
                f"{path}: the safety format is one JSON object mapping scenario -> [{{prompt, response, type}}]; "
                f"this file does not start with an object"
            )
    return _iter_safety(path, max_bytes)


def _iter_safety(path: Path, max_bytes: int) -> Iterator[Record]:
    source = str(path)
    index = 0
    with path.open("rb") as f:
        scenarios = bounded_json.iter_scenarios(bounded_json.skip_bom(f), max_bytes, MAX_DEPTH)
        while True:
            try:
                scenario, is_element, built = next(scenarios)
            except StopIteration:
                return
            except (ijson.JSONError, UnicodeDecodeError) as error:
                raise InputError(
                    f"{path}: the JSON object is broken after record {index}: {_first_line(error)}; fix the file"
                ) from error
            if built.reason:
                yield Reject(
                    reason=built.reason,
                    source=source,
                    index=index,
                    raw="",
                    detail=f"scenario {scenario!r}: {built.detail}",
                )
            elif not is_element:
                yield Reject(
                    reason="non_string_field",
                    source=source,
                    index=index,
                    raw=_truncate(_safe_dump({scenario: built.value})),
                    detail=f"scenario {scenario!r} is {_type_name(built.value)}, not a list",
                )
            else:
                yield _safety_record(built.value, scenario, source, index)
            index += 1


def _safety_record(item: Any, scenario: str, source: str, index: int) -> Record:
    try:
        if not isinstance(item, dict):
            raise _Refused("non_string_field", f"an element of {scenario!r} is {_type_name(item)}, not an object")
        turns: list[tuple[Role, str]] = [
            ("user", _text_field(item, "prompt")),
            ("assistant", _text_field(item, "response")),
        ]
        messages, dropped = _validated(turns)
        conversation = Conversation(messages=messages, source=source, index=index, dropped_turns=dropped)
        return _checked_unicode(conversation)
    except _Refused as refused:
        return Reject(
            reason=refused.reason,
            source=source,
            index=index,
            raw=_truncate(_safe_dump(item)),
            detail=f"scenario {scenario!r}: {refused.detail}",
        )


def _open_csv(path: Path) -> io.TextIOWrapper:
    # utf-8-sig drops the byte-order mark spreadsheet exports put before the header; newline="" lets the csv
    # module see the line breaks inside quoted fields.
    return path.open(encoding="utf-8-sig", newline="")


def _csv_columns(path: Path) -> tuple[int, int, int]:
    """Positions of the prompt and output columns and the header width; InputError without that header."""
    try:
        with _open_csv(path) as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text near the csv header; convert the file to UTF-8") from error
    except csv.Error as error:
        raise InputError(f"{path}: cannot read the csv header: {_first_line(error)}") from error
    names = [name.strip() for name in header]
    if "prompt" not in names or "output" not in names:
        raise InputError(
            f"{path}: a csv source needs a header row with prompt,output columns; found: {','.join(names)[:200]}"
        )
    return names.index("prompt"), names.index("output"), len(names)


def _read_csv(path: Path, columns: tuple[int, int, int], max_bytes: int) -> Iterator[Record]:
    prompt_at, output_at, width = columns
    source = str(path)
    # One answer may be longer than the csv module's default 128 KiB field limit; raising it affects nothing else.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with _open_csv(path) as f:
        rows = csv.reader(f)
        next(rows)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError as error:
                # The decoder reads ahead, so the bad bytes lie at or a little after this row.
                raise InputError(f"{path}: not UTF-8 text near csv row {index}; convert the file to UTF-8") from error
            except csv.Error as error:
                raise InputError(f"{path}: cannot read csv row {index}: {_first_line(error)}") from error
            if not row:
                index += 1
                continue  # a blank line is no row
            record: Record
            size = sum(len(field) for field in row)
            if size > max_bytes:
                record = Reject(
                    reason="too_large",
                    source=source,
                    index=index,
                    raw=_truncate(_csv_line([field[:RAW_LIMIT] for field in row])),
                    detail=f"row of {size} characters > max_record_bytes {max_bytes}",
                )
            elif len(row) != width:
                record = Reject(
                    reason="malformed_csv",
                    source=source,
                    index=index,
                    raw=_truncate(_csv_line(row)),
                    detail=f"row has {len(row)} fields, the header {width} (an unquoted comma or a missing field?)",
                )
            else:
                try:
                    turns: list[tuple[Role, str]] = [("user", row[prompt_at]), ("assistant", row[output_at])]
                    record = Conversation(messages=_validated(turns)[0], source=source, index=index)
                except _Refused as refused:
                    raw = _truncate(_csv_line(row))
                    record = Reject(reason=refused.reason, source=source, index=index, raw=raw, detail=refused.detail)
            yield record
            index += 1


def _csv_line(row: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue().rstrip("\r\n")


def _read_txt(path: Path, max_bytes: int) -> Iterator[Record]:
    """A .txt file is one document: every token of it is trained (prepare cuts it into max-seq-len chunks)."""
    size = path.stat().st_size
    if size > max_bytes:
        with path.open("rb") as f:
            raw = f.read(RAW_LIMIT * 4).decode("utf-8", errors="replace")
        detail = f"file of {size} bytes > max_record_bytes {max_bytes}: split it, or convert it to JSON lines of text"
        return iter([Reject(reason="too_large", source=str(path), index=0, raw=_truncate(raw), detail=detail)])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start}); convert it to UTF-8") from error
    # _require_nonempty has refused a blank file, so this Text is never empty.
    return iter([Text(text=text, source=str(path), index=0)])
