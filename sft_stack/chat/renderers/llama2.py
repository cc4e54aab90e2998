"""The ``llama2`` format: Meta's Llama 2 chat layout."""

from __future__ import annotations

from collections.abc import Sequence

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer
from sft_stack.chat.vocab import Vocab


class Llama2(Renderer):
    """Meta's Llama 2 chat format: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``.

    [INST], [/INST], <<SYS>>, <</SYS>> are plain text in Llama 2 (not special tokens), so they are
    tokenized as text here too, whatever the vocabulary; each round is bos + text + eos as in Meta's code,
    and message text is stripped as Meta's code does.
    """

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.round_start = v.control(v.tokenizer.bos_token or "<s>")
        """bos, which opens every round (even where the tokenizer's bos is also its eos)."""

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        system = ""
        for i, m in enumerate(messages):
            if m.role == "system":
                system = f"<<SYS>>\n{m.content.strip()}\n<</SYS>>\n\n"
            elif m.role == "user":
                out.add(self.round_start)
                out.add(f"[INST] {system}{m.content.strip()} [/INST]")
                system = ""
            else:
                # Leading space: Meta renders "[/INST] {answer} "; with SentencePiece the space joins the
                # answer's first piece, so the answer's tokens are the same as in Meta's joint encoding.
                out.add(f" {m.content.strip()} ", trained[i])
                out.add(self.eos, trained[i])
        return out
