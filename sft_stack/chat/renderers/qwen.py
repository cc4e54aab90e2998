"""The ``qwen`` format: Qwen's ChatML, with Qwen2.5's tool format."""

from __future__ import annotations

import re
from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer
from sft_stack.chat.tools import call_arguments, to_json
from sft_stack.chat.vocab import Vocab

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
"""System prompt Qwen's own chat template inserts when a conversation has none."""

QWEN_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
"""Qwen2.5's tool block, appended to the system text when tools are offered (its chat_template's wording)."""

_TOOL_CALL_TAG = re.compile("(</?tool_call>)")


class ChatML(Renderer):
    """Qwen's ChatML: ``<|im_start|>{role}\\n{text}<|im_end|>\\n``; default system when none is given.

    With tools, Qwen2.5's tool format: the tools (one JSON per line) inside ``<tools></tools>`` after the system
    text, each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after the assistant's
    text, and the results of consecutive tool messages in one user turn, each inside
    ``<tool_response>\\n...\\n</tool_response>``. The XML tags are tokens where the vocabulary has them (Qwen2.5)."""

    tool_format = True

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.start = v.control("<|im_start|>")
        self.end = v.control("<|im_end|>")
        self.newline = v.literal("\n")
        self.assistant = v.literal("assistant\n")
        self.default_system = v.literal(f"system\n{QWEN_DEFAULT_SYSTEM}")
        self.call_open, self.call_close = v.marker("<tool_call>"), v.marker("</tool_call>")
        self.result_open, self.result_close = v.marker("<tool_response>"), v.marker("</tool_response>")
        self.user_newline = v.literal("user\n")
        self.tags = {"<tool_call>": self.call_open, "</tool_call>": self.call_close}
        self.literal = v.literal
        self.stop_token_ids = (self.end, v.eos)

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        if tools:
            system = messages[0].content if messages[0].role == "system" else QWEN_DEFAULT_SYSTEM
            out.add(self.start)
            # Tool schemas are data: plain text, like the system text they follow. The footer's <tool_call> tags
            # are template text: tokens where the vocabulary has them, as in Qwen2.5's own rendering.
            first, *rest = _TOOL_CALL_TAG.split(QWEN_TOOLS_FOOTER)
            out.add("system\n" + system + QWEN_TOOLS_HEADER + "".join("\n" + tool for tool in tools) + first)
            for piece in rest:
                if piece:
                    out.add(self.tags[piece] if piece in self.tags else self.literal(piece))
            out.add(self.end)
            out.add(self.newline)
        elif messages[0].role != "system":
            out.add(self.start)
            out.add(self.default_system)
            out.add(self.end)
            out.add(self.newline)
        for i, m in enumerate(messages):
            if m.role == "assistant":
                if m.tool_calls:
                    self._calls(out, m, trained[i])
                else:
                    out.add(m.content, trained[i])
                out.add(self.end, trained[i])
                continue
            if i > 0 and messages[i - 1].role == "assistant":
                out.add(self.newline)
            if m.role == "tool":
                if messages[i - 1].role != "tool":
                    out.add(self.start)
                    out.add(self.user_newline)
                else:
                    out.add(self.newline)
                out.add(self.result_open)
                out.add("\n" + m.content + "\n")
                out.add(self.result_close)
                if i + 1 < len(messages) and messages[i + 1].role == "tool":
                    continue
            elif m.role == "system" and tools:
                continue
            else:
                out.add(self.start)
                out.add(f"{m.role}\n{m.content}")
            out.add(self.end)
            out.add(self.newline)
            if m.role in ("user", "tool"):
                out.add(self.start)
                out.add(self.assistant)
        return out

    def _calls(self, out: Layout, m: Message, trained: bool) -> None:
        for n, call in enumerate(m.tool_calls):
            # After the assistant prefix: the text (if any) and a newline, then the calls one per line.
            before = (m.content + "\n" if m.content else "") if n == 0 else "\n"
            if before:
                out.add(before, trained)
            out.add(self.call_open, trained)
            out.add(f'\n{{"name": "{call.name}", "arguments": {to_json(call_arguments(call))}}}\n', trained)
            out.add(self.call_close, trained)
