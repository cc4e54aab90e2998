"""Column mapping: a source whose records name their fields differently (``--columns instruction=question``)
is read through a mapping field -> column, applied before the format's mapper sees the record."""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.records import Refused

Columns = tuple[tuple[str, str], ...]
"""A source's column mapping as (field, column) pairs."""


def mapped(record: dict[str, Any], columns: Columns) -> dict[str, Any]:
    """The record with each mapped field taken from its column; a column the record lacks refuses it."""
    if not columns:
        return record
    mapped = dict(record)
    for field, column in columns:
        if column not in record:
            raise Refused("missing_field", f"no {column!r} column (mapped to {field}); the record has {_keys(record)}")
        mapped[field] = record[column]
    return mapped


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)[:12]) or "no keys"
