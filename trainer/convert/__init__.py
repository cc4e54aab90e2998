"""Convert an original (remote-code) checkpoint, once, into the transformers class it really is.

``python -m trainer.convert SRC DST [--check]`` reads SRC's ``config.json``, finds the one source family whose
``is_source`` accepts it (``registry.detect_source``), and writes DST: safetensors shards + index, ``config.json``,
``generation_config.json``, a native fast tokenizer (``tokenizer.json``) and ``conversion.json`` (source,
family, chat template). No vendor code is run or copied; the weights stream shard by shard (``weights.py``).

The per-family interface
------------------------
A family is one module in this package that defines ``SOURCE = SourceFamily(...)`` (or several, one per
variant), listed in ``converted_from`` of the ``trainer.families`` record of the model family it becomes
(``glm``, ``llama``, ``codegen`` ...: ``native_family`` in ``conversion.json``). The fields, all plain
functions of the parsed original ``config.json`` (``raw``):

- ``name``: registry key, recorded in ``conversion.json`` (``chatglm2``, ``baichuan2_7b``, ``moss`` ...).
- ``is_source(raw) -> bool``: this family's original layout (``model_type``, ``architectures``, shape
  fields). Exactly one family may accept a config; two or none is an error naming config.json.
- ``native_config(raw) -> dict``: the native ``config.json`` (``model_type``, ``architectures`` and the target
  class' fields). Raise ``ConvertError`` naming ``config.json`` and the field for a value it cannot map.
- ``source_shapes(raw) -> dict[key, shape]``: every tensor the original checkpoint holds, with its shape.
  A key outside it, a shape that differs, or a key missing from every shard is refused (file + key + field).
- ``convert_tensor(key, tensor, raw) -> list[(native_key, tensor)]``: one original tensor to its native
  tensors (a fused QKV becomes three); ``[]`` drops it (buffers the native class recomputes). It must not
  depend on other tensors, which is what lets the converter hold one shard at a time.
- ``build_tokenizer(src_dir, raw, template) -> PreTrainedTokenizerFast``: the native fast tokenizer with the family's
  special tokens at their original ids (``tokenizer.py`` has the SentencePiece and byte-level builders).
  Raise ``ConvertError`` naming the missing file (e.g. ``tokenizer.model``).
- ``chat_template(src_dir, raw) -> str``: the ``sft_stack.chat.registry`` name for this checkpoint; it is
  written to ``tokenizer_config.json`` (``chat_format``), so ``prepare --template auto`` and ``generate`` pick it.
  ``--chat-template`` overrides it; ``build_tokenizer`` receives the final name.
- ``generation_config(raw) -> dict``: ``generation_config.json`` of the native model (pad/bos; the vendor's
  sampling defaults are not carried over). ``eos_token_id`` is set by the converter to the template's stop
  tokens (end of turn and eos).

Errors a user can cause raise ``ConvertError`` with one line naming the file and the field or key;
``__main__`` prints it and exits 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

RawConfig = dict[str, Any]
"""The original checkpoint's config.json, parsed."""

CONVERSION_FILE = "conversion.json"
"""Written into every converted directory: source path, source family, chat template, converter version."""

CONVERT_COMMAND = "python -m trainer.convert"
"""How error messages elsewhere (trainer start-up, prepare) name the converter."""


class ConvertError(Exception):
    """A problem with the source checkpoint the user can fix; the message is one line naming file and field."""


@dataclass(frozen=True, kw_only=True)
class SourceFamily:
    """One original checkpoint layout and how it maps onto a native transformers class (see module docstring)."""

    name: str
    """Registry key, recorded as ``source_family`` in conversion.json."""
    is_source: Callable[[RawConfig], bool]
    """True when config.json is this family's original layout."""
    native_config: Callable[[RawConfig], dict[str, Any]]
    """The native config.json (model_type, architectures and the target class' fields)."""
    source_shapes: Callable[[RawConfig], dict[str, tuple[int, ...]]]
    """Every tensor key of the original checkpoint with its shape."""
    convert_tensor: Callable[[str, torch.Tensor, RawConfig], list[tuple[str, torch.Tensor]]]
    """One original tensor to native (key, tensor) pairs; [] drops it."""
    build_tokenizer: Callable[[Path, RawConfig, str], PreTrainedTokenizerFast]
    """The native fast tokenizer, built from the original vocabulary files in the source directory."""
    chat_template: Callable[[Path, RawConfig], str]
    """sft_stack.chat.registry name for this checkpoint."""
    generation_config: Callable[[RawConfig], dict[str, Any]]
    """generation_config.json of the native model."""


def field(raw: RawConfig, key: str) -> Any:
    """``raw[key]``, or ConvertError naming config.json and the missing field."""
    if key not in raw:
        raise ConvertError(f"config.json: field {key!r} is missing; this does not look like an original checkpoint")
    return raw[key]
