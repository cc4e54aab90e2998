"""Loading a tokenizer from a local directory: the one loader that prepare, generate and evaluate use.

What it adds to ``AutoTokenizer.from_pretrained``: local files only (never the hub), a bare SentencePiece
``tokenizer.model`` converted to a fast tokenizer, a vendor tokenizer class (``auto_map``) refused unless the
caller trusts remote code, and every failure as one ``TokenizerError`` line naming the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    try:
        direct = _direct_class(directory)
        if direct is not None:
            return direct.from_pretrained(str(directory), local_files_only=True)  # type: ignore[no-any-return]
        from transformers import AutoTokenizer, LlamaTokenizerFast

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


def _direct_class(directory: Path) -> Any:
    """The tokenizer class ``AutoTokenizer`` picks for ``directory`` when that is certain without asking it, else None.

    ``AutoTokenizer`` decides through ``AutoConfig``, which imports torch: 2 of the 3.5 CPU-seconds ``prepare`` spends
    starting up. For a tokenizer.json whose tokenizer_config.json names ``TokenizersBackend`` (what transformers 5
    saves) or, without ByteLevel pre-tokenization, ``LlamaTokenizer``, and whose config.json is absent or a Llama's,
    every branch of its resolution ends in that same class (tests/unit/test_prepare_speed.py compares the two loaders
    on every tokenizer fixture); any other directory goes through ``AutoTokenizer``."""
    tokenizer_json, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not tokenizer_json.is_file() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        model = (
            json.loads((directory / "config.json").read_text(encoding="utf-8"))
            if (directory / "config.json").is_file()
            else {}
        )
    except (ValueError, OSError):
        return None
    if not isinstance(config, dict) or not isinstance(model, dict) or "auto_map" in config or "auto_map" in model:
        return None
    if model and model.get("model_type") != "llama":
        return None
    name = config.get("tokenizer_class")
    if name == "TokenizersBackend":
        from transformers import TokenizersBackend

        return TokenizersBackend
    if name in ("LlamaTokenizer", "LlamaTokenizerFast") and '"ByteLevel"' not in tokenizer_json.read_text("utf-8"):
        from transformers import LlamaTokenizer

        return LlamaTokenizer
    return None


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
