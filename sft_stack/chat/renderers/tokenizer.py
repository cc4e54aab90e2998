"""The ``tokenizer`` format: the tokenizer's own Jinja chat_template, adapted so message text stays text."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

from sft_stack.chat.conversation import InputError, Message
from sft_stack.chat.renderer import Layout, Renderer, UnrenderableError
from sft_stack.chat.tools import call_arguments
from sft_stack.chat.vocab import Vocab

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class TokenizerTemplate(Renderer):
    """The tokenizer's own Jinja chat_template, with message text kept as plain text.

    The template is rendered once per role sequence with placeholder contents to get its skeleton (the
    template text between messages, tokenized with control strings as tokens); each conversation is then
    rendered for real and must equal skeleton + contents (or skeleton + stripped contents), else it is
    rejected as unrenderable (the template rewrites content, drops or reorders messages). What closes an
    assistant turn is the template text after the answer up to and including its first special token.
    """

    tool_format = True

    def __init__(self, v: Vocab) -> None:
        tokenizer = v.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"template 'tokenizer' does not fit tokenizer {v.where}: it has no chat_template; "
                "pick a family with --template"
            )
        super().__init__(v)
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.added_tokens_decoder)
        self._skeletons: dict[tuple[tuple[str, ...], bool], list[str]] = {}
        self._fragments: dict[str, tuple[int, ...]] = {}
        probe = ("user", "assistant", "user", "assistant")
        try:
            fragments = self._skeleton(probe, False)
        except UnrenderableError as exc:
            raise InputError(f"template 'tokenizer' does not fit tokenizer {v.where}: {exc}") from exc
        closers = [self._first_special(self._fragment_ids(fragments[i + 1])) for i in (1, 3)]
        self.stop_token_ids = (*(c for c in closers if c is not None), v.eos)
        # With tools: the texts of the stop tokens (where a turn ends) and of every control token (a data string
        # holding one is tokenized as plain text).
        self.stop_texts = [str(t) for t in tokenizer.convert_ids_to_tokens(list(self.stop_token_ids))]
        self.control_texts = [str(t) for t in tokenizer.convert_ids_to_tokens(sorted(self.special_ids)) if t]

    def _first_special(self, ids: tuple[int, ...]) -> int | None:
        return next((t for t in ids if t in self.special_ids), None)

    def _fragment_ids(self, fragment: str) -> tuple[int, ...]:
        ids = self._fragments.get(fragment)
        if ids is None:
            # Template text: control strings here ARE control tokens. A handful of distinct fragments per
            # template, so this per-fragment call runs a few times per run, not per record.
            ids = tuple(self.tokenizer(fragment, add_special_tokens=False)["input_ids"])
            if len(self._fragments) < 100_000:
                self._fragments[fragment] = ids
        return ids

    def _apply(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[Any] | None = None
    ) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # Jinja raises whatever the template's author chose (raise_exception).
            raise UnrenderableError(f"chat_template failed: {exc}") from exc
        return str(text)

    def _skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[str]:
        key = (roles, add_generation_prompt)
        cached = self._skeletons.get(key)
        if cached is not None:
            return cached
        placeholders = [{"role": role, "content": f"\ue000{i}\ue001"} for i, role in enumerate(roles)]
        rendered = self._apply(placeholders, add_generation_prompt)
        order = [int(found) for found in _SENTINEL.findall(rendered)]
        if order != list(range(len(roles))):
            raise UnrenderableError(f"chat_template drops or reorders messages (roles {'/'.join(roles)})")
        fragments = _SENTINEL.split(rendered)[::2]
        self._skeletons[key] = fragments
        return fragments

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        if tools or any(m.tool_calls or m.role == "tool" for m in messages):
            return self._render_tools(messages, trained, tools)
        add_generation_prompt = messages[-1].role == "user"
        fragments = self._skeleton(tuple(m.role for m in messages), add_generation_prompt)
        rendered = self._apply([{"role": m.role, "content": m.content} for m in messages], add_generation_prompt)
        contents = [m.content for m in messages]
        if _interleave(fragments, contents) != rendered:
            contents = [c.strip() for c in contents]
            if _interleave(fragments, contents) != rendered:
                raise UnrenderableError("chat_template rewrites message content beyond stripping whitespace")
        out = Layout()
        out.add(self._fragment_ids(fragments[0]))
        last = len(messages) - 1
        for i, (m, content) in enumerate(zip(messages, contents, strict=True)):
            out.add(content, trained[i])
            after = self._fragment_ids(fragments[i + 1])
            if m.role != "assistant":
                out.add(after)
                continue
            closer = next((k for k, t in enumerate(after) if t in self.stop_token_ids), None)
            if closer is None:
                out.add(after)
                if i == last:
                    out.add(self.eos, trained[i])  # the template ends the answer with nothing: teach eos
            else:
                out.add(after[: closer + 1], trained[i])
                out.add(after[closer + 1 :])
        return out

    # ---- tool use: the chat_template is given tools=, tool_calls and tool messages, in transformers' form

    def _render_tools(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str]) -> Layout:
        """Render a conversation with tools through the chat_template.

        Message contents (and the strings of arguments and tool schemas that hold a control string) are given
        as placeholders, then tokenized as plain text; the rest is template text. An assistant message's span
        starts where the template's generation prompt for the messages before it ends (so a prompt is exactly
        the prefix it was trained on) and ends with the first stop token after it; the span is what is trained.
        """
        sentinels: list[tuple[int, str]] = []  # (owner message index, -1 for the tools; real value)
        marked_tools, marked = self._marked(messages, tools, sentinels)
        plain_tools, plain = self._marked(messages, tools, None)
        prompt = messages[-1].role != "assistant"
        text = self._apply(marked, prompt, marked_tools)
        real = self._apply(plain, prompt, plain_tools)
        found = [(match.start(), match.end(), int(match.group(1))) for match in _SENTINEL.finditer(text)]
        if sorted(k for _, _, k in found) != list(range(len(sentinels))):
            raise UnrenderableError("chat_template drops or repeats message content or tool arguments")
        fragments = _SENTINEL.split(text)[::2]
        values = self._values(fragments, [sentinels[k] for _, _, k in found], real)

        spans: list[tuple[int, int, int]] = []  # (start, end, message) of each assistant message's output
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self._apply(marked[:i], True, marked_tools)
            if not text.startswith(before):
                raise UnrenderableError("chat_template's generation prompt is not a prefix of the conversation")
            start = len(before)
            bound = next((a for a, _, k in found if a >= start and sentinels[k][0] > i), len(text))
            stops = [text.find(stop, start, bound) for stop in self.stop_texts]
            end = min((at + len(stop) for at, stop in zip(stops, self.stop_texts, strict=True) if at >= 0), default=-1)
            spans.append((start, end if end >= 0 else bound, i))

        cuts = sorted(
            {0, len(text), *(a for a, _, _ in found), *(b for _, b, _ in found), *(x for s in spans for x in s[:2])}
        )
        by_start = {a: (b, n) for n, (a, b, _) in enumerate(found)}
        out = Layout()
        for a, b in itertools.pairwise(cuts):
            if a >= b or any(x < a < y for x, y, _ in found):
                continue
            span = next((s for s in spans if s[0] <= a < s[1]), None)
            is_trained = span is not None and trained[span[2]]
            if a in by_start:
                out.add(values[by_start[a][1]], is_trained)
            else:
                out.add(self._fragment_ids(text[a:b]), is_trained)
        last = spans[-1] if spans else None
        if (
            not prompt
            and last is not None
            and last[2] == len(messages) - 1
            and not any(text.find(stop, last[0], last[1]) >= 0 for stop in self.stop_texts)
        ):
            out.add(self.eos, trained[last[2]])  # the template ends the answer with nothing: teach eos
        return out

    def _marked(
        self, messages: Sequence[Message], tools: Sequence[str], sentinels: list[tuple[int, str]] | None
    ) -> tuple[list[Any] | None, list[dict[str, Any]]]:
        """transformers' messages and tools for these; with ``sentinels``, placeholders for the plain-text parts
        (appended to it as (owner, value)); without, the real values."""

        def mark(value: str, owner: int) -> str:
            if sentinels is None:
                return value
            sentinels.append((owner, value))
            return f"\ue000{len(sentinels) - 1}\ue001"

        def strings(value: Any, owner: int) -> Any:
            # Only strings that hold a control string need to be placeholders; the rest stays template text.
            if isinstance(value, str):
                return mark(value, owner) if any(t in value for t in self.control_texts) else value
            if isinstance(value, list):
                return [strings(v, owner) for v in value]
            if isinstance(value, dict):
                return {k: strings(v, owner) for k, v in value.items()}
            return value

        marked_tools = [strings(json.loads(t), -1) for t in tools] or None
        out = []
        for i, m in enumerate(messages):
            body: dict[str, Any] = {"role": m.role, "content": mark(m.content, i) if m.content else ""}
            if m.tool_calls:
                body["tool_calls"] = [
                    {
                        "type": "function",
                        "function": {"name": strings(c.name, i), "arguments": strings(call_arguments(c), i)},
                    }
                    for c in m.tool_calls
                ]
            if m.role == "tool" and m.name:
                body["name"] = m.name
            out.append(body)
        return marked_tools, out

    def _values(self, fragments: list[str], sentinels: list[tuple[int, str]], real: str) -> list[str]:
        """The text each placeholder stands for in ``real``: as given, stripped, or JSON-escaped (``tojson``),
        whichever makes the template text that follows it match."""
        values: list[str] = []
        position = len(fragments[0])
        for (_, value), fragment in zip(sentinels, fragments[1:], strict=True):
            escaped = json.dumps(value, ensure_ascii=False)[1:-1]
            candidates = (value, value.strip(), escaped, json.dumps(value.strip(), ensure_ascii=False)[1:-1])
            chosen = next((c for c in candidates if real.startswith(c + fragment, position)), None)
            if chosen is None:
                raise UnrenderableError("chat_template rewrites message content beyond stripping whitespace")
            values.append(chosen)
            position += len(chosen) + len(fragment)
        if not real.startswith(fragments[0]) or _interleave(fragments, values) != real:
            raise UnrenderableError("chat_template rewrites message content beyond stripping whitespace")
        return values


def _interleave(fragments: list[str], contents: list[str]) -> str:
    parts = [fragments[0]]
    for content, fragment in zip(contents, fragments[1:], strict=True):
        parts.append(content)
        parts.append(fragment)
    return "".join(parts)
