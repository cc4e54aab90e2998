"""Normalized records: what every format reader yields and every chat template consumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """One call of a tool that an assistant message makes."""

    name: str
    """The tool (function) name, e.g. ``get_weather`` or MOSS's ``Search``."""
    arguments: str
    """The arguments as JSON text: an object (``{"city": "北京"}``) for OpenAI, glaive and ChatGLM3 data; a
    string (``"query"``) for MOSS's one-argument commands. Kept as text so a record stays hashable and cheap to
    send to a worker; templates parse it when they render it."""


@dataclass(frozen=True, kw_only=True)
class Message:
    role: Role
    """Who speaks: system, user, assistant, or tool (a tool's result, which is never trained)."""
    content: str
    """Plain text. Control strings inside it (``<|im_end|>``, ``<eoh>``) stay text when tokenized. For an
    assistant message with tool_calls: the text said before the calls (often empty; MOSS's Inner Thoughts)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls the assistant makes in this message (several run in parallel); assistant messages only. The
    results follow as the next ``tool`` messages, one per call, in the same order."""
    name: str = ""
    """For a tool message: the name of the tool whose result it is, when the source says so."""


@dataclass(frozen=True, kw_only=True)
class Conversation:
    messages: tuple[Message, ...]
    """System (optional, first), then rounds: a user message, then the assistant's answer, which is zero or more
    steps of (an assistant message, then tool results) and a final assistant message without calls. An assistant
    message with tool_calls is always followed by results (one without calls may be too: glaive data has such
    turns). The last message is a final assistant message."""
    source: str
    """Source file path, for rejects and lineage."""
    index: int
    """Record index within the source (0-based; the line number minus one for JSON lines)."""
    tools: tuple[str, ...] = ()
    """The tools offered to the assistant, each a JSON object in OpenAI's form
    ``{"type": "function", "function": {"name", "description", "parameters"}}``; empty when none are given."""
    dropped_turns: int = 0
    """Trailing user turns that nobody answered, dropped by the reader (the answered turns before them are kept);
    prepare counts them apart from rejected records."""


def tool_schemas(value: Any) -> tuple[str, ...]:
    """Tools as published (a list of function schemas, OpenAI's ``{"type": "function", "function": {...}}`` or
    bare ``{"name", "description", "parameters"}``, or the JSON text of such a list) -> Conversation.tools.

    Raises ValueError saying what is wrong."""
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"tools is not JSON ({error.msg})") from None
    if value is None:
        return ()
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"tools is a {type(value).__name__}, not a list of function schemas")
    tools = []
    for number, tool in enumerate(value):
        if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            schema = tool
        elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
            schema = {"type": "function", "function": tool}
        else:
            raise ValueError(f"tools[{number}] is not a function schema with a name")
        tools.append(json.dumps(schema, ensure_ascii=False))
    return tuple(tools)


def uses_tools(conv: Conversation) -> bool:
    """Whether a conversation offers tools, calls one, or holds a tool result: what needs a tool format."""
    return bool(conv.tools) or any(m.tool_calls or m.role == "tool" for m in conv.messages)


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
