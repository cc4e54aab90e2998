"""Baichuan-7B and Baichuan2-7B -> ``LlamaForCausalLM``.

Both are LLaMA decoders (RMSNorm, SwiGLU, rotate-half RoPE base 10000 over the whole head, no biases) whose
q/k/v are fused in ``W_pack`` as [q | k | v], each ``hidden`` rows, head-major: a split gives Llama's
q/k/v_proj with no permutation. Baichuan2 adds NormHead: the model uses each ``lm_head`` row divided by its
L2 norm. The converter stores the normalized rows (exact for inference with plain transformers) and records
``norm_head: true`` in config.json, which makes full-parameter training keep normalizing in the forward
(``trainer.model``), as the original does.

The 13B models (no ``max_position_embeddings``, ALiBi) are another architecture and not accepted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.convert import RawConfig, SourceFamily, field
from trainer.convert.tokenizer import require_file, sentencepiece_tokenizer
from trainer.models.norm_head import normalized_lm_head

BAICHUAN2_CONTROL = r"<reserved_\d+>"
"""Baichuan2's user-defined <reserved_N> pieces (195/196 are the user/assistant turn tokens) are special tokens:
``encode`` matches them as the vendor's tokenizer does, templates keep them as text inside messages."""


def _is_rope_baichuan(raw: RawConfig) -> bool:
    # The 7B models have RoPE and max_position_embeddings; the 13B ones (ALiBi) only model_max_length.
    return raw.get("model_type") == "baichuan" and "max_position_embeddings" in raw


def is_baichuan_7b(raw: RawConfig) -> bool:
    return _is_rope_baichuan(raw) and "BaiChuanForCausalLM" in raw.get("architectures", [])


def is_baichuan2_7b(raw: RawConfig) -> bool:
    return _is_rope_baichuan(raw) and "BaichuanForCausalLM" in raw.get("architectures", [])


def _native_config(raw: RawConfig, norm_head: bool) -> dict[str, Any]:
    hidden, heads = int(field(raw, "hidden_size")), int(field(raw, "num_attention_heads"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(field(raw, "vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(field(raw, "intermediate_size")),
        "num_hidden_layers": int(field(raw, "num_hidden_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": str(raw.get("hidden_act", "silu")),
        "max_position_embeddings": int(field(raw, "max_position_embeddings")),
        "rms_norm_eps": float(field(raw, "rms_norm_eps")),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": float(raw.get("initializer_range", 0.02)),
        "use_cache": True,
        "pad_token_id": int(raw.get("pad_token_id", 0)),
        "bos_token_id": int(raw.get("bos_token_id", 1)),
        "eos_token_id": int(raw.get("eos_token_id", 2)),
    }
    if norm_head:
        # Read by trainer.model: full-parameter training normalizes lm_head rows in the forward (NormHead).
        config["norm_head"] = True
    return config


def source_shapes(raw: RawConfig, *, rotary_buffer: bool) -> dict[str, tuple[int, ...]]:
    hidden, heads = int(field(raw, "hidden_size")), int(field(raw, "num_attention_heads"))
    vocab, inner = int(field(raw, "vocab_size")), int(field(raw, "intermediate_size"))
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(int(field(raw, "num_hidden_layers"))):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.W_pack.weight": (3 * hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inner, hidden),
            p + "mlp.up_proj.weight": (inner, hidden),
            p + "mlp.down_proj.weight": (hidden, inner),
        }
        if rotary_buffer:
            shapes[p + "self_attn.rotary_emb.inv_freq"] = (hidden // heads // 2,)
    return shapes


def convert_tensor(
    key: str, tensor: torch.Tensor, raw: RawConfig, *, norm_head: bool
) -> list[tuple[str, torch.Tensor]]:
    """One original Baichuan tensor (7B or 13B) to its native tensors: W_pack split, NormHead rows normalized."""
    if key.endswith("rotary_emb.inv_freq"):
        return []  # 7B only: recomputed by Llama's rotary embedding
    if key.endswith("self_attn.W_pack.weight"):
        prefix = key.removesuffix("W_pack.weight")
        q, k, v = torch.chunk(tensor, 3, dim=0)  # [q | k | v], hidden rows each
        return [(f"{prefix}{name}_proj.weight", part) for name, part in (("q", q), ("k", k), ("v", v))]
    if key == "lm_head.weight" and norm_head:
        # NormHead: the original divides every row by its L2 norm in the forward (idempotent).
        return [(key, normalized_lm_head(tensor))]
    return [(key, tensor)]


def chat_template_7b(src: Path, raw: RawConfig) -> str:
    # Baichuan-7B is a base model with no chat format of its own.
    return "default"


def chat_template_2(src: Path, raw: RawConfig) -> str:
    return "baichuan2"


def build_tokenizer_7b(src: Path, raw: RawConfig, template: str) -> Any:
    # Baichuan-7B's SentencePiece model: same tokenizer class as Baichuan2 (no dummy prefix, no bos/eos added).
    return build_tokenizer_2(src, raw, template)


def build_tokenizer_2(src: Path, raw: RawConfig, template: str) -> Any:
    return sentencepiece_tokenizer(
        require_file(src, "tokenizer.model", "Baichuan's SentencePiece vocabulary"),
        control=("<unk>", "<s>", "</s>"),
        control_pattern=BAICHUAN2_CONTROL,
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad="<unk>",
        split_special_tokens=False,
        model_max_length=int(raw.get("model_max_length") or raw.get("max_position_embeddings") or 4096),
    )


def generation_config(raw: RawConfig) -> dict[str, Any]:
    return {
        "bos_token_id": int(raw.get("bos_token_id", 1)),
        "eos_token_id": int(raw.get("eos_token_id", 2)),
        "pad_token_id": int(raw.get("pad_token_id", 0)),
    }


BAICHUAN_7B = SourceFamily(
    name="baichuan_7b",
    is_source=is_baichuan_7b,
    native_config=lambda raw: _native_config(raw, norm_head=False),
    source_shapes=lambda raw: source_shapes(raw, rotary_buffer=True),
    convert_tensor=lambda key, tensor, raw: convert_tensor(key, tensor, raw, norm_head=False),
    build_tokenizer=build_tokenizer_7b,
    chat_template=chat_template_7b,
    generation_config=generation_config,
)

BAICHUAN2_7B = SourceFamily(
    name="baichuan2_7b",
    is_source=is_baichuan2_7b,
    native_config=lambda raw: _native_config(raw, norm_head=True),
    source_shapes=lambda raw: source_shapes(raw, rotary_buffer=False),
    convert_tensor=lambda key, tensor, raw: convert_tensor(key, tensor, raw, norm_head=True),
    build_tokenizer=build_tokenizer_2,
    chat_template=chat_template_2,
    generation_config=generation_config,
)
