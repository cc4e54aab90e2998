"""Helpers the tool formats share: one call per step, tojson as Jinja writes it, arguments and schemas.

Each family's own tool layout lives in its renderer module (``renderers/qwen.py``, ``llama3.py``,
``chatglm3.py``, ``moss.py``; ``tokenizer.py`` hands tools to the tokenizer's chat_template).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from sft_stack.chat.conversation import Message, ToolCall
from sft_stack.chat.renderer import NoToolFormatError, UnrenderableError


def one_call_per_step(
    messages: Sequence[Message], trained: Sequence[bool]
) -> tuple[list[Message], list[bool], list[str]]:
    """For formats with one call per assistant message (Llama 3.1, ChatGLM3): an assistant message with n calls
    followed by their n results becomes n (call, result) pairs, in order. Returns the messages, their trained
    flags and, per message, the text said before the calls (kept on the first call only).

    Raises NoToolFormatError when the number of results differs from the number of calls.
    """
    out: list[Message] = []
    out_trained: list[bool] = []
    before: list[str] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        if not m.tool_calls:
            out.append(m)
            out_trained.append(trained[i])
            before.append("")
            i += 1
            continue
        results = list(itertools.takewhile(lambda r: r.role == "tool", messages[i + 1 :]))
        if len(results) != len(m.tool_calls) and len(m.tool_calls) > 1:
            raise NoToolFormatError(
                f"{len(m.tool_calls)} parallel calls with {len(results)} results: this format makes one call "
                "per step, so each call needs its own result"
            )
        for n, call in enumerate(m.tool_calls):
            out.append(Message(role="assistant", content="", tool_calls=(call,)))
            out_trained.append(trained[i])
            before.append(m.content if n == 0 else "")
            if len(m.tool_calls) > 1:
                out.append(results[n])
                out_trained.append(False)
                before.append("")
        i += 1 + (len(results) if len(m.tool_calls) > 1 else 0)
    return out, out_trained, before


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON as Jinja's ``tojson`` in transformers writes it: non-ASCII kept, ", " and ": " separators."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def call_arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except json.JSONDecodeError as exc:
        raise UnrenderableError(f"tool call {call.name}: arguments are not JSON ({exc.msg})") from exc


def function_schemas(tools: Sequence[str]) -> list[dict[str, Any]]:
    """The function schemas of OpenAI-form tools (``{"type": "function", "function": {...}}`` -> ``{...}``)."""
    schemas = []
    for tool in tools:
        value = json.loads(tool)
        schemas.append(value["function"] if isinstance(value, dict) and "function" in value else value)
    return schemas
