"""Loading a tokenizer from a local directory: the one loader that prepare, generate and evaluate use.

What it adds to ``AutoTokenizer.from_pretrained``: local files only (never the hub), a bare SentencePiece
``tokenizer.model`` converted to a fast tokenizer, a vendor tokenizer class (``auto_map``) refused unless the
caller trusts remote code, and every failure as one ``TokenizerError`` line naming the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken")
"""Any one of these marks a directory that holds a tokenizer."""


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used; the message is one line starting with the directory."""


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in directory ``path``; TokenizerError (one line) when there is none or it does not load."""
    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"{path}: not a directory; pass the model or tokenizer directory")
    if not has_tokenizer(directory):
        raise TokenizerError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there")
    if not trust_remote_code:
        refuse_vendor_tokenizer(directory)
    from transformers import AutoTokenizer, LlamaTokenizerFast

    try:
        if not (directory / "tokenizer.json").is_file() and (directory / "tokenizer.model").is_file():
            # A bare SentencePiece model (e.g. Llama 2): transformers converts it to a fast tokenizer.
            return LlamaTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=trust_remote_code
        )
        return tokenizer
    except Exception as exc:  # transformers raises many types here; the user needs one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"{path}: does not load ({first}); pass a directory with tokenizer.json or tokenizer.model"
        ) from exc


def refuse_vendor_tokenizer(directory: Path) -> None:
    """A tokenizer whose class is vendor code (``auto_map``: ChatGLM, Baichuan, MOSS originals) would be loaded
    as something else or not at all, and tokenize silently wrong: refuse it in one line naming the converter."""
    config_file = directory / "tokenizer_config.json"
    if not config_file.is_file() or (directory / "tokenizer.json").is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerError(f"{config_file}: not valid JSON ({exc})") from None
    if isinstance(config, dict) and "auto_map" in config:
        vendor = config.get("tokenizer_class", "a vendor tokenizer")
        raise TokenizerError(
            f"{directory}: {vendor} is vendor code (auto_map in tokenizer_config.json) that is not run; "
            f"convert the model once with `sft convert {directory} {str(directory).rstrip('/')}-native` "
            "and pass the output"
        )
