"""The chat formats by name: what ``--template`` accepts. A new format is one module and one line here.

``RENDERERS`` maps a template name to its ``Renderer`` class; ``templates.resolve_template`` builds the
class with the tokenizer's ``Vocab``. A format defined outside this package joins with ``register`` (the
tests' throwaway format does); a format of the project belongs in ``RENDERERS`` below.
"""

from __future__ import annotations

from sft_stack.chat.renderer import Renderer
from sft_stack.chat.renderers.baichuan import Baichuan, Baichuan2
from sft_stack.chat.renderers.chatglm import ChatGLM
from sft_stack.chat.renderers.chatglm2 import ChatGLM2
from sft_stack.chat.renderers.chatglm3 import ChatGLM3
from sft_stack.chat.renderers.default import Default
from sft_stack.chat.renderers.llama2 import Llama2
from sft_stack.chat.renderers.llama3 import Llama3
from sft_stack.chat.renderers.moss import Moss
from sft_stack.chat.renderers.plain import Plain
from sft_stack.chat.renderers.qwen import ChatML
from sft_stack.chat.renderers.tokenizer import TokenizerTemplate

RENDERERS: dict[str, type[Renderer]] = {
    "default": Default,
    "plain": Plain,
    "llama2": Llama2,
    "qwen": ChatML,
    "llama3": Llama3,
    "baichuan": Baichuan,
    "baichuan2": Baichuan2,
    "chatglm": ChatGLM,
    "chatglm2": ChatGLM2,
    "chatglm3": ChatGLM3,
    "moss": Moss,
    "tokenizer": TokenizerTemplate,
}
"""Template name -> its renderer, in the order error messages list them (the tool formats: qwen first)."""

TEMPLATE_NAMES: tuple[str, ...] = tuple(RENDERERS)
"""The project's own ``--template`` values, besides ``auto`` (the template recorded by the converter in
tokenizer_config.json, else the tokenizer's own chat_template if it has one, else default)."""

TOOL_TEMPLATES: tuple[str, ...] = tuple(name for name, renderer in RENDERERS.items() if renderer.tool_format)
"""The project's templates with a tool format; the others reject conversations that use tools as
``no_tool_format``."""


def register(name: str, renderer: type[Renderer]) -> type[Renderer]:
    """Add a format defined outside this module under ``name``; refuses a name already taken (or ``auto``),
    since which format a name meant would then depend on the order of imports."""
    if name in RENDERERS or name == "auto":
        raise ValueError(f"chat format {name!r} is already registered")
    RENDERERS[name] = renderer
    return renderer


def template_names() -> tuple[str, ...]:
    """Every valid ``--template`` value besides ``auto``, registered formats included."""
    return tuple(RENDERERS)


def tool_template_names() -> tuple[str, ...]:
    """The templates with a tool format, registered formats included."""
    return tuple(name for name, renderer in RENDERERS.items() if renderer.tool_format)
