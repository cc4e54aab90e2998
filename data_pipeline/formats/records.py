"""What every corpus format shares: the record a reader parses, the refusal a mapper raises, field access.

A mapper (one module per format) takes a parsed JSON object and raises :class:`Refused` naming the field it cannot
use; the reader turns that into a ``Reject`` with the record's raw text. Nothing here reads files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_stack.chat.conversation import Conversation, Message, Record, Role, Text

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

MAX_RECORD_BYTES = 4 << 20
"""Default bound on one record's size (PrepareOptions.max_record_bytes); see ``read_records``."""
MAX_DEPTH = 512
"""Deepest nesting of arrays and objects a record may have; deeper ones are rejected as malformed_json. Python's
own parser and printer recurse once per level (about 1,000 levels at most); real records nest under 20."""
DEEP = "nested deeper than Python's JSON parser allows"

Turn = tuple[Role, str] | Message
"""What a record mapper yields per message: (role, text) for plain text, a Message when it carries tool use."""

Keys = frozenset[str]


class Refused(Exception):
    """Raised inside a mapper: the record cannot be used, for ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Item:
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


@dataclass(frozen=True, kw_only=True)
class CorpusFormat:
    """One corpus format: what ``--format NAME`` reads and how ``--format auto`` recognizes it.

    A JSON-record format sets ``convert``; a format with a file layout of its own (csv, a Safety-Prompts object)
    sets ``read_file`` instead. ``text`` sets both: JSON records with a ``text`` field, and a .txt file whole.
    """

    name: str
    fields: tuple[str, ...] = ()
    """The record fields ``convert`` reads: what a source's column mapping (``field=column``) may name."""
    convert: Callable[[dict[str, Any], str, int], Conversation | Text] | None = None
    """(record, source, index) -> the Conversation or Text; raises Refused."""
    detect: Callable[[Keys, Keys], bool] | None = None
    """(first record's keys, keys of the first element of its first list value) -> is it this format?"""
    detect_rank: int = 0
    """Detection tries the formats by rank, lowest first (a record with "messages" and "text" is messages)."""
    suffix: str = ""
    """A file extension that names this format without looking inside (".csv")."""
    read_file: Callable[[Path, int], Iterator[Record]] | None = None
    """(path, max_record_bytes) -> the records of a whole file; used when ``convert`` is None or the file has
    ``suffix``. May raise InputError for a problem with the whole file."""
    read_directory: Callable[[Path, int], Iterator[Record]] | None = None
    """(directory, max_record_bytes) -> the records of a directory source (MOSS: one .json file per chat)."""

    def reads_whole_file(self, path: Path) -> bool:
        """Whether ``path`` is read by ``read_file`` rather than as JSON records."""
        return self.read_file is not None and (self.convert is None or path.suffix.lower() == self.suffix)


# ---------------------------------------------------------------------------------------------------------------
# Field access: each raises Refused naming the field


def text_field(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record:
        raise Refused("missing_field", f"{where}{key} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise Refused("non_string_field", f"{where}{key} is {type_name(value)}, not a string")
    return value


def optional_text(record: dict[str, Any], key: str) -> str:
    """A text field that may be absent or null (alpaca's input): "" then."""
    if record.get(key) is None:
        return ""
    return text_field(record, key)


def system_turn(record: dict[str, Any], key: str) -> list[tuple[Role, str]]:
    """An optional system prompt; empty or whitespace counts as none."""
    system = optional_text(record, key)
    return [("system", system)] if system.strip() else []


def list_field(record: dict[str, Any], key: str) -> list[Any]:
    if key not in record:
        raise Refused("missing_field", f"{key} is missing")
    value = record[key]
    if not isinstance(value, list):
        raise Refused("non_string_field", f"{key} is {type_name(value)}, not a list")
    return value


def optional_list(record: dict[str, Any], key: str) -> list[Any]:
    return [] if record.get(key) is None else list_field(record, key)


def object_items(record: dict[str, Any], key: str) -> Iterator[tuple[int, dict[str, Any], str]]:
    """``(number, item, where)`` for each object of the record's list ``key``, ``where`` being the prefix that
    names the item in a refusal (``conversations[2].``): what the turn-list formats (conversation, sharegpt,
    messages) share. Refused when the list is missing, empty or not a list, and at the first item that is not an
    object (items before it are read first, so a refusal names the first bad item in record order)."""
    items = list_field(record, key)
    if not items:
        raise Refused("missing_field", f"'{key}' is an empty list")
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise Refused("non_string_field", f"{key}[{number}] is {type_name(item)}, not an object")
        yield number, item, f"{key}[{number}]."


def type_name(value: Any) -> str:
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


def truncate(raw: str) -> str:
    if len(raw) <= RAW_LIMIT:
        return raw
    return f"{raw[:RAW_LIMIT]}...[{len(raw) - RAW_LIMIT} more characters]"


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def safe_dump(value: Any) -> str:
    try:
        return dump(value)
    except RecursionError:
        return f"[a JSON value {DEEP}]"


def first_line(error: Exception) -> str:
    text = str(error)
    if isinstance(error.args[0] if error.args else None, bytes):
        text = error.args[0].decode("utf-8", errors="replace")
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
