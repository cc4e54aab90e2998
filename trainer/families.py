"""Model families: one record per family holding what the code needs to know about it.

A ``Family`` holds the modules LoRA targets, whether packed rows stay isolated, whether remote code is needed,
whether sequence parallelism (Ulysses) runs and why not, the planner's shape facts, the converter sources that
produce it, our own model class if it has one, and its default chat template. The other modules read it:
trainer.model (LoRA, packing, flash-attention), trainer.sequence_parallel (the verdict), trainer.plan (the dense
mask and MLP), trainer.convert.registry (the sources). A new family is one record in ``FAMILIES``, or one
``register`` call from a module of its own.

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
from typing import Any, Literal

from transformers import PreTrainedModel

from trainer.config import ConfigError
from trainer.convert import RawConfig, SourceFamily, baichuan, baichuan_13b, chatglm2, chatglm_v1, moss
from trainer.models.baichuan_alibi import BaichuanAlibiForCausalLM
from trainer.models.glm_v1 import ChatGLMv1ForCausalLM

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
    template: str
    """Its chat format's name in sft_stack.chat.registry (``TEMPLATE_NAMES``): ``tokenizer`` where the family's
    checkpoints ship their own chat_template, ``default`` where it has none. A converted checkpoint records the
    exact one (chatglm2 or chatglm3, baichuan or baichuan2) in tokenizer_config.json."""
    sequence_parallel: bool = False
    """True when its attention runs through transformers' attention interface with plain q/k/v heads and carries
    nothing in the mask Ulysses drops (``train.sequence_parallel_size`` > 1 is accepted)."""
    no_sequence_parallel_because: str = ""
    """Why sequence parallelism is refused: the end of the one-line refusal ("" says nothing more)."""
    gated_mlp: bool = True
    """Planner: gate, up and down MLP matrices when config.json has ``intermediate_size``; False: two MLP
    matrices and a fused QKV whatever config.json names (ChatGLM-6B v1)."""
    dense_mask: Literal["none", "one", "per_head"] = "none"
    """Planner: the dense [micro, heads, seq, seq] bf16 mask our own classes hold through the step: one per head
    (ALiBi carries its bias in it), one for all heads (the ChatGLM-6B v1 prefix mask), or none."""
    converted_from: tuple[SourceFamily, ...] = ()
    """The original (remote-code) layouts ``python -m trainer.convert`` turns into this family."""
    own_model: type[PreTrainedModel] | None = None
    """Our own causal-LM class (trainer/models/) when transformers has none; it takes no flash-attention."""

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.no_sequence_parallel_because:
            raise ValueError(f"family {self.name}: sequence_parallel=True with a refusal reason; drop one")


_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(name="llama", model_types=("llama",), lora_targets=_LLAMA_STYLE, supports_packed_positions=True,
               needs_remote_code=False, template="tokenizer", sequence_parallel=True,
               converted_from=(baichuan.BAICHUAN_7B, baichuan.BAICHUAN2_7B)),
        Family(name="qwen2", model_types=("qwen2", "qwen3"), lora_targets=_LLAMA_STYLE,
               supports_packed_positions=True, needs_remote_code=False, template="tokenizer", sequence_parallel=True),
        # Qwen-1 (model_type "qwen") ships its own code with fused c_attn and a w1/w2 MLP.
        Family(name="qwen", model_types=("qwen",), lora_targets=("c_attn", "c_proj", "w1", "w2"),
               supports_packed_positions=False, needs_remote_code=True, template="qwen",
               no_sequence_parallel_because="its modeling code is remote (trust_remote_code) and is not routed "
               "through Ulysses here"),
        Family(name="mistral", model_types=("mistral",), lora_targets=_LLAMA_STYLE, supports_packed_positions=True,
               needs_remote_code=False, template="tokenizer", sequence_parallel=True),
        # Converted checkpoints (python -m trainer.convert): ChatGLM2/3 -> Glm, MOSS -> CodeGen, Baichuan-7B and
        # Baichuan2-7B -> llama. Glm's lm_head is the output embedding, so all-linear does not wrap it.
        Family(name="glm", model_types=("glm",),
               lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
               supports_packed_positions=True, needs_remote_code=False, template="chatglm3", sequence_parallel=True,
               converted_from=(chatglm2.SOURCE,)),
        # codegen and gpt2 are multi-head models whose config has no num_key_value_heads (DeepSpeed's Ulysses
        # reads it): sequence_parallel.activate lends them one equal to their head count.
        Family(name="codegen", model_types=("codegen",), lora_targets=("qkv_proj", "out_proj", "fc_in", "fc_out"),
               supports_packed_positions=True, needs_remote_code=False, template="moss", sequence_parallel=True,
               converted_from=(moss.SOURCE,)),
        # Our own classes (trainer/models/): Baichuan-13B/Baichuan2-13B and ChatGLM-6B v1 after trainer.convert.
        # Both build their masks from position_ids per packed sample (tests/unit/test_own_models.py).
        Family(name="baichuan_alibi", model_types=("baichuan_alibi",), lora_targets=_LLAMA_STYLE,
               supports_packed_positions=True, needs_remote_code=False, template="baichuan2",
               no_sequence_parallel_because="our class puts ALiBi in the float attention mask, which Ulysses drops",
               dense_mask="per_head", converted_from=(baichuan_13b.BAICHUAN_13B, baichuan_13b.BAICHUAN2_13B),
               own_model=BaichuanAlibiForCausalLM),
        Family(name="chatglm_v1", model_types=("chatglm_v1",),
               lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
               supports_packed_positions=True, needs_remote_code=False, template="chatglm",
               no_sequence_parallel_because="our class puts the prefix-LM mask in the float attention mask, which "
               "Ulysses drops",
               gated_mlp=False, dense_mask="one", converted_from=(chatglm_v1.SOURCE,), own_model=ChatGLMv1ForCausalLM),
        Family(name="gpt2", model_types=("gpt2",), lora_targets=("c_attn", "c_proj", "c_fc"),
               supports_packed_positions=True, needs_remote_code=False, template="default", sequence_parallel=True),
        Family(name="starcoder", model_types=("gpt_bigcode",), lora_targets=("c_attn", "c_proj", "c_fc"),
               supports_packed_positions=True, needs_remote_code=False, template="default",
               no_sequence_parallel_because="transformers' gpt_bigcode class does not pass position_ids to its "
               "attention, which Ulysses needs to find the row's positions and packed samples after the all-to-all "
               "(it stops on an assertion); it is also multi-query (one KV head for all heads)"),
    )
}  # fmt: skip

GENERIC = Family(name="generic", model_types=(), lora_targets=(), supports_packed_positions=False,
                 needs_remote_code=False, template="default")  # fmt: skip
"""Any other causal LM: full tuning works, LoRA needs explicit targets or all-linear, packing falls back."""


def register(family: Family) -> Family:
    """Add a family defined outside this module (a new family is one record); refuses a name or model_type
    that another family already has, since lookups would then depend on the order of imports."""
    taken = {t: f.name for f in FAMILIES.values() for t in f.model_types}
    clashes = [t for t in family.model_types if t in taken]
    if family.name in FAMILIES or family.name in ("auto", GENERIC.name) or clashes:
        raise ValueError(f"family {family.name}: name or model_type {clashes} already registered")
    FAMILIES[family.name] = family
    return family


def sequence_parallel_families() -> list[str]:
    """Names of the families whose attention runs under Ulysses, in registry order."""
    return [f.name for f in FAMILIES.values() if f.sequence_parallel]


def converter_sources() -> list[tuple[SourceFamily, Family]]:
    """Every original layout the converter knows, with the family it becomes, in registry order."""
    return [(source, f) for f in FAMILIES.values() for source in f.converted_from]


def family_of_config(raw: dict[str, Any] | RawConfig) -> Family:
    """The family of a config.json: by ``model_type``, or for an original (remote-code) checkpoint the family the
    converter turns it into; GENERIC when neither knows it."""
    family = resolve_family("auto", str(raw.get("model_type", "")))
    if family is not GENERIC:
        return family
    return next((f for source, f in converter_sources() if source.is_source(raw)), GENERIC)


ORIGINAL_MODEL_TYPES = ("chatglm", "baichuan", "moss")
"""config.json model_type of the original (vendor-code) checkpoints that trainer.convert turns into native ones."""


def check_not_original(path: str, model_type: str) -> None:
    """Refuse an original (unconverted) ChatGLM/Baichuan/MOSS checkpoint in one line naming the converter."""
    if model_type in ORIGINAL_MODEL_TYPES:
        raise ConfigError(
            f"{path}/config.json: model_type {model_type!r} is an original checkpoint that needs its vendor's "
            f"modeling code; convert it once with `python -m trainer.convert {path} {path.rstrip('/')}-native` "
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
