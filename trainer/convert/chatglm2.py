"""ChatGLM2-6B / ChatGLM3-6B (and their -32k variants) -> ``GlmForCausalLM``.

The original (model_type ``chatglm``, ``ChatGLMForConditionalGeneration``) is a pre-norm RMSNorm decoder with
grouped-query attention (``multi_query_group_num`` K/V heads of ``kv_channels`` dims), a bias on the fused QKV
only, a SwiGLU MLP whose fused ``dense_h_to_4h`` rows are [gate | up], and interleaved rotary embeddings on the
first half of each head, base 10000 (times ``rope_ratio`` in the long-context revisions). That is exactly
transformers' Glm with ``partial_rotary_factor`` 0.5 and ``attention_bias``; the conversion is a split of the
fused QKV and a rename. ChatGLM-6B v1 (``position_encoding_2d``) is another architecture and not accepted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.convert import ConvertError, RawConfig, SourceFamily, field
from trainer.convert.tokenizer import require_file, sentencepiece_tokenizer

GLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
"""Ids 64789..64793, right after the 64789 SentencePiece pieces (ChatGLM2 and ChatGLM3)."""
GLM3_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
"""ChatGLM3 only: ids 64794..64797."""


def is_source(raw: RawConfig) -> bool:
    return raw.get("model_type") == "chatglm" and "multi_query_group_num" in raw and not raw.get("position_encoding_2d")


def _sizes(raw: RawConfig) -> tuple[int, int, int, int]:
    """(heads, kv heads, head dim, hidden)."""
    heads = int(field(raw, "num_attention_heads"))
    groups = int(field(raw, "multi_query_group_num")) if raw.get("multi_query_attention") else heads
    return heads, groups, int(field(raw, "kv_channels")), int(field(raw, "hidden_size"))


def native_config(raw: RawConfig) -> dict[str, Any]:
    heads, groups, head_dim, hidden = _sizes(raw)
    for key, expected in (
        ("rmsnorm", True),
        ("post_layer_norm", True),
        ("apply_residual_connection_post_layernorm", False),
        ("add_bias_linear", False),
        ("add_qkv_bias", True),
    ):
        if raw.get(key, expected) != expected:
            raise ConvertError(f"config.json: {key}={raw[key]} is not supported (GlmForCausalLM needs {expected})")
    if raw.get("pre_seq_len"):
        raise ConvertError("config.json: pre_seq_len is set (a P-Tuning v2 prefix encoder); convert the base model")
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": int(field(raw, "padded_vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(field(raw, "ffn_hidden_size")),
        "num_hidden_layers": int(field(raw, "num_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "attention_bias": True,
        "max_position_embeddings": int(field(raw, "seq_length")),
        "rms_norm_eps": float(field(raw, "layernorm_epsilon")),
        "rope_parameters": {
            "rope_type": "default",
            # Later THUDM revisions (the -32k models) scale the base by rope_ratio; absent means 1.
            "rope_theta": 10000.0 * float(raw.get("rope_ratio", 1.0)),
            "partial_rotary_factor": 0.5,
        },
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": int(raw.get("pad_token_id", 0)),
        "eos_token_id": int(raw.get("eos_token_id", 2)),
        "bos_token_id": None,
    }


def source_shapes(raw: RawConfig) -> dict[str, tuple[int, ...]]:
    heads, groups, head_dim, hidden = _sizes(raw)
    vocab, ffn = int(field(raw, "padded_vocab_size")), int(field(raw, "ffn_hidden_size"))
    qkv = (heads + 2 * groups) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (vocab, hidden),
        "transformer.encoder.final_layernorm.weight": (hidden,),
        "transformer.output_layer.weight": (vocab, hidden),
        # Recomputed by the native class; old checkpoints store it (rotary dim / 2 frequencies).
        "transformer.rotary_pos_emb.inv_freq": (head_dim // 4,),
    }
    for i in range(int(field(raw, "num_layers"))):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attention.query_key_value.weight": (qkv, hidden),
            p + "self_attention.query_key_value.bias": (qkv,),
            p + "self_attention.dense.weight": (hidden, heads * head_dim),
            p + "mlp.dense_h_to_4h.weight": (2 * ffn, hidden),
            p + "mlp.dense_4h_to_h.weight": (hidden, ffn),
        }
    return shapes


_RENAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    # Both fused as [gate | up]: Glm keeps the fused gate_up_proj.
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def convert_tensor(key: str, tensor: torch.Tensor, raw: RawConfig) -> list[tuple[str, torch.Tensor]]:
    if key in _RENAMES:
        return [(_RENAMES[key], tensor)]
    if key == "transformer.rotary_pos_emb.inv_freq":
        return []
    layer, rest = key.removeprefix("transformer.encoder.layers.").split(".", 1)
    prefix = f"model.layers.{layer}."
    if rest.startswith("self_attention.query_key_value."):
        heads, groups, head_dim, _ = _sizes(raw)
        kind = rest.rsplit(".", 1)[1]  # weight or bias
        # Rows: [q: heads x head_dim | k: groups x head_dim | v: groups x head_dim], each head-major.
        q, k, v = torch.split(tensor, [heads * head_dim, groups * head_dim, groups * head_dim], dim=0)
        return [(f"{prefix}self_attn.{name}_proj.{kind}", part) for name, part in (("q", q), ("k", k), ("v", v))]
    return [(prefix + _LAYER_RENAMES[rest], tensor)]


def chat_template(src: Path, raw: RawConfig) -> str:
    """chatglm3 or chatglm2: the two share config fields and vocabulary, so the name recorded by THUDM decides."""
    names = [str(raw.get("_name_or_path", ""))]
    tokenizer_config = src / "tokenizer_config.json"
    if tokenizer_config.is_file():
        names.append(str(json.loads(tokenizer_config.read_text("utf-8")).get("name_or_path", "")))
    if any("chatglm3" in name.lower() for name in names):
        return "chatglm3"
    if any("chatglm2" in name.lower() for name in names):
        return "chatglm2"
    raise ConvertError(
        f"{src}/config.json: _name_or_path {names[0]!r} names neither chatglm2 nor chatglm3 (same layout, different "
        "chat format and vocabulary); pass --chat-template chatglm2 or --chat-template chatglm3"
    )


def build_tokenizer(src: Path, raw: RawConfig, template: str) -> Any:
    glm3 = template == "chatglm3"
    return sentencepiece_tokenizer(
        require_file(src, "tokenizer.model", "ChatGLM's SentencePiece vocabulary"),
        appended=(*GLM_SPECIAL, *(GLM3_ROLES if glm3 else ())),
        control=("<unk>", "<s>", "</s>"),
        prefix=("[gMASK]", "sop"),
        bos=None,
        eos="</s>",
        unk="<unk>",
        pad="<unk>",
        # THUDM's tokenizer never matches special-token text inside a string: [gMASK], sop, <|user|> ... in
        # text are encoded as their pieces; the ids only come from the prompt builder.
        split_special_tokens=True,
        model_max_length=int(field(raw, "seq_length")),
    )


def generation_config(raw: RawConfig) -> dict[str, Any]:
    return {"eos_token_id": int(raw.get("eos_token_id", 2)), "pad_token_id": int(raw.get("pad_token_id", 0))}


SOURCE = SourceFamily(
    name="chatglm2",
    is_source=is_source,
    native_config=native_config,
    source_shapes=source_shapes,
    convert_tensor=convert_tensor,
    build_tokenizer=build_tokenizer,
    chat_template=chat_template,
    generation_config=generation_config,
)
