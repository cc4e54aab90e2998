"""What every chat format shares: the parts a render lays out, and the ``Renderer`` base class.

A format is a ``Renderer`` subclass in its own module under ``renderers/`` (see the package docstring): the
constructor looks up the tokens it needs once (``Vocab.control`` and friends), ``render`` lays a conversation
out as parts, each marked trained or not. ``templates.ChatTemplate`` turns those parts into ids and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sft_stack.chat.conversation import Message
from sft_stack.chat.vocab import Vocab


class Joined(str):
    """Text that continues the text before it in the vendor's own (joint) encoding: tokenized without the
    SentencePiece dummy prefix ("▁"), so a part boundary adds no token the vendor's encoding does not have."""

    __slots__ = ()


Part = int | str | tuple[int, ...]
"""A control token id, message text to tokenize as plain text (``Joined``: without a dummy prefix), or
constant template text already tokenized."""


class Layout:
    """What a render produces: parts in order, each with whether its tokens are trained."""

    __slots__ = ("parts", "trained")

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.trained: list[bool] = []

    def add(self, part: Part, trained: bool = False) -> None:
        self.parts.append(part)
        self.trained.append(trained)


class Renderer:
    """A chat format bound to one tokenizer's ids. Subclasses override ``render`` and, when they need more
    tokens than bos and eos, extend ``__init__`` (calling this one first)."""

    tool_format: ClassVar[bool] = False
    """Whether render() lays out tools, tool calls and tool results; the others reject tool use."""

    def __init__(self, v: Vocab) -> None:
        self.bos: tuple[int, ...] = v.bos_prefix
        """bos when the tokenizer has one distinct from eos, else nothing."""
        self.eos: int = v.eos
        self.stop_token_ids: tuple[int, ...] = (v.eos,)
        """What ends an assistant turn in this layout; generation stops on any of them."""

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        """Lay out ``messages`` (ending with an assistant turn, or with a user or tool turn for a prompt, in
        which case the layout ends with the assistant prefix). ``trained[i]``: assistant message i carries
        loss. ``tools``: the tools offered (JSON objects, Conversation.tools)."""
        raise NotImplementedError(f"{type(self).__name__}.render")


class UnrenderableError(Exception):
    """Content this template cannot render; becomes Reject(reason="unrenderable")."""


class NoToolFormatError(UnrenderableError):
    """Tool use this template's tool format cannot express; becomes Reject(reason="no_tool_format")."""
