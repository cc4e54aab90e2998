"""Native fast tokenizers built from an original checkpoint's vocabulary files, every id unchanged.

The vendors' tokenizer classes are remote code; their vocabularies are plain files. ``sentencepiece_tokenizer``
builds a ``tokenizer.json`` from ``tokenizer.model`` with transformers' SentencePiece converter, which follows
the model's own normalizer settings (dummy prefix, byte fallback, user-defined pieces), then appends the
family's special tokens at their original ids. ``byte_level_tokenizer`` does the same for GPT-2-style
``vocab.json`` + ``merges.txt`` (MOSS).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.convert import ConvertError


def require_file(src: Path, name: str, what: str) -> Path:
    path = src / name
    if not path.is_file():
        raise ConvertError(f"{src}: no {name} ({what}); copy it from the original model repository into {src}")
    return path


def sentencepiece_tokenizer(
    model_file: Path,
    *,
    appended: Sequence[str] = (),
    control: Sequence[str] = (),
    control_pattern: str | None = None,
    prefix: Sequence[str] = (),
    bos: str | None,
    eos: str,
    unk: str,
    pad: str,
    split_special_tokens: bool,
    model_max_length: int,
) -> Any:
    """A PreTrainedTokenizerFast equal to the SentencePiece model of ``model_file`` plus special tokens.

    appended: special tokens after the last piece, in id order (ChatGLM's [MASK] ... <|observation|>).
    control: pieces of the model that are special tokens (matched whole by ``encode``, never by templates,
    which encode message text with special tokens as text). control_pattern: a regex; user-defined pieces that
    match it are control too (Baichuan2's <reserved_N>). prefix: tokens ``encode`` puts before the text.
    split_special_tokens: ``encode`` never matches special tokens in text (ChatGLM's own tokenizer does not).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # protobuf's DecodeError; one line for the user
        raise ConvertError(f"{model_file}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise ConvertError(f"{model_file}: not a SentencePiece model (no pieces)")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    user_defined = [p.piece for p in proto.pieces if p.type == 4]
    controls = [*control, *(p for p in user_defined if control_pattern and re.fullmatch(control_pattern, p))]
    for name in controls:
        if name not in vocab:
            raise ConvertError(f"{model_file}: piece {name!r} is not in this SentencePiece model")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    state = json.loads(backend.to_str())
    kept = [p for p in user_defined if p not in controls]
    if len(kept) != len(user_defined):
        # SentencePiece emits user-defined pieces whole, so the converter isolates them before BPE; a control
        # piece must not be isolated there, or message text that spells it would still become its id.
        steps: list[Any] = []
        if proto.normalizer_spec.add_dummy_prefix:
            steps.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
        if kept:
            pattern = "|".join(re.escape(p) for p in sorted(kept, key=len, reverse=True))
            steps.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
        state["pre_tokenizer"] = json.loads(pre_tokenizers.Sequence(steps).__getstate__()) if steps else None
    backend = Tokenizer.from_str(json.dumps(state))
    # Control pieces are special tokens: ``encode`` matches them whole as the vendor's tokenizer does; templates
    # encode message text with special tokens as text (sft_stack.chat.vocab.TextEncoder).
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in controls])
    first_new = len(proto.pieces)
    for offset, name in enumerate(appended):
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if backend.token_to_id(name) != first_new + offset:
            raise ConvertError(
                f"{model_file}: {name} would get id {backend.token_to_id(name)}, not {first_new + offset}"
            )
    if prefix:
        template = " ".join([*prefix, "$A"])
        pair = " ".join([*prefix, "$A", "$B"])
        backend.post_processor = processors.TemplateProcessing(
            single=template, pair=pair, special_tokens=[(name, backend.token_to_id(name)) for name in prefix]
        )
    special = {"eos_token": eos, "unk_token": unk, "pad_token": pad}
    if bos is not None:
        special["bos_token"] = bos
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        split_special_tokens=split_special_tokens,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **special,
    )


def byte_level_tokenizer(
    src: Path, *, special: Sequence[str], bos: str, eos: str, pad: str | None, model_max_length: int
) -> Any:
    """A PreTrainedTokenizerFast from GPT-2-style vocab.json + merges.txt (+ added_tokens.json) in ``src``."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = json.loads(require_file(src, "vocab.json", "the BPE vocabulary").read_text("utf-8"))
    merges_text = require_file(src, "merges.txt", "the BPE merges").read_text("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in merges_text if line and not line.startswith("#version")]
    added_file = src / "added_tokens.json"
    if added_file.is_file():
        vocab.update(json.loads(added_file.read_text("utf-8")))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))  # type: ignore[arg-type]
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    for name in special:
        if name not in vocab:
            raise ConvertError(
                f"{src}/vocab.json: special token {name!r} is missing; this is not this family's vocabulary"
            )
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special])
    kwargs = {"bos_token": bos, "eos_token": eos, **({"pad_token": pad} if pad else {})}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, clean_up_tokenization_spaces=False, **kwargs
    )
