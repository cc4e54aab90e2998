"""What a chat template needs from a tokenizer: plain-text encoding and control-token lookup.

``TextEncoder`` tokenizes message text so that a control string inside it (``<|im_end|>``) stays text. For a
fast tokenizer it works on a private copy of tokenizer.json changed in three ways (the "surgery"): every added
token counts as special and is encoded as the text it spells, the model's own vocabulary entries for those
tokens are made unreachable from text, and a second copy drops SentencePiece's dummy prefix (for ``Joined``
parts). ``Vocab`` looks up a format's control tokens once and names the tokenizer when one is missing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sft_stack.chat.conversation import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ENCODE_CHUNK = 2048
"""Texts per call of the Rust tokenizer: bounds the memory of its Encoding objects; large enough that the
per-call overhead is nothing."""


class TextEncoder:
    """Batched plain-text tokenization: control strings inside the text are never matched as tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        self.bos_prefix: tuple[int, ...] = (bos,) if bos is not None and bos != self.eos_id else ()
        self._backend_json: str | None = None
        self._backend: Any = None
        self._joined_json: str | None = None
        self._joined_backend: Any = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A private copy in which every added token counts as special, and special tokens are encoded
            # as the text they spell: "<|im_end|>" in a message becomes "<", "|", "im", ... never id 151645.
            # (encode_special_tokens alone would still match added tokens not flagged special.)
            raw = json.loads(backend.to_str())
            for added in raw.get("added_tokens") or []:
                added["special"] = True
            _unspell_special_pieces(raw)
            self._backend_json = json.dumps(raw)
            self._backend = _plain_text_backend(self._backend_json)
            # Its Joined twin is built on first use: most templates have no Joined part, and building a backend
            # is a tenth of prepare's start-up.
            self._joined_json = json.dumps(_without_dummy_prefix(raw))

    def __getstate__(self) -> dict[str, Any]:
        # tokenizers does not pickle encode_special_tokens: rebuild the backend on unpickling (workers).
        return {**self.__dict__, "_backend": None, "_joined_backend": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._backend_json is not None:
            self._backend = _plain_text_backend(self._backend_json)

    def encode(self, texts: list[str], *, joined: bool = False) -> list[list[int]]:
        """Ids of each text; joined: without the SentencePiece dummy prefix (see ``Joined``)."""
        if not texts:
            return []
        if joined and self._joined_backend is None and self._joined_json is not None:
            self._joined_backend = _plain_text_backend(self._joined_json)  # two threads may both build it: same ids
        backend = self._joined_backend if joined else self._backend
        if backend is not None:
            # encode_batch_fast skips offsets; both run the batch in Rust threads. Sub-batches of ENCODE_CHUNK
            # texts: a Rust Encoding also holds token strings and masks (several times the ids' size), so only
            # one sub-batch of them is alive at a time, whatever the block size.
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids: list[list[int]] = []
            for start in range(0, len(texts), ENCODE_CHUNK):
                chunk = texts[start : start + ENCODE_CHUNK]
                ids.extend(encoding.ids for encoding in encode(chunk, add_special_tokens=False))
            return ids
        # Slow (Python) tokenizers, e.g. remote-code ChatGLM/Baichuan ones: one batched call as well.
        out = self._tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
        return [list(ids) for ids in out["input_ids"]]


def _unspell_special_pieces(raw: dict[str, Any]) -> None:
    """Make the model's own entries for special tokens unreachable from text, in the plain-text copy.

    A SentencePiece-converted BPE emits a word found whole in its vocabulary (``ignore_merges``), so a message
    that is exactly ``</s>`` or Baichuan2's ``<reserved_106>`` would become the control id even with special
    tokens encoded as text. The entry is renamed with a trailing space, which normalized text never contains
    (spaces become "▁" or "Ġ"); merges alone never build these pieces. The model's unk piece stays.
    """
    model = raw.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        return
    for added in raw.get("added_tokens") or []:
        content = added["content"]
        if content in vocab and content != model.get("unk_token"):
            vocab[content + " "] = vocab.pop(content)


def _without_dummy_prefix(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a tokenizer.json that does not prepend SentencePiece's "▁" to a text (for ``Joined`` parts)."""

    def strip(node: Any) -> Any:
        if isinstance(node, list):
            return [strip(item) for item in node if not _is_dummy_prefix_step(item)]
        if isinstance(node, dict):
            out = {key: strip(value) for key, value in node.items()}
            if out.get("type") == "Metaspace":
                out["prepend_scheme"] = "never"
            return out
        return node

    return {key: strip(value) if key in ("normalizer", "pre_tokenizer") else value for key, value in raw.items()}


def _is_dummy_prefix_step(step: Any) -> bool:
    if not isinstance(step, dict):
        return False
    if step.get("type") == "Prepend":
        return True
    return step.get("type") == "Replace" and step.get("pattern") == {"Regex": "\\A▁"}


def _plain_text_backend(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


class Vocab:
    """What a template needs from a tokenizer, checked once when the template is built."""

    def __init__(self, template: str, tokenizer: PreTrainedTokenizerBase) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if tokenizer.eos_token_id is None:
            raise InputError(
                f"template {template!r} does not fit tokenizer {self.where}: it has no eos_token; "
                "set eos_token in its tokenizer_config.json"
            )
        self.encoder = TextEncoder(tokenizer)
        self.eos: int = tokenizer.eos_token_id
        self.bos_prefix = self.encoder.bos_prefix

    def single_token(self, token: str) -> int | None:
        """The id of ``token`` when it is exactly one token of this vocabulary, else None."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id < 0:
            return None
        if token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token:
            return None
        return token_id if self.tokenizer.convert_ids_to_tokens(token_id) == token else None

    def control(self, token: str) -> int:
        token_id = self.single_token(token)
        if token_id is None:
            raise InputError(
                f"template {self.template!r} does not fit tokenizer {self.where}: its control token {token!r} "
                "is not a single token of this vocabulary; use this family's tokenizer or another --template"
            )
        return token_id

    def literal(self, text: str) -> tuple[int, ...]:
        """Constant template text, tokenized once as plain text."""
        return tuple(self.encoder.encode([text])[0])

    def marker(self, token: str) -> int | tuple[int, ...]:
        """A role marker that is one token in some vocabularies and plain text in others."""
        token_id = self.single_token(token)
        return token_id if token_id is not None else self.literal(token)
