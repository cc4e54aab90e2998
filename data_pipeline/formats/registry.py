"""The corpus formats ``--format`` accepts: one line each, in the order docs/formats.md lists them."""

from __future__ import annotations

from data_pipeline.formats import alpaca, conversation, csv_table, firefly, messages, moss, safety, sharegpt, text
from data_pipeline.formats.records import CorpusFormat
from sft_stack.chat.conversation import InputError

REGISTRY: tuple[CorpusFormat, ...] = (
    alpaca.FORMAT,
    firefly.FORMAT,
    moss.FORMAT,
    conversation.FORMAT,
    sharegpt.FORMAT,
    messages.FORMAT,
    safety.FORMAT,
    csv_table.FORMAT,
    text.FORMAT,
)

FORMATS: tuple[str, ...] = tuple(spec.name for spec in REGISTRY)
"""Every format name ``--format`` accepts, in the order docs/formats.md lists them."""

COLUMN_FIELDS: dict[str, tuple[str, ...]] = {spec.name: spec.fields for spec in REGISTRY if spec.fields}
"""The record fields each JSON-record format reads: what a source's column mapping (``field=column``) may name."""

DETECTED: tuple[CorpusFormat, ...] = tuple(sorted((s for s in REGISTRY if s.detect), key=lambda s: s.detect_rank))
"""The formats ``--format auto`` recognizes by their first record's keys, in the order it tries them."""


def lookup(name: str) -> CorpusFormat | None:
    return next((spec for spec in REGISTRY if spec.name == name), None)


def spec_of(name: str, path: object) -> CorpusFormat:
    """The format named ``name``; InputError naming the known ones when there is none."""
    spec = lookup(name)
    if spec is None:
        raise InputError(f"unknown format {name!r} for {path}; known formats: {', '.join(FORMATS)}")
    return spec
