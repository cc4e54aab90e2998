"""The ``llama3`` format: Llama 3 instruct, with Llama 3.1's custom-tool format."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, NoToolFormatError, Renderer
from sft_stack.chat.tools import call_arguments, one_call_per_step, to_json
from sft_stack.chat.vocab import Vocab

LLAMA31_TOOLS_SYSTEM = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_TOOLS_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
"""Llama 3.1's custom-tool prompt: the system header, and the text before the tools in the first user turn."""


class Llama3(Renderer):
    """Llama 3 instruct: header ids around the role, ``\\n\\n``, the text, ``<|eot_id|>``.

    With tools, Llama 3.1's custom-tool format (its chat_template's default, tools in the first user turn): a
    system header naming the ipython environment, the tools as JSON (indent 4) before the first user text, one
    call per assistant message as ``{"name": ..., "parameters": {...}}``, results in ``ipython`` turns (the
    text as given; Meta's prompt-format documentation shows it unquoted).
    """

    tool_format = True

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.begin = v.control("<|begin_of_text|>")
        self.start = v.control("<|start_header_id|>")
        self.end = v.control("<|end_header_id|>")
        self.eot = v.control("<|eot_id|>")
        self.role = {role: v.literal(role) for role in ("system", "user", "assistant", "ipython")}
        self.blank = v.literal("\n\n")
        self.stop_token_ids = (self.eot, v.eos)

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        out.add(self.begin)
        has_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
        if has_tools:
            messages, trained, before = one_call_per_step(messages, trained)
            if any(before):
                raise NoToolFormatError("Llama 3.1's tool format has no text beside a call")
            system = messages[0].content.strip() if messages[0].role == "system" else ""
            out.add(self.start)
            out.add(self.role["system"])
            out.add(self.end)
            out.add("\n\n" + LLAMA31_TOOLS_SYSTEM + system)
            out.add(self.eot)
        first_user = True
        for i, m in enumerate(messages):
            if m.role == "system" and has_tools:
                continue
            if m.role == "assistant":
                if m.tool_calls:
                    (call,) = m.tool_calls
                    text = f'{{"name": "{call.name}", "parameters": {to_json(call_arguments(call))}}}'
                    out.add(text, trained[i])
                else:
                    out.add(m.content.strip(), trained[i])
                out.add(self.eot, trained[i])
                continue
            out.add(self.start)
            out.add(self.role["ipython" if m.role == "tool" else m.role])
            out.add(self.end)
            if m.role == "tool":
                out.add("\n\n" + m.content)
            elif m.role == "user" and first_user and tools:
                schemas = "".join(to_json(json.loads(tool), indent=4) + "\n\n" for tool in tools)
                out.add("\n\n" + LLAMA31_TOOLS_USER + schemas + m.content.strip())
            else:
                out.add("\n\n" + m.content.strip())
            first_user = first_user and m.role != "user"
            out.add(self.eot)
            if m.role == "user" or (m.role == "tool" and (i + 1 == len(messages) or messages[i + 1].role != "tool")):
                out.add(self.start)
                out.add(self.role["assistant"])
                out.add(self.end)
                out.add(self.blank)
        return out
