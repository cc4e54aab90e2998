"""``--format auto``: a file's format from its extension, else from the keys of its first JSON record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ijson

from data_pipeline import bounded_json
from data_pipeline.formats import moss
from data_pipeline.formats.readers import SNIFF_LINES, leading_lines, require_exists, require_nonempty
from data_pipeline.formats.records import Keys
from data_pipeline.formats.registry import DETECTED, FORMATS, REGISTRY
from sft_stack.chat.conversation import InputError


def detect_format(path: Path, columns: Mapping[str, str] | None = None) -> str:
    """The format of ``path``: by extension for .csv/.txt, else by the keys of its first JSON record, seen through
    the source's column mapping (``columns``: field -> the column that holds it) when it has one.

    A directory is a MOSS directory (one conversation object per .json file). Raises InputError, in one line that
    names the file and the formats known, when the file is missing, empty, or its first record fits no format.
    """
    path = Path(path)
    require_exists(path)
    if path.is_dir():
        return _detect_directory(path)
    by_suffix = next((s.name for s in REGISTRY if s.suffix and path.suffix.lower() == s.suffix), None)
    if by_suffix is not None:
        return by_suffix
    require_nonempty(path)
    shape = _peek_first_record(path)
    if shape is None:
        raise InputError(
            f"{path}: cannot tell its format: none of its first {SNIFF_LINES} records is a JSON object; "
            f"known formats: {', '.join(FORMATS)} ({_suffixes()} by extension); fix the file or pass --format NAME"
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


def _suffixes() -> str:
    """The extensions that name a format (registered formats included), for the refusal above."""
    return " and ".join(spec.suffix for spec in REGISTRY if spec.suffix)


def _detect_directory(path: Path) -> str:
    files = moss.json_files(path)
    if not files:
        raise InputError(f"{path} is a directory without .json files; a directory source must hold MOSS .json files")
    shape = _peek_first_record(files[0])
    if shape is None or _format_from_keys(*shape) != "moss":
        raise InputError(
            f"{path} is a directory, which only the moss format reads, but {files[0].name} is not a MOSS "
            f"conversation (meta_instruction, chat); pass a file instead"
        )
    return "moss"


def _format_from_keys(keys: Keys, item_keys: Keys) -> str | None:
    """The format whose record has these keys; ``item_keys``: keys of the first element of the first list value."""
    return next((spec.name for spec in DETECTED if spec.detect is not None and spec.detect(keys, item_keys)), None)


def _peek_first_record(path: Path) -> tuple[Keys, Keys] | None:
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
        for line in leading_lines(f):
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(value, dict):
                return frozenset(value), _first_item_keys(value)
    return None


def _first_item_keys(record: dict[str, Any]) -> Keys:
    for value in record.values():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return frozenset(value[0])
        break
    return frozenset()
