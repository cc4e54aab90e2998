"""The corpus formats ``--format`` accepts: one line each, in the order docs/formats.md lists them.

A format of the project belongs in ``REGISTRY`` below. A format defined outside this package joins with
``register`` (the tests' throwaway format does), which also adds it to ``FORMATS``, ``COLUMN_FIELDS`` and
``DETECTED``: those are updated in place, so a module that imported them by name sees the new format too.
"""

from __future__ import annotations

from data_pipeline.formats import alpaca, conversation, csv_table, firefly, messages, moss, safety, sharegpt, text
from data_pipeline.formats.records import CorpusFormat
from sft_stack.chat.conversation import InputError

REGISTRY: list[CorpusFormat] = [
    alpaca.FORMAT,
    firefly.FORMAT,
    moss.FORMAT,
    conversation.FORMAT,
    sharegpt.FORMAT,
    messages.FORMAT,
    safety.FORMAT,
    csv_table.FORMAT,
    text.FORMAT,
]

FORMATS: list[str] = [spec.name for spec in REGISTRY]
"""Every format name ``--format`` accepts, in the order docs/formats.md lists them (registered ones last)."""

COLUMN_FIELDS: dict[str, tuple[str, ...]] = {spec.name: spec.fields for spec in REGISTRY if spec.fields}
"""The record fields each JSON-record format reads: what a source's column mapping (``field=column``) may name."""


def _by_rank(specs: list[CorpusFormat]) -> list[CorpusFormat]:
    return sorted((s for s in specs if s.detect), key=lambda s: s.detect_rank)


DETECTED: list[CorpusFormat] = _by_rank(REGISTRY)
"""The formats ``--format auto`` recognizes by their first record's keys, in the order it tries them."""


def register(spec: CorpusFormat) -> CorpusFormat:
    """Add a format defined outside this package; refuses a name already taken (or ``auto``), since which format
    a name meant would then depend on the order of imports. Returns ``spec``, for ``FORMAT = register(...)``."""
    if spec.name == "auto" or lookup(spec.name) is not None:
        raise ValueError(f"corpus format {spec.name!r} is already registered")
    REGISTRY.append(spec)
    FORMATS.append(spec.name)
    if spec.fields:
        COLUMN_FIELDS[spec.name] = spec.fields
    DETECTED[:] = _by_rank(REGISTRY)
    return spec


def lookup(name: str) -> CorpusFormat | None:
    return next((spec for spec in REGISTRY if spec.name == name), None)


def spec_of(name: str, path: object) -> CorpusFormat:
    """The format named ``name``; InputError naming the known ones when there is none."""
    spec = lookup(name)
    if spec is None:
        raise InputError(f"unknown format {name!r} for {path}; known formats: {', '.join(FORMATS)}")
    return spec
