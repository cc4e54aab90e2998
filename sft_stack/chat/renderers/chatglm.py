"""The ``chatglm`` format: ChatGLM-6B (v1), one trained answer per sample."""

from __future__ import annotations

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer
from sft_stack.chat.vocab import Vocab


class ChatGLM(Renderer):
    """ChatGLM-6B (v1): ``{prompt}[gMASK]<sop>{answer}<eop>``, one trained answer per sample.

    The prompt is built as the original's ``chat``/P-Tuning code builds it: the query alone when there are no
    earlier rounds, else ``[Round i]\n问：{q}\n答：{a}\n`` for i = 0, 1, ... then ``[Round n]\n问：{q}\n答：``.
    Everything before ``<sop>`` is the bidirectional prefix of the GLM prefix-LM, so earlier answers are history
    text, never trained: only the last answer and its ``<eop>`` are. A system text (v1 has no system role)
    goes first, followed by a newline.
    """

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.gmask = v.control("[gMASK]")
        self.sop = v.control("<sop>")
        self.eop = v.control("<eop>")
        self.stop_token_ids = (self.eop, v.eos)

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        text = "".join(m.content + "\n" for m in messages if m.role == "system")
        turns = [m.content for m in messages if m.role != "system"]
        answer = turns.pop() if messages[-1].role == "assistant" else None
        query, history = turns[-1], list(zip(turns[:-1:2], turns[1:-1:2], strict=True))
        if history:
            text += "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            text += f"[Round {len(history)}]\n问：{query}\n答："
        else:
            text += query
        out.add(text)
        out.add(self.gmask)
        out.add(self.sop)
        if answer is not None:
            out.add(answer, trained[-1])
            out.add(self.eop, trained[-1])
        return out
