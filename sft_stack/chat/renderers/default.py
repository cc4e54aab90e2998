"""The ``default`` format: a neutral text layout for models without a chat format of their own."""

from __future__ import annotations

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer


class Default(Renderer):
    """A neutral text template: ``### User:`` / ``### Assistant:`` headers, eos after each answer."""

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        out.add(self.bos)
        for i, m in enumerate(messages):
            if m.role == "system":
                out.add(m.content + "\n\n")
            elif m.role == "user":
                separator = "\n\n" if i > 0 and messages[i - 1].role == "assistant" else ""
                out.add(f"{separator}### User:\n{m.content}\n\n### Assistant:\n")
            else:
                out.add(m.content, trained[i])
                out.add(self.eos, trained[i])
        return out
