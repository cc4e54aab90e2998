"""Tool-call parsing: the call and tool-list shapes published corpora use, each turned into a ToolCall whose
arguments are JSON text (see ToolCall), or refused as malformed_tool_call / malformed_tools."""

from __future__ import annotations

import json
import re
from typing import Any

from data_pipeline.formats.records import Refused, dump
from sft_stack.chat.conversation import ToolCall, tool_schemas

_MOSS_COMMAND = re.compile(r"\s*([A-Za-z_][\w.]*)\(")  # Search("...") Calculate("...") Text2Image("...")


def sharegpt_calls(value: str, where: str) -> tuple[ToolCall, ...]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise Refused("malformed_tool_call", f"{where}function_call is not JSON ({error.msg})") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise Refused("malformed_tool_call", f"{where}function_call is an empty list")
    return tuple(tool_call(item, where) for item in items)


def tool_call(item: Any, where: str) -> ToolCall:
    """``{"name", "arguments"}`` (arguments an object, or its JSON text as OpenAI sends it) -> a ToolCall."""
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]  # OpenAI: {"id", "type": "function", "function": {"name", "arguments"}}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
        raise Refused("malformed_tool_call", f"{where}a tool call needs a string 'name' (got {dump(item)[:80]})")
    arguments = item.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise Refused(
                "malformed_tool_call", f"{where}{item['name']}: arguments are not JSON ({error.msg})"
            ) from None
    return ToolCall(name=item["name"], arguments=dump(arguments))


def tools_field(record: dict[str, Any]) -> tuple[str, ...]:
    """The ``tools`` of a record (a list, or its JSON text as LLaMA-Factory writes it), each in OpenAI's form."""
    try:
        return tool_schemas(record.get("tools"))
    except ValueError as error:
        raise Refused("malformed_tools", str(error)) from None


def moss_commands(text: str, where: str) -> tuple[ToolCall, ...]:
    """``Search("a"), Calculate("1+1")`` -> the calls; each call's arguments become JSON text (see ToolCall)."""
    calls: list[ToolCall] = []
    position = 0
    while position < len(text):
        match = _MOSS_COMMAND.match(text, position)
        if match is None:
            raise Refused("malformed_tool_call", f"{where}Commands: expected Name(...) at {text[position:][:40]!r}")
        end = _closing_paren(text, match.end())
        if end is None:
            raise Refused("malformed_tool_call", f"{where}Commands: unclosed parenthesis in {text[:80]!r}")
        inner = text[match.end() : end]
        try:
            values = json.loads(f"[{inner}]")
            arguments: Any = values[0] if len(values) == 1 else values
        except json.JSONDecodeError:
            arguments = inner  # not JSON literals (e.g. an unquoted expression): the text itself
        calls.append(ToolCall(name=match.group(1), arguments=dump(arguments)))
        position = end + 1
        while position < len(text) and text[position] in ", ;\n":
            position += 1
    if not calls:
        raise Refused("malformed_tool_call", f"{where}Commands holds no command")
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
