"""Chat templates: a Conversation becomes token ids plus labels that train only what the assistant says.

This module is the template API: ``resolve_template`` (a name and a tokenizer -> ``ChatTemplate``), encoding,
labels and length fitting. The formats themselves are renderers, one module per family in ``renderers/``,
listed in ``registry.py`` by name (``TEMPLATE_NAMES``). Every renderer lays a conversation out as *parts*:

- a control token id (``int``) that only the template inserts (``<|im_start|>``, ``</s>``, ...);
- message text (``str``), tokenized as plain text: a control string inside it stays text;
- constant template text already tokenized (``tuple[int, ...]``), computed once per template.

``encode_batch`` renders a whole batch, tokenizes every ``str`` part of every conversation in ONE batched
call of the Rust tokenizer, then assembles ids and labels with list operations. Training
(``encode_batch``) and generation (``encode_prompt``) go through the same render function, so the prompt a
tuned model sees at generation is, token for token, the prefix it was trained on.

Labels are IGNORE_INDEX except the assistant's tokens and the token that closes each assistant turn (eos
or the family's end-of-turn token), so the model learns to stop.

Tool use (docs/templates.md, "Tools"): qwen, llama3, chatglm3, moss and tokenizer render the tools offered, the
assistant's calls and the tools' results the way each family was trained to; loss falls on the calls and the
replies, never on a result. Every other template rejects a conversation that uses tools as ``no_tool_format``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sft_stack.chat.conversation import Conversation, InputError, Message, Reject, uses_tools
from sft_stack.chat.registry import RENDERERS, template_names, tool_template_names
from sft_stack.chat.renderer import Joined, Layout, NoToolFormatError, Renderer, UnrenderableError
from sft_stack.chat.vocab import TextEncoder, Vocab
from sft_stack.common.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHAT_FORMAT_KEY = "chat_format"
"""tokenizer_config.json key naming the template of a converted checkpoint; ``--template auto`` uses it."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE_INDEX where no loss is taken (labels are not shifted)."""


EncodedArrays = tuple[np.ndarray, np.ndarray]
"""(input_ids, labels) of one sample as int32 arrays; the bulk form of Encoded that prepare writes to shards."""


class ChatTemplate:
    """A family's chat format bound to one tokenizer. Build it with ``resolve_template``."""

    def __init__(self, name: str, renderer: Renderer, encoder: TextEncoder, stop_token_ids: Sequence[int]) -> None:
        self.name = name
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stop_token_ids))
        """Tokens that end an assistant turn; generation stops on any of them."""
        self._renderer = renderer
        self._encoder = encoder

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, stop_token_ids={self.stop_token_ids})"

    def encode_batch(self, convs: Sequence[Conversation], *, last_turn_only: bool = False) -> list[Encoded | Reject]:
        """Render and tokenize a batch; one result per conversation, in order.

        last_turn_only: train only the last assistant turn (earlier answers become context).
        A conversation the template cannot render comes back as ``Reject(reason="unrenderable")``, one
        whose roles are out of order as ``Reject(reason="wrong_role_order")``, one that uses tools when this
        template has no tool format as ``Reject(reason="no_tool_format")``.
        """
        return [
            r if isinstance(r, Reject) else Encoded(input_ids=r[0].tolist(), labels=r[1].tolist())
            for r in self.encode_batch_arrays(convs, last_turn_only=last_turn_only)
        ]

    def encode_batch_arrays(
        self, convs: Sequence[Conversation], *, last_turn_only: bool = False
    ) -> list[EncodedArrays | Reject]:
        """``encode_batch`` with each sample as int32 arrays: views into one flat buffer for the whole batch.

        The token ids of every part go into one buffer in a single pass; labels are then one vectorized
        select (the part's ids where it is trained, else IGNORE_INDEX), so no Python work is done per token.
        """
        layouts: list[Layout | Reject] = []
        texts: list[str] = []
        joined: list[str] = []
        for conv in convs:
            messages = conv.messages
            problem = _role_order_problem(messages, prompt=False)
            if problem:
                layouts.append(_reject(conv, "wrong_role_order", problem))
                continue
            if uses_tools(conv) and not self._renderer.tool_format:
                layouts.append(_reject(conv, "no_tool_format", self._no_tool_format()))
                continue
            # last_turn_only: the last round's assistant messages (its calls and its reply) are trained.
            last_user = max(i for i, m in enumerate(messages) if m.role == "user")
            trained = [m.role == "assistant" and (i > last_user or not last_turn_only) for i, m in enumerate(messages)]
            try:
                layout = self._renderer.render(messages, trained, conv.tools)
            except NoToolFormatError as exc:
                layouts.append(_reject(conv, "no_tool_format", str(exc)))
                continue
            except UnrenderableError as exc:
                layouts.append(_reject(conv, "unrenderable", str(exc)))
                continue
            texts.extend(part for part in layout.parts if isinstance(part, str) and not isinstance(part, Joined))
            joined.extend(part for part in layout.parts if isinstance(part, Joined))
            layouts.append(layout)

        pieces = iter(self._encoder.encode(texts))
        joined_pieces = iter(self._encoder.encode(joined, joined=True))
        segments: list[Sequence[int]] = []  # every part's ids, all conversations in order
        segment_trained: list[bool] = []
        sample_ends: list[int] = []  # per encoded conversation: how many segments precede its end
        for rendered in layouts:
            if isinstance(rendered, Reject):
                continue
            for part in rendered.parts:
                if isinstance(part, int):
                    segments.append((part,))
                elif isinstance(part, Joined):
                    segments.append(next(joined_pieces))
                else:
                    segments.append(next(pieces) if isinstance(part, str) else part)
            segment_trained.extend(rendered.trained)
            sample_ends.append(len(segments))
        lengths = np.fromiter(map(len, segments), dtype=np.int64, count=len(segments))
        token_ends = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        ids = np.fromiter(itertools.chain.from_iterable(segments), dtype=np.int32, count=int(token_ends[-1]))
        is_trained = np.repeat(np.asarray(segment_trained, dtype=bool), lengths)
        labels = np.where(is_trained, ids, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)

        results: list[EncodedArrays | Reject] = []
        bounds = iter(token_ends[[0, *sample_ends]].tolist())
        start = next(bounds)
        for rendered in layouts:
            if isinstance(rendered, Reject):
                results.append(rendered)
                continue
            stop = next(bounds)
            results.append((ids[start:stop], labels[start:stop]))
            start = stop
        return results

    def encode_prompt(self, messages: Sequence[Message], tools: Sequence[str] = ()) -> list[int]:
        """Ids of a generation prompt: the history, ending with a user turn (or with the results of the
        assistant's tool calls), then the assistant prefix. ``tools``: the tools offered, as in
        ``Conversation.tools`` (JSON objects).

        Equal to the training encoding of the same history up to the assistant's first text token, so the
        model continues with the assistant's text (or a tool call). Raises ValueError when the roles are out of
        order, or when tools are used and this template has no tool format.
        """
        problem = _role_order_problem(messages, prompt=True)
        if problem:
            raise ValueError(f"encode_prompt: {problem}")
        if (tools or any(m.tool_calls or m.role == "tool" for m in messages)) and not self._renderer.tool_format:
            raise ValueError(f"encode_prompt: {self._no_tool_format()}")
        try:
            layout = self._renderer.render(messages, [False] * len(messages), tuple(tools))
        except UnrenderableError as exc:
            raise ValueError(f"encode_prompt: template {self.name!r} cannot render these messages: {exc}") from exc
        texts = [part for part in layout.parts if isinstance(part, str) and not isinstance(part, Joined)]
        pieces = iter(self._encoder.encode(texts))
        joined_pieces = iter(
            self._encoder.encode([part for part in layout.parts if isinstance(part, Joined)], joined=True)
        )
        ids: list[int] = []
        for part in layout.parts:
            if isinstance(part, int):
                ids.append(part)
            elif isinstance(part, Joined):
                ids.extend(next(joined_pieces))
            else:
                ids.extend(next(pieces) if isinstance(part, str) else part)
        return ids

    def _no_tool_format(self) -> str:
        return (
            f"template {self.name!r} has no tool format; tool calls are rendered by "
            f"{', '.join(tool_template_names())} (tokenizer: a chat_template that renders tools)"
        )

    def encode_text_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Raw text for continued pre-training: [bos] + text + [eos], every token meant to be trained.

        bos is added only when the tokenizer has one distinct from eos (Llama: yes; GPT-2, Qwen: no).
        Control strings inside the text stay text.
        """
        head = self._encoder.bos_prefix
        eos = [self._encoder.eos_id]
        return [[*head, *ids, *eos] for ids in self._encoder.encode(list(texts))]


def fit_length(enc: Encoded, max_len: int, policy: Literal["truncate", "drop"]) -> Encoded | str:
    """Fit a sample into max_len tokens; return it (maybe cut) or the reason it is rejected.

    truncate keeps the start and cuts the end; drop rejects any over-long sample as "too_long". A sample
    left with no supervised token is rejected as "no_supervised_tokens", so one is never returned.
    """
    arrays = (np.asarray(enc.input_ids, dtype=np.int32), np.asarray(enc.labels, dtype=np.int32))
    fitted = fit_length_arrays(arrays, max_len, policy)
    if isinstance(fitted, str):
        return fitted
    if len(fitted[0]) == len(enc.input_ids):
        return enc
    return Encoded(input_ids=enc.input_ids[:max_len], labels=enc.labels[:max_len])


def fit_length_arrays(enc: EncodedArrays, max_len: int, policy: Literal["truncate", "drop"]) -> EncodedArrays | str:
    """``fit_length`` on (input_ids, labels) arrays; a truncated sample is a view of the input."""
    if max_len < 1:
        raise ValueError(f"fit_length: max_len must be >= 1, got {max_len}")
    input_ids, labels = enc
    if len(input_ids) <= max_len:
        return enc if _has_supervised(labels) else "no_supervised_tokens"
    match policy:
        case "drop":
            return "too_long"
        case "truncate":
            if not _has_supervised(labels[:max_len]):
                return "no_supervised_tokens"
            return input_ids[:max_len], labels[:max_len]
        case _:
            raise ValueError(f"fit_length: policy must be 'truncate' or 'drop', got {policy!r}")


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The template called ``name`` bound to ``tokenizer``.

    ``auto`` picks the tokenizer's own chat_template when it has one, else ``default``. Raises InputError
    (one line) for an unknown name, or a template that does not fit the tokenizer (a control token it
    needs is not one token of this vocabulary, no eos, no chat_template for ``tokenizer``).
    """
    if name == "auto":
        # A converted checkpoint (python -m trainer.convert) records its family's template in tokenizer_config.json.
        recorded = (getattr(tokenizer, "init_kwargs", None) or {}).get(CHAT_FORMAT_KEY)
        own = "tokenizer" if getattr(tokenizer, "chat_template", None) else "default"
        name = str(recorded) if recorded else own
    renderer_class = RENDERERS.get(name)
    if renderer_class is None:
        raise InputError(f"unknown template {name!r}; valid: auto, {', '.join(template_names())}")
    vocab = Vocab(name, tokenizer)
    renderer = renderer_class(vocab)
    return ChatTemplate(name, renderer, vocab.encoder, renderer.stop_token_ids)


def _has_supervised(labels: np.ndarray) -> bool:
    return bool(np.any(labels != IGNORE_INDEX))


def _role_order_problem(messages: Sequence[Message], *, prompt: bool) -> str:
    """Empty when messages are: optional system, then rounds of a user turn and the assistant's answer (tool
    calls each followed by their results, then a reply without calls). A conversation ends with that reply;
    a prompt ends where the assistant speaks next: after a user turn or after tool results."""
    if not messages:
        return "no messages"
    start = 1 if messages[0].role == "system" else 0
    expected: tuple[str, ...] = ("user",)
    for i, m in enumerate(messages[start:], start=start):
        if m.role not in expected:
            return f"message {i} has role {m.role!r}, expected {' or '.join(repr(r) for r in expected)}"
        if m.role == "user":
            expected = ("assistant",)
        elif m.role == "assistant":
            expected = ("tool",) if m.tool_calls else ("user", "tool")
        else:
            expected = ("tool", "assistant")
    if len(messages) == start:
        return "no user turn"
    last = messages[-1]
    if prompt and last.role not in ("user", "tool"):
        return "a prompt must end with a user turn or with tool results"
    if not prompt and (last.role != "assistant" or last.tool_calls):
        return "conversation must end with an assistant turn without tool calls"
    return ""


def _reject(conv: Conversation, reason: str, detail: str) -> Reject:
    raw = json.dumps([_message_dict(m) for m in conv.messages], ensure_ascii=False)
    return Reject(reason=reason, source=conv.source, index=conv.index, raw=raw[:500], detail=detail)


def _message_dict(m: Message) -> dict[str, Any]:
    body: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        body["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    return body
