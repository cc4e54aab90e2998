"""The ``plain`` format: base models (GPT-2, StarCoder) with no chat markup at all."""

from __future__ import annotations

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer


class Plain(Renderer):
    """Base models (GPT-2, StarCoder): prompt, newline, answer, eos; turns joined by newlines."""

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        out.add(self.bos)
        for i, m in enumerate(messages):
            if m.role == "assistant":
                out.add(m.content, trained[i])
                out.add(self.eos, trained[i])
            elif m.role == "user" and i > 0 and messages[i - 1].role == "assistant":
                out.add(f"\n{m.content}\n")
            else:
                out.add(m.content + "\n")
        return out
