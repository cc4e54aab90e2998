"""Normalized records: what every format reader yields and every chat template consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, kw_only=True)
class Message:
    role: Role
    """Who speaks. A conversation is: optional system, then user/assistant alternating, ending with assistant."""
    content: str
    """Plain text. Control strings inside it (``<|im_end|>``, ``<eoh>``) stay text when tokenized."""


@dataclass(frozen=True, kw_only=True)
class Conversation:
    messages: tuple[Message, ...]
    """System (optional, first), then user/assistant turns alternating, the last one an assistant turn."""
    source: str
    """Source file path, for rejects and lineage."""
    index: int
    """Record index within the source (0-based; the line number minus one for JSON lines)."""


@dataclass(frozen=True, kw_only=True)
class Text:
    """Raw text for continued pre-training: every token is trained."""

    text: str
    source: str
    index: int


@dataclass(frozen=True, kw_only=True)
class Reject:
    """A record that cannot be used, with the reason it was refused."""

    reason: str
    """Short stable key, e.g. ``malformed_json``, ``empty_assistant``, ``wrong_role_order``, ``too_long``."""
    source: str
    index: int
    """Record index within the source (line number minus one for JSON lines, array index for JSON arrays)."""
    raw: str
    """The raw record, truncated to a few hundred characters."""
    detail: str = ""
    """Human-readable detail (which field, what was found)."""


Record = Conversation | Text | Reject


class InputError(Exception):
    """Input that cannot be used at all (missing file, unknown format, bad tokenizer/template).

    The CLI prints its message as one line and exits non-zero before any work.
    """
