"""OpenAI-style messages: {role, content} (content a string or text parts), tool_calls on assistant messages,
an optional tools list.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "tools": [...]}
"""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.checks import MEDIA_PARTS, conversation, known_role
from data_pipeline.formats.records import CorpusFormat, Refused, Turn, object_items, text_field, type_name
from data_pipeline.formats.tool_calls import tool_call, tools_field
from sft_stack.chat.conversation import Conversation, Message, Role, ToolCall

_MESSAGES_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # OpenAI's legacy name for a function's result
    "ipython": "tool",  # Llama 3.1's name for a tool's result
}


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(_turns(record), source, index, tools_field(record))


def _turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = []
    for number, message, where in object_items(record, "messages"):
        role = known_role(text_field(message, "role", where).lower(), _MESSAGES_ROLES, where)
        calls: tuple[ToolCall, ...] = ()
        raw_calls = message.get("tool_calls") or ([message["function_call"]] if message.get("function_call") else [])
        if raw_calls:
            if role != "assistant" or not isinstance(raw_calls, list):
                raise Refused("malformed_tool_call", f"{where}tool_calls must be a list on an assistant message")
            calls = tuple(tool_call(call, f"{where}tool_calls[{n}].") for n, call in enumerate(raw_calls))
        text = "" if calls and message.get("content") is None else _message_content(message, where)
        if role == "system" and number == 0 and not text.strip():
            continue
        name = message.get("name") if role == "tool" and isinstance(message.get("name"), str) else ""
        turns.append(Message(role=role, content=text, tool_calls=calls, name=name or ""))
    return turns


def _message_content(message: dict[str, Any], where: str) -> str:
    """A message's text: a string, or a list of text parts joined (OpenAI's multi-part form)."""
    if "content" not in message:
        raise Refused("missing_field", f"{where}missing 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Refused("non_string_field", f"{where}content is {type_name(content)}, not a string")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise Refused("multimodal", f"{where}content[{number}] is a {kind} part; media records are not trained")
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = kind if isinstance(kind, str) else type_name(part)
            raise Refused("unsupported_content", f"{where}content[{number}] is a {shown} part; only text is rendered")
        texts.append(part["text"])
    return "".join(texts)


FORMAT = CorpusFormat(
    name="messages",
    fields=("messages", "tools"),
    convert=convert,
    detect=lambda keys, item_keys: "messages" in keys,
    detect_rank=1,
)
