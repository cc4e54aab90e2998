"""Loading the model for training: full, LoRA or QLoRA, plain or partitioned under ZeRO-3.

``load_model`` is called by every rank after ``deepspeed.init_distributed``. Under ZeRO-3 it keeps an
``HfDeepSpeedConfig`` alive so transformers builds the model inside ``deepspeed.zero.Init`` (its
``from_pretrained`` and ``from_config`` check that weak reference): each rank then holds only its partition.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sft_stack.common.tokenizer import TokenizerError, load_tokenizer
from trainer.config import ConfigError, RunConfig
from trainer.dist import barrier, is_rank0, local_device, zero_stage
from trainer.families import (  # importing the registry registers our own model classes with the Auto classes
    Family,
    check_not_original,
    lora_target_modules,
    resolve_family,
)
from trainer.models.norm_head import NormHead
from trainer.preflight import is_flash_attention_available, read_hf_config, validate_method
from trainer.run_dir import RunDir

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    """The module to hand to deepspeed.initialize: a PeftModel for lora/qlora."""
    tokenizer: Any
    """The model's tokenizer (PreTrainedTokenizerBase)."""
    family: str
    """Family registry key (trainer.families), or "generic"."""
    supports_packed_positions: bool
    """True when packed rows are isolated by position_ids with attention_mask=None (see trainer.families)."""
    trainable_params: int
    """Parameters that receive gradients (whole, even when ZeRO-3 partitions them)."""
    total_params: int
    """All parameters (a 4-bit weight counts as its unpacked element count)."""
    base_model_path: str = ""
    """Directory holding the frozen base weights (model.path, or OUT/random_init_base for random_init adapters)."""
    hf_deepspeed_config: Any | None = None
    """The HfDeepSpeedConfig under ZeRO-3, else None. transformers holds only a weak reference to it, so the
    LoadedModel must stay alive for the whole run."""


def attention_implementation(requested: str, remote_code: bool, model_type: str = "") -> str | None:
    """The attn_implementation to pass to transformers; None lets remote modeling code choose its own."""
    # Our own classes pass ALiBi / the GLM prefix-LM mask as a float mask, which flash-attention cannot take.
    flash_ok = resolve_family("auto", model_type).own_model is None
    match requested:
        case "auto":
            if remote_code:
                return None
            return "flash_attention_2" if flash_ok and is_flash_attention_available() else "sdpa"
        case "flash_attention_2" if not flash_ok:
            raise ConfigError(
                f"model.attn_implementation=flash_attention_2: model_type {model_type} carries its position bias or "
                "prefix mask in a float attention mask that flash-attention cannot take; use auto (sdpa) or eager"
            )
        case _:
            return requested


def is_remote_code_needed(raw_config: dict[str, Any]) -> bool:
    """True when config.json maps to modeling code shipped with the weights and transformers has no own class."""
    from transformers import CONFIG_MAPPING

    return "auto_map" in raw_config and raw_config.get("model_type") not in CONFIG_MAPPING


def is_remote_code_allowed(cfg: RunConfig) -> bool:
    here = Path(cfg.model.path).resolve()
    return any(Path(allowed).resolve() == here for allowed in cfg.model.trust_remote_code_paths)


def check_remote_code(cfg: RunConfig, raw_config: dict[str, Any]) -> bool:
    """The trust_remote_code flag for this model; refuses remote code that is not allow-listed."""
    if not is_remote_code_needed(raw_config):
        return False
    if not is_remote_code_allowed(cfg):
        raise ConfigError(
            f"{cfg.model.path}/config.json: this model ships its own modeling code (auto_map) and its path is not "
            f"allow-listed; if you trust that code set model.trust_remote_code_paths=[{cfg.model.path}]"
        )
    return True


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; ZeRO-3 partitions count whole, 4-bit weights count unpacked."""
    trainable = total = 0
    for param in model.parameters():
        n = int(getattr(param, "ds_numel", param.numel()))
        if type(param).__name__ == "Params4bit":
            n = 2 * n  # two 4-bit values per stored uint8
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def is_no_decay(name: str, module: nn.Module) -> bool:
    return name.endswith("bias") or "norm" in type(module).__name__.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: weight decay on weights, none on norms and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (no_decay if is_no_decay(name, module) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def load_model(cfg: RunConfig, ds_config: dict[str, Any]) -> LoadedModel:
    """Build the model, tokenizer and (for lora/qlora) the PEFT wrapper that the run trains."""
    from transformers.integrations import HfDeepSpeedConfig

    validate_method(cfg, ds_config)
    path = Path(cfg.model.path)
    raw_config = read_hf_config(path)
    check_not_original(cfg.model.path, str(raw_config.get("model_type", "")))
    trust = check_remote_code(cfg, raw_config)
    family = resolve_family(cfg.model.family, str(raw_config.get("model_type", "")))
    attn = attention_implementation(cfg.model.attn_implementation, trust, str(raw_config.get("model_type", "")))
    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust)
    except TokenizerError as exc:
        raise ConfigError(f"model.path={exc}") from exc
    base_path = path
    if cfg.model.random_init and cfg.model.method in ("lora", "qlora"):
        base_path = write_random_base(cfg, tokenizer, trust)
    # Created before the trained model is built, and kept alive in LoadedModel: transformers sees ZeRO-3 through it.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    if cfg.model.method == "qlora":
        model = _load_quantized(base_path, cfg, attn, trust)
    elif cfg.model.random_init and cfg.model.method == "full":
        model = _build_random(cfg, attn, trust)
    else:
        model = _load_pretrained(base_path, cfg, attn, trust)

    # Training never reuses a KV cache; with one, HF would also skip the packed-sequence mask built from position_ids.
    model.config.use_cache = False
    if raw_config.get("norm_head") and cfg.model.method == "full":
        use_norm_head(model)
    if cfg.model.gradient_checkpointing and cfg.model.method != "qlora":  # qlora: prepare_model_for_kbit_training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.method in ("lora", "qlora"):
        model = _wrap_lora(model, cfg, family)
    trainable, total = count_params(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        family=family.name,
        supports_packed_positions=family.supports_packed_positions,
        trainable_params=trainable,
        total_params=total,
        base_model_path=str(base_path),
        hf_deepspeed_config=hf_ds_config,
    )


def build_random_model(cfg: RunConfig) -> Any:
    """The full model exactly as a ``random_init`` run starts it (same config, seed and dtype), outside any run:
    for measuring the untrained model (the demo's "before" evaluation)."""
    raw_config = read_hf_config(Path(cfg.model.path))
    trust = check_remote_code(cfg, raw_config)
    model_type = str(raw_config.get("model_type", ""))
    return _build_random(cfg, attention_implementation(cfg.model.attn_implementation, trust, model_type), trust)


def use_norm_head(model: nn.Module) -> None:
    """Make ``model``'s lm_head a NormHead in place (config.json ``norm_head: true``, full-parameter training).

    The class is swapped rather than the module replaced, so a ZeRO-3 partitioned weight and its hooks stay."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if not isinstance(head, nn.Linear):
        raise ConfigError("config.json norm_head=true: the model has no Linear output layer to normalize")
    head.__class__ = NormHead


def _build_random(cfg: RunConfig, attn: str | None, trust: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=trust)
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": trust}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    torch.manual_seed(cfg.train.seed)
    return AutoModelForCausalLM.from_config(hf_config, **kwargs)


def _load_pretrained(path: Path, cfg: RunConfig, attn: str | None, trust: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": trust}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def quantization_config() -> Any:
    """NF4 with double quantization and bf16 compute (the QLoRA paper's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _load_quantized(path: Path, cfg: RunConfig, attn: str | None, trust: bool) -> Any:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16,
        "trust_remote_code": trust,
        "quantization_config": quantization_config(),
        # Each data-parallel rank holds the whole 4-bit model on its own device.
        "device_map": {"": local_device()},
    }
    if attn is not None:
        kwargs["attn_implementation"] = attn
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """Build a model whole on this rank even while another run's HfDeepSpeedConfig is alive (it would make
    transformers enter zero.Init, a collective that a rank-0-only build would hang in)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = live


def write_random_base(cfg: RunConfig, tokenizer: Any, trust: bool) -> Path:
    """Rank 0 writes the seeded random base once under the output directory; every rank then loads it from disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = RunDir.of(cfg.train.output_dir).random_base
    if is_rank0() and not (base / "config.json").is_file():
        hf_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=trust)
        dtype = torch.bfloat16 if cfg.model.method == "qlora" else DTYPES[cfg.model.dtype]
        torch.manual_seed(cfg.train.seed)
        with _without_zero3_init():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust)
        partial = base.with_name(base.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(base)  # a crash mid-write never leaves a half base that a resume would trust
        del model
    barrier()
    return base


def _wrap_lora(model: Any, cfg: RunConfig, family: Family) -> Any:
    import peft

    lora = cfg.lora
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(lora.target_modules, family),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.train.seed)  # adapter init (lora_A) is seeded like the base
    try:
        peft_model = peft.get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules={lora.target_modules}: {exc}") from None
    if cfg.model.gradient_checkpointing:
        # The frozen embedding output needs requires_grad so checkpointed blocks have a gradient path to adapters.
        peft_model.enable_input_require_grads()
    return peft_model
