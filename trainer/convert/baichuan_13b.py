"""Baichuan-13B and Baichuan2-13B -> ``BaichuanAlibiForCausalLM`` (our class, ``trainer/models/baichuan_alibi.py``).

The 13B models are the Baichuan-7B block with ALiBi instead of RoPE: no ``max_position_embeddings`` in
config.json (only ``model_max_length``), no rotary buffer. The weights convert exactly like the 7B ones
(``W_pack`` [q | k | v] split into q/k/v_proj); Baichuan2-13B's NormHead rows are stored normalised (idempotent:
our class normalises in the forward too, so training keeps the original's gradient). Baichuan2 configs carry
``tokenizer_class`` (BaichuanTokenizer) and the larger vocabulary; Baichuan-13B's have neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trainer.models  # noqa: F401  registers model_type baichuan_alibi for the CLI's CONFIG_MAPPING lookup
from trainer.convert import ConvertError, RawConfig, SourceFamily, field
from trainer.convert.baichuan import build_tokenizer_2, convert_tensor, generation_config, source_shapes

BAICHUAN2_VOCAB = 125696
TURN_TOKENS = {"baichuan": ("<reserved_102>", "<reserved_103>"), "baichuan2": ("<reserved_106>", "<reserved_107>")}
"""The user/assistant tokens each template inserts; the vendor's generation_config.json names their ids."""


def _is_alibi_baichuan(raw: RawConfig) -> bool:
    return (
        raw.get("model_type") == "baichuan"
        and "max_position_embeddings" not in raw
        and "BaichuanForCausalLM" in raw.get("architectures", [])
    )


def _is_baichuan2(raw: RawConfig) -> bool:
    return "tokenizer_class" in raw or raw.get("vocab_size") == BAICHUAN2_VOCAB


def is_baichuan_13b(raw: RawConfig) -> bool:
    return _is_alibi_baichuan(raw) and not _is_baichuan2(raw)


def is_baichuan2_13b(raw: RawConfig) -> bool:
    return _is_alibi_baichuan(raw) and _is_baichuan2(raw)


def native_config(raw: RawConfig, *, norm_head: bool) -> dict[str, Any]:
    return {
        "architectures": ["BaichuanAlibiForCausalLM"],
        "model_type": "baichuan_alibi",
        "vocab_size": int(field(raw, "vocab_size")),
        "hidden_size": int(field(raw, "hidden_size")),
        "intermediate_size": int(field(raw, "intermediate_size")),
        "num_hidden_layers": int(field(raw, "num_hidden_layers")),
        "num_attention_heads": int(field(raw, "num_attention_heads")),
        "hidden_act": str(raw.get("hidden_act", "silu")),
        "max_position_embeddings": int(field(raw, "model_max_length")),
        "rms_norm_eps": float(field(raw, "rms_norm_eps")),
        "initializer_range": float(raw.get("initializer_range", 0.02)),
        "norm_head": norm_head,
        "z_loss_weight": float(raw.get("z_loss_weight", 0.0)) if norm_head else 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": int(raw.get("pad_token_id", 0)),
        "bos_token_id": int(raw.get("bos_token_id", 1)),
        "eos_token_id": int(raw.get("eos_token_id", 2)),
    }


def build_tokenizer(src: Path, raw: RawConfig, template: str) -> Any:
    """The 7B models' SentencePiece tokenizer, checked against the vendor's generation_config.json: the template's
    user/assistant tokens must have its ``user_token_id``/``assistant_token_id`` (195/196 in both vocabularies)."""
    tokenizer = build_tokenizer_2(src, raw, template)
    check_turn_tokens(tokenizer, src, template)
    return tokenizer


def check_turn_tokens(tokenizer: Any, src: Path, template: str) -> None:
    """ConvertError when the template's turn tokens are not the ids the vendor's generation_config.json names."""
    generation_file = src / "generation_config.json"
    if template in TURN_TOKENS and generation_file.is_file():
        vendor = json.loads(generation_file.read_text(encoding="utf-8"))
        for token, key in zip(TURN_TOKENS[template], ("user_token_id", "assistant_token_id"), strict=True):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if key in vendor and token_id != vendor[key]:
                raise ConvertError(
                    f"{generation_file}: {key} is {vendor[key]} but template {template!r} inserts {token} "
                    f"(id {token_id} in {src}/tokenizer.model); pass the matching --chat-template"
                )


BAICHUAN_13B = SourceFamily(
    name="baichuan_13b",
    is_source=is_baichuan_13b,
    native_config=lambda raw: native_config(raw, norm_head=False),
    source_shapes=lambda raw: source_shapes(raw, rotary_buffer=False),
    convert_tensor=lambda key, tensor, raw: convert_tensor(key, tensor, raw, norm_head=False),
    build_tokenizer=build_tokenizer,
    chat_template=lambda src, raw: "baichuan",
    generation_config=generation_config,
)

BAICHUAN2_13B = SourceFamily(
    name="baichuan2_13b",
    is_source=is_baichuan2_13b,
    native_config=lambda raw: native_config(raw, norm_head=True),
    source_shapes=lambda raw: source_shapes(raw, rotary_buffer=False),
    convert_tensor=lambda key, tensor, raw: convert_tensor(key, tensor, raw, norm_head=True),
    build_tokenizer=build_tokenizer,
    chat_template=lambda src, raw: "baichuan2",
    generation_config=generation_config,
)
