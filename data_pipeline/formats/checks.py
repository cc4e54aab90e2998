"""The rules every mapped record must pass: role order, emptiness, media, valid Unicode."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from data_pipeline.formats.records import Refused, Turn
from sft_stack.chat.conversation import Conversation, Message, Role, Text

_MEDIA_FIELDS = ("images", "videos", "audios")
_MEDIA_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
MEDIA_PARTS = frozenset({"image_url", "image", "input_audio", "audio", "video", "video_url", "file"})
"""Content-part types of OpenAI-style messages that carry media (refused as multimodal)."""
# Tool-use roles seen in published data whose shape no reader here knows (a call or a result with no fixed schema).
_TOOL_ROLES = frozenset({"tool_call", "tool_response"})


def conversation(turns: Sequence[Turn], source: str, index: int, tools: tuple[str, ...] = ()) -> Conversation:
    """The Conversation of a mapper's turns, once they pass ``validated``."""
    messages, dropped = validated(turns)
    return Conversation(messages=messages, source=source, index=index, tools=tools, dropped_turns=dropped)


def known_role(name: str, roles: dict[str, Role], where: str) -> Role:
    if name in roles:
        return roles[name]
    if name in _TOOL_ROLES:
        raise Refused("unsupported_role", f"{where}role {name!r}: a tool-use role whose record shape is not known")
    raise Refused("unknown_role", f"{where}role {name!r}; known: {', '.join(sorted(roles))}")


def refuse_media_fields(record: dict[str, Any]) -> None:
    for field in _MEDIA_FIELDS:
        if record.get(field):
            raise Refused("multimodal", f"'{field}' lists media files; media records are not trained (text only)")


def validated(turns: Sequence[Turn]) -> tuple[tuple[Message, ...], int]:
    """Check a Conversation's role order and emptiness rules; return its messages (text kept exactly) and the
    number of trailing unanswered user turns dropped (0 or 1).

    A round is a user message, then zero or more steps of (assistant message, tool results), then an assistant
    message without calls; a message with calls is followed by results. A last user turn that nobody answered is
    dropped, not the record.
    """
    messages = [turn if isinstance(turn, Message) else Message(role=turn[0], content=turn[1]) for turn in turns]
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise Refused("missing_field", "no user or assistant turn")
    dropped = 0
    if len(body) > 1 and body[-1].role == "user" and body[-2].role == "assistant" and not body[-2].tool_calls:
        body, messages, dropped = body[:-1], messages[:-1], 1
    expected = {"user"}
    for message in body:
        if message.role not in expected:
            raise Refused(
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
        raise Refused("wrong_role_order", f"roles {_roles(messages)}: the last turn is {last}")
    for position, message in enumerate(body):
        if message.role in ("user", "assistant") and not message.tool_calls and not message.content.strip():
            raise Refused(f"empty_{message.role}", f"turn {position} ({message.role}) is empty or whitespace")
        if _MEDIA_PLACEHOLDER.search(message.content):
            found = _MEDIA_PLACEHOLDER.search(message.content)
            assert found is not None
            raise Refused(
                "multimodal",
                f"turn {position} holds the media placeholder {found.group(0)}; media records are not trained",
            )
    return tuple(messages), dropped


def _roles(messages: list[Message]) -> str:
    return ",".join(f"{m.role}+calls" if m.tool_calls else m.role for m in messages)


def text_record(text: str, source: str, index: int) -> Text:
    if not text.strip():
        raise Refused("empty_text", "the text is empty or whitespace")
    return Text(text=text, source=source, index=index)


def checked_unicode(record: Conversation | Text) -> Conversation | Text:
    """``record``, or Refused(invalid_unicode) when a string of it holds a lone UTF-16 surrogate: "\\ud800" is a
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
            raise Refused(
                "invalid_unicode",
                f"a lone UTF-16 surrogate \\u{ord(text[error.start]):04x} at character {error.start} of "
                f"{text[max(0, error.start - 20) : error.start]!r}...: valid JSON, but not text; fix the source",
            ) from None
    return record
