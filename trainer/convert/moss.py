"""MOSS-moon-003 -> ``CodeGenForCausalLM``.

MOSS's modeling code is CodeGen's: GPT-J parallel blocks with one LayerNorm, fused ``qkv_proj`` in 4
model-parallel chunks of [q | v | k], interleaved rotary on the first ``rotary_dim`` dims, an LM head with a
bias. The key names are CodeGen's too, so the conversion drops the stored ``causal_mask`` buffers and renames
nothing. The tokenizer is GPT-2-style byte-level BPE (vocab.json + merges.txt) with MOSS's turn tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trainer.convert import ConvertError, RawConfig, SourceFamily, field
from trainer.convert.tokenizer import byte_level_tokenizer

MOSS_SPECIAL = ("<eoh>", "<eom>", "<|Human|>", "<|MOSS|>")
"""Turn tokens the moss template needs; they must be in the vocabulary (the real one has them)."""


def is_source(raw: RawConfig) -> bool:
    return raw.get("model_type") == "moss"


def native_config(raw: RawConfig) -> dict[str, Any]:
    if int(raw.get("wbits", 32)) != 32:
        raise ConvertError(f"config.json: wbits={raw['wbits']} (a GPTQ-quantized MOSS); convert the fp16 checkpoint")
    n_embd, n_head = int(field(raw, "n_embd")), int(field(raw, "n_head"))
    if n_head % 4:
        raise ConvertError(f"config.json: n_head={n_head} is not a multiple of MOSS's 4 model-parallel chunks")
    return {
        "architectures": ["CodeGenForCausalLM"],
        "model_type": "codegen",
        "vocab_size": int(field(raw, "vocab_size")),
        "n_positions": int(field(raw, "n_positions")),
        "n_ctx": int(raw.get("n_ctx") or raw["n_positions"]),
        "n_embd": n_embd,
        "n_layer": int(field(raw, "n_layer")),
        "n_head": n_head,
        "rotary_dim": int(field(raw, "rotary_dim")),
        "n_inner": raw.get("n_inner"),
        "activation_function": str(raw.get("activation_function", "gelu_new")),
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": float(field(raw, "layer_norm_epsilon")),
        "initializer_range": float(raw.get("initializer_range", 0.02)),
        "use_cache": True,
        "tie_word_embeddings": False,
        "bos_token_id": int(field(raw, "bos_token_id")),
        "eos_token_id": int(field(raw, "eos_token_id")),
    }


def source_shapes(raw: RawConfig) -> dict[str, tuple[int, ...]]:
    n_embd, vocab = int(field(raw, "n_embd")), int(field(raw, "vocab_size"))
    inner = int(raw.get("n_inner") or 4 * n_embd)
    positions = int(field(raw, "n_positions"))
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, n_embd),
        "transformer.ln_f.weight": (n_embd,),
        "transformer.ln_f.bias": (n_embd,),
        "lm_head.weight": (vocab, n_embd),
        "lm_head.bias": (vocab,),
    }
    for i in range(int(field(raw, "n_layer"))):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (n_embd,),
            p + "ln_1.bias": (n_embd,),
            p + "attn.qkv_proj.weight": (3 * n_embd, n_embd),
            p + "attn.out_proj.weight": (n_embd, n_embd),
            p + "attn.causal_mask": (1, 1, positions, positions),
            p + "mlp.fc_in.weight": (inner, n_embd),
            p + "mlp.fc_in.bias": (inner,),
            p + "mlp.fc_out.weight": (n_embd, inner),
            p + "mlp.fc_out.bias": (n_embd,),
        }
    return shapes


def convert_tensor(key: str, tensor: torch.Tensor, raw: RawConfig) -> list[tuple[str, torch.Tensor]]:
    if key.endswith("attn.causal_mask"):
        return []  # CodeGen builds its masks
    return [(key, tensor)]


def chat_template(src: Path, raw: RawConfig) -> str:
    return "moss"


def build_tokenizer(src: Path, raw: RawConfig, template: str) -> Any:
    vocab_file = src / "vocab.json"
    if not vocab_file.is_file():
        raise ConvertError(f"{src}: no vocab.json (MOSS's BPE vocabulary); copy vocab.json and merges.txt into {src}")
    vocab: dict[str, int] = json.loads(vocab_file.read_text("utf-8"))
    added = src / "added_tokens.json"
    if added.is_file():
        vocab |= json.loads(added.read_text("utf-8"))
    by_id = {i: name for name, i in vocab.items()}
    bos_id, eos_id = int(field(raw, "bos_token_id")), int(field(raw, "eos_token_id"))
    if bos_id not in by_id or eos_id not in by_id:
        raise ConvertError(f"{vocab_file}: bos_token_id {bos_id} / eos_token_id {eos_id} of config.json are not in it")
    return byte_level_tokenizer(
        src,
        special=(by_id[bos_id], by_id[eos_id], *(t for t in MOSS_SPECIAL if t not in (by_id[bos_id], by_id[eos_id]))),
        bos=by_id[bos_id],
        eos=by_id[eos_id],
        pad=None,
        model_max_length=int(field(raw, "n_positions")),
    )


def generation_config(raw: RawConfig) -> dict[str, Any]:
    return {"bos_token_id": int(raw["bos_token_id"]), "eos_token_id": int(raw["eos_token_id"])}


SOURCE = SourceFamily(
    name="moss",
    is_source=is_source,
    native_config=native_config,
    source_shapes=source_shapes,
    convert_tensor=convert_tensor,
    build_tokenizer=build_tokenizer,
    chat_template=chat_template,
    generation_config=generation_config,
)
