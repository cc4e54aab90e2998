"""The ``baichuan`` and ``baichuan2`` formats: Baichuan-13B-Chat's and Baichuan2's chat layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, Renderer
from sft_stack.chat.vocab import Vocab


class Baichuan(Renderer):
    """Baichuan chat: ``{system}<user_token>{user}<assistant_token>{answer}...</s>``.

    Baichuan-13B-Chat spells the user/assistant tokens <reserved_102>/<reserved_103>, Baichuan2
    <reserved_106>/<reserved_107> (ids 195/196 in both vocabularies). Rounds follow each other with no token
    between them, as the vendor's ``build_chat_input`` builds a prompt; eos closes the last answer. The vendor's
    fine-tune script also puts an eos *label* on every later user token (teaching eos after each answer
    without eos in the input); labels here are ids or nothing, so those positions are not trained.
    """

    user_token: ClassVar[str] = "<reserved_102>"
    assistant_token: ClassVar[str] = "<reserved_103>"

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.user = v.control(self.user_token)
        self.assistant = v.control(self.assistant_token)

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        out = Layout()
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m.role == "system":
                out.add(m.content)
            elif m.role == "user":
                out.add(self.user)
                out.add(m.content)
                out.add(self.assistant)
            else:
                out.add(m.content, trained[i])
                if i == last:
                    out.add(self.eos, trained[i])
        return out


class Baichuan2(Baichuan):
    """Baichuan2 chat: Baichuan's layout with its own spelling of the user/assistant tokens."""

    user_token = "<reserved_106>"
    assistant_token = "<reserved_107>"
