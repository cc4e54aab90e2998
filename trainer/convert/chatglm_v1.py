"""ChatGLM-6B (v1) -> ``ChatGLMv1ForCausalLM`` (our class, ``trainer/models/glm_v1.py``).

The original (model_type ``chatglm`` with ``position_encoding_2d``) keeps its parameter names in our class, so
the conversion is a rename of the config fields and a drop of the rotary ``inv_freq`` buffers (recomputed).
Weights keep their dtype (float16 in the release).

The tokenizer is not converted: ChatGLM-6B's ``ice_text.model`` is a SentencePiece model behind 20000 image
ids, with ``<n>``, tab and blank-run tokens added by the vendor's Python class, and no snapshot of it was
available to check a native rebuild against. ``python -m trainer.convert SRC DST --weights-only`` converts the
weights; put a tokenizer with the same ids (``[gMASK]`` 130001, ``<sop>`` 130004, ``<eop>`` 130005) next to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import trainer.models  # noqa: F401  registers model_type chatglm_v1 for the CLI's CONFIG_MAPPING lookup
from trainer.convert import ConvertError, RawConfig, SourceFamily, field


def is_source(raw: RawConfig) -> bool:
    return raw.get("model_type") == "chatglm" and bool(raw.get("position_encoding_2d"))


def native_config(raw: RawConfig) -> dict[str, Any]:
    if raw.get("pre_seq_len"):
        raise ConvertError("config.json: pre_seq_len is set (a P-Tuning v2 prefix encoder); convert the base model")
    return {
        "architectures": ["ChatGLMv1ForCausalLM"],
        "model_type": "chatglm_v1",
        "vocab_size": int(field(raw, "vocab_size")),
        "hidden_size": int(field(raw, "hidden_size")),
        "intermediate_size": int(field(raw, "inner_hidden_size")),
        "num_hidden_layers": int(field(raw, "num_layers")),
        "num_attention_heads": int(field(raw, "num_attention_heads")),
        "layer_norm_eps": float(field(raw, "layernorm_epsilon")),
        "max_position_embeddings": int(field(raw, "max_sequence_length")),
        "mask_token_id": int(field(raw, "mask_token_id")),
        "gmask_token_id": int(field(raw, "gmask_token_id")),
        "bos_token_id": int(field(raw, "bos_token_id")),
        "eos_token_id": int(field(raw, "eos_token_id")),
        "pad_token_id": int(field(raw, "pad_token_id")),
        "tie_word_embeddings": False,
        "use_cache": True,
    }


def source_shapes(raw: RawConfig) -> dict[str, tuple[int, ...]]:
    hidden, vocab = int(field(raw, "hidden_size")), int(field(raw, "vocab_size"))
    inner, heads = int(field(raw, "inner_hidden_size")), int(field(raw, "num_attention_heads"))
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.word_embeddings.weight": (vocab, hidden),
        "transformer.final_layernorm.weight": (hidden,),
        "transformer.final_layernorm.bias": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(int(field(raw, "num_layers"))):
        p = f"transformer.layers.{i}."
        for name, shape in (
            ("input_layernorm", (hidden,)),
            ("post_attention_layernorm", (hidden,)),
            ("attention.dense", (hidden, hidden)),
            ("attention.query_key_value", (3 * hidden, hidden)),
            ("mlp.dense_h_to_4h", (inner, hidden)),
            ("mlp.dense_4h_to_h", (hidden, inner)),
        ):
            shapes[f"{p}{name}.weight"] = shape
            shapes[f"{p}{name}.bias"] = (shape[0],)
        shapes[p + "attention.rotary_emb.inv_freq"] = (hidden // heads // 4,)
    return shapes


def convert_tensor(key: str, tensor: torch.Tensor, raw: RawConfig) -> list[tuple[str, torch.Tensor]]:
    if key.endswith("rotary_emb.inv_freq"):
        return []  # recomputed by the class (rounded to float16 as the original)
    return [(key, tensor)]


def build_tokenizer(src: Path, raw: RawConfig, template: str) -> Any:
    raise ConvertError(
        f"{src}: ChatGLM-6B's tokenizer (ice_text.model) is not converted; rerun with --weights-only and put a "
        "tokenizer with the original ids next to the converted weights (docs/models.md)"
    )


def generation_config(raw: RawConfig) -> dict[str, Any]:
    return {
        "bos_token_id": int(field(raw, "bos_token_id")),
        "eos_token_id": int(field(raw, "eos_token_id")),
        "pad_token_id": int(field(raw, "pad_token_id")),
    }


SOURCE = SourceFamily(
    name="chatglm_v1",
    is_source=is_source,
    native_config=native_config,
    source_shapes=source_shapes,
    convert_tensor=convert_tensor,
    build_tokenizer=build_tokenizer,
    chat_template=lambda src, raw: "chatglm",
    generation_config=generation_config,
)
