"""The ``chatglm3`` format: ChatGLM3's role tokens, with its tool format."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

from sft_stack.chat.conversation import Message
from sft_stack.chat.renderer import Layout, NoToolFormatError, Renderer
from sft_stack.chat.tools import call_arguments, function_schemas, one_call_per_step, to_json
from sft_stack.chat.vocab import Vocab

CHATGLM3_TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
"""ChatGLM3's tool system prompt; the tools follow as JSON (indent 4)."""


class ChatGLM3(Renderer):
    """ChatGLM3: ``[gMASK]sop`` then, per message, ``<|role|>`` + ids of ``"\n"`` + ids of the content.

    As THUDM's ``build_single_message`` does, the metadata line ``"\n"`` and the content are tokenized
    separately (each with SentencePiece's dummy prefix). As in ChatGLM3's own fine-tuning code, the assistant's
    turn is everything after ``<|assistant|>`` (the ``\n`` line and the text), and what closes it is trained:
    the next ``<|user|>`` (ChatGLM3's stop token) or, after the last answer, eos.
    """

    tool_format = True

    def __init__(self, v: Vocab) -> None:
        super().__init__(v)
        self.prefix = (v.control("[gMASK]"), v.control("sop"))
        self.role = {role: v.control(f"<|{role}|>") for role in ("system", "user", "assistant")}
        self.newline = v.literal("\n")
        observation = v.single_token("<|observation|>")
        self.stop_token_ids = (self.role["user"], *([observation] if observation is not None else []), v.eos)
        self.observation = observation

    def render(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str] = ()) -> Layout:
        if tools or any(m.tool_calls or m.role == "tool" for m in messages):
            return self._render_tools(messages, trained, tools)
        out = Layout()
        out.add(self.prefix)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            if m.role == "assistant":
                out.add(self.newline, trained[i])
                out.add(m.content, trained[i])
                if i == last:
                    out.add(self.eos, trained[i])
                continue
            closes_answer = i > 0 and trained[i - 1]
            out.add(self.role[m.role], closes_answer)
            out.add(self.newline)
            out.add(m.content)
            if m.role == "user":
                out.add(self.role["assistant"])
        return out

    def _render_tools(self, messages: Sequence[Message], trained: Sequence[bool], tools: Sequence[str]) -> Layout:
        """ChatGLM3's tool format (its tool demo and fine-tuning preprocessing): the tools as JSON (indent 4) in a
        system turn first; a call is an assistant turn whose metadata line is the tool name and whose text is
        a fenced python block ``tool_call(city='Paris')``; its result an ``<|observation|>`` turn.
        One call per assistant turn; text said before a call is an assistant turn of its own. The token after
        a trained assistant turn (``<|assistant|>``, ``<|observation|>``, ``<|user|>``) is trained, eos last."""
        if self.observation is None:
            raise NoToolFormatError("this tokenizer has no <|observation|> token (ChatGLM3's tool result role)")
        messages, trained, before = one_call_per_step(messages, trained)
        out = Layout()
        out.add(self.prefix)
        closes = False  # whether the next role token closes a trained assistant turn (ChatGLM3's shifted mask)

        def turn(role: int, text: str, is_trained: bool) -> None:
            # build_single_message: the role token, then the metadata line "\n" and the text, tokenized apart
            nonlocal closes
            out.add(role, closes)
            out.add(self.newline, is_trained)
            out.add(text, is_trained)
            closes = is_trained

        if tools:
            turn(self.role["system"], CHATGLM3_TOOLS_SYSTEM + "\n" + to_json(function_schemas(tools), indent=4), False)
        for i, m in enumerate(messages):
            if m.role == "assistant" and m.tool_calls:
                (call,) = m.tool_calls
                if before[i]:
                    out.add(self.newline, trained[i])
                    out.add(before[i], trained[i])
                    closes = trained[i]
                    out.add(self.role["assistant"], closes)
                # The metadata line is the tool's name; the text is the call as Python code.
                out.add(f"{call.name}\n", trained[i])
                out.add(f"```python\n{_python_call('tool_call', call_arguments(call))}\n```", trained[i])
                closes = trained[i]
            elif m.role == "assistant":
                out.add(self.newline, trained[i])
                out.add(m.content, trained[i])
                closes = trained[i]
                if i == len(messages) - 1:
                    out.add(self.eos, trained[i])
            else:
                role = self.observation if m.role == "tool" else self.role[m.role]
                turn(role, m.content, False)
                last_of_results = m.role == "tool" and (i + 1 == len(messages) or messages[i + 1].role != "tool")
                if m.role == "user" or last_of_results:
                    out.add(self.role["assistant"])
        return out


def _python_call(name: str, arguments: Any) -> str:
    """``tool_call(city='Paris')`` as ChatGLM3 writes a call (Python's ast.unparse of the keyword call); a
    non-object argument (MOSS's one string) is passed positionally."""
    if isinstance(arguments, dict):
        keywords = [ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()]
        call = ast.Call(func=ast.Name(id=name), args=[], keywords=keywords)
    else:
        values = arguments if isinstance(arguments, list) else [arguments]
        call = ast.Call(func=ast.Name(id=name), args=[ast.Constant(v) for v in values], keywords=[])
    return ast.unparse(call)
