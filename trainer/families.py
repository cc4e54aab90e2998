"""Model families: which modules LoRA targets, whether packed rows stay isolated, whether remote code is needed.

A family is looked up from ``model.family`` or, when that is ``auto``, from config.json's ``model_type``.
``supports_packed_positions`` is true only where it was checked: transformers 5.23 on CPU, sdpa and eager,
a packed row with ``position_ids`` restarting at every sample and ``attention_mask=None``, ``use_cache=False``,
gives the same logits as each sample run alone (tests/unit/test_model.py). Families whose modeling
code ships with the weights (remote code) build their own masks and are not verified: the loop trains them
unpacked. Original ChatGLM2/3, Baichuan-7B/Baichuan2-7B and MOSS checkpoints are refused at start-up
(``check_not_original``): converted once with ``python -m trainer.convert`` they are glm, llama and codegen.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ConfigError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True, kw_only=True)
class Family:
    name: str
    """Registry key, accepted as ``model.family``."""
    model_types: tuple[str, ...]
    """config.json ``model_type`` values that map to this family when ``model.family=auto``."""
    lora_targets: tuple[str, ...]
    """Module name suffixes LoRA wraps when ``lora.target_modules=auto``."""
    supports_packed_positions: bool
    """True when HF attention isolates packed samples given ``position_ids`` (verified, see module docstring)."""
    needs_remote_code: bool
    """True when the modeling code ships with the weights (``auto_map`` in config.json)."""


_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="llama", model_types=("llama",), lora_targets=_LLAMA_STYLE, supports_packed_positions=True,
               needs_remote_code=False),
        Family(name="qwen2", model_types=("qwen2", "qwen3"), lora_targets=_LLAMA_STYLE,
               supports_packed_positions=True, needs_remote_code=False),
        # Qwen-1 (model_type "qwen") ships its own code with fused c_attn and a w1/w2 MLP.
        Family(name="qwen", model_types=("qwen",), lora_targets=("c_attn", "c_proj", "w1", "w2"),
               supports_packed_positions=False, needs_remote_code=True),
        Family(name="mistral", model_types=("mistral",), lora_targets=_LLAMA_STYLE, supports_packed_positions=True,
               needs_remote_code=False),
        # Converted checkpoints (python -m trainer.convert): ChatGLM2/3 -> Glm, MOSS -> CodeGen, Baichuan-7B and
        # Baichuan2-7B -> llama. Glm's lm_head is the output embedding, so all-linear does not wrap it.
        Family(name="glm", model_types=("glm",),
               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
               supports_packed_positions=True, needs_remote_code=False),
        Family(name="codegen", model_types=("codegen",), lora_targets=("qkv_proj", "out_proj", "fc_in", "fc_out"),
               supports_packed_positions=True, needs_remote_code=False),
        # Our own classes (trainer/models/): Baichuan-13B/Baichuan2-13B and ChatGLM-6B v1 after trainer.convert.
        # Both build their masks from position_ids per packed sample (tests/unit/test_own_models.py).
        Family(name="baichuan_alibi", model_types=("baichuan_alibi",), lora_targets=_LLAMA_STYLE,
               supports_packed_positions=True, needs_remote_code=False),
        Family(name="chatglm_v1", model_types=("chatglm_v1",),
               lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
               supports_packed_positions=True, needs_remote_code=False),
        Family(name="gpt2", model_types=("gpt2",), lora_targets=("c_attn", "c_proj", "c_fc"),
               supports_packed_positions=True, needs_remote_code=False),
        Family(name="starcoder", model_types=("gpt_bigcode",), lora_targets=("c_attn", "c_proj", "c_fc"),
               supports_packed_positions=True, needs_remote_code=False),
    )
}  # fmt: skip

GENERIC = Family(name="generic", model_types=(), lora_targets=(), supports_packed_positions=False,
                 needs_remote_code=False)  # fmt: skip
"""Any other causal LM: full tuning works, LoRA needs explicit targets or all-linear, packing falls back."""


ORIGINAL_MODEL_TYPES = ("chatglm", "baichuan", "moss")
"""config.json model_type of the original (vendor-code) checkpoints that trainer.convert turns into native ones."""


def check_not_original(path: str, model_type: str) -> None:
    """Refuse an original (unconverted) ChatGLM/Baichuan/MOSS checkpoint in one line naming the converter."""
    if model_type in ORIGINAL_MODEL_TYPES:
        raise ConfigError(
            f"{path}/config.json: model_type {model_type!r} is an original checkpoint that needs its vendor's "
            f"modeling code; convert it once with `sft convert {path} {path.rstrip('/')}-native` "
            "and set model.path to the output"
        )


def resolve_family(family: str, model_type: str) -> Family:
    """The registry entry named by ``model.family``, or matched by ``model_type`` when family is ``auto``."""
    if family != "auto":
        if family not in FAMILIES:
            raise ConfigError(f"model.family={family!r}: unknown; valid: auto, {', '.join(FAMILIES)}")
        return FAMILIES[family]
    for entry in FAMILIES.values():
        if model_type in entry.model_types:
            return entry
    return GENERIC


def lora_target_modules(target_modules: str, family: Family) -> str | list[str]:
    """PEFT ``target_modules`` from ``lora.target_modules``: auto (registry), all-linear, or a comma list."""
    if target_modules == ALL_LINEAR:
        return ALL_LINEAR
    if target_modules == "auto":
        if not family.lora_targets:
            raise ConfigError(
                f"lora.target_modules=auto: no registry entry for this model family ({family.name}); "
                f"set lora.target_modules=all-linear or a comma list such as q_proj,v_proj"
            )
        return list(family.lora_targets)
    names = [name.strip() for name in target_modules.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"lora.target_modules={target_modules!r}: expected auto, all-linear or a comma list")
    return names
