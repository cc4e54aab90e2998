"""The ``chatglm2`` format: ChatGLM2, as THUDM's own prompt and fine-tuning code encode it."""

from __future__ import annotations

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Joined, Layout, Renderer
from sft_stack.chat.vocab import Vocab


class ChatGLM2(Renderer):
    """ChatGLM2, as THUDM's ``build_prompt`` and ``ptuning/main.py`` encode it.

    ``[gMASK] sop``, then the prompt ``[Round 1]\n\n问：{q}\n\n答：{a}\n\n[Round 2]\n\n问：{q}\n\n答：``
    tokenized as ONE text (rounds counted from 1), then the last answer tokenized on its own and eos. An
    earlier answer that is trained stays part of the joint text (``Joined``: no dummy "▁" at its boundaries)
    and gets no eos, exactly the tokens the model sees in a later prompt. ChatGLM2 has no system role: a system
    text is rendered before round 1, followed by a blank line.
    """

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.prefix = (v.control("[gMASK]"), v.control("sop"))

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        out.add(self.prefix)
        pending: list[str] = []  # untrained text, tokenized as one piece when flushed
        first_text = True
        round_index = 0
        last = len(messages) - 1

        def flush() -> None:
            nonlocal first_text
            if pending:
                text = "".join(pending)
                out.add(text if first_text else Joined(text))
                first_text = False
                pending.clear()

        for i, m in enumerate(messages):
            if m.role == "system":
                pending.append(m.content + "\n\n")
            elif m.role == "user":
                round_index += 1
                pending.append(f"[Round {round_index}]\n\n问：{m.content}\n\n答：")
            elif i == last:
                flush()
                out.add(m.content, trained[i])  # ptuning encodes the answer on its own (with the dummy prefix)
                out.add(self.eos, trained[i])
            elif trained[i]:
                flush()
                out.add(Joined(m.content), True)
                first_text = False
                pending.append("\n\n")
            else:
                pending.append(m.content + "\n\n")
        flush()
        return out
