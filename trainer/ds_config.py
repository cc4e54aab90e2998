"""The DeepSpeed config: DeepSpeed-only settings from ds_configs/*.json, plus what the run config decides.

A ds_configs JSON holds ZeRO stage, offload, buckets and logging. Batch sizes, gradient clipping and
precision belong to the run config (train.*, model.dtype) and are injected here, so one JSON serves every
model size and GPU count. ``"auto"`` is refused: every value is either in the JSON or computed here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tracking.naming import redact
from trainer.config import PROJECT_ROOT, ConfigError, RunConfig

INJECTED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x world size / train.sequence_parallel_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "sequence_parallel_size": "train.sequence_parallel_size",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "optimizer": "train.lr / train.adam_* (the trainer builds AdamW itself)",
    "scheduler": "train.lr_schedule / train.warmup_steps (the trainer sets the LR every step)",
}
"""Keys a ds_configs JSON must not set, and the run-config key that decides each instead."""


def find_auto(value: Any, where: str = "") -> list[str]:
    """Dotted paths of every ``"auto"`` value inside a JSON-like structure."""
    if isinstance(value, str):
        return [where] if value.strip().lower() == "auto" else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_auto(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in find_auto(v, f"{where}[{i}]")]
    return []


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """Read a ds_configs JSON and check it holds DeepSpeed-only settings with no "auto" values."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in (PROJECT_ROOT / "ds_configs").glob("*.json")))
        raise ConfigError(f"deepspeed.config={path}: file not found; pick one of ds_configs/ ({shipped})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); expected a JSON object") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of DeepSpeed settings")
    autos = find_auto(raw)
    if autos:
        raise ConfigError(f'{path}: "auto" at {", ".join(autos)}; write the value (this trainer resolves nothing)')
    for key, owner in INJECTED_KEYS.items():
        if key in raw:
            raise ConfigError(f"{path}: remove {key!r}; it is injected from the run config ({owner})")
    zero = raw.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3")
    if "offload_param" in zero and zero["stage"] != 3:
        raise ConfigError(f"{path}: zero_optimization.offload_param needs stage 3 (stage is {zero['stage']})")
    return raw


def offload_device(ds_config: dict[str, Any], what: str) -> str:
    """Device ("none", "cpu", "nvme") that ``what`` ("offload_optimizer" / "offload_param") is offloaded to."""
    section = ds_config["zero_optimization"].get(what) or {}
    return str(section.get("device", "none"))


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The merged DeepSpeed config for this run: the JSON plus batch sizes, clipping and precision."""
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    if cfg.eval.harness_tasks and ds["zero_optimization"]["stage"] == 3:
        raise ConfigError(
            f"eval.harness_tasks with ZeRO-3 ({cfg.deepspeed.config}): rank 0 holds only a shard of the weights; "
            "evaluate the saved checkpoints with `python -m sft_stack.cli.evaluate --tasks` instead"
        )
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum_steps
    # e.g. 4 micro x 16 accum x 8 GPUs = 512 rows per optimizer step; a sequence-parallel group shares its rows
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum_steps * (world_size // t.sequence_parallel_size)
    if t.sequence_parallel_size > 1:
        # DeepSpeed reads it where no mpu exists yet (transformers' zero.Init config under ZeRO-3) to get the batch
        # arithmetic above right; the groups themselves come from trainer/sequence_parallel.py.
        ds["sequence_parallel_size"] = t.sequence_parallel_size
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {"enabled": cfg.model.dtype == "bf16"}
    # Static loss scale would hide overflow; dynamic scaling skips overflowing steps and lowers the scale.
    ds["fp16"] = {"enabled": cfg.model.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    if offload_device(ds, "offload_optimizer") != "none":
        # The optimizer is DeepSpeedCPUAdam (trainer/optim.py); DeepSpeed checks that a client optimizer is.
        ds["zero_force_ds_cpu_optimizer"] = True
    return ds


def with_universal_load(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The config that makes ``engine.load_checkpoint`` read a universal checkpoint (other world size)."""
    ds = copy.deepcopy(ds_config)
    ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def dump_ds_config(ds_config: dict[str, Any]) -> str:
    """The merged DeepSpeed config as written to files: credentials redacted (e.g. a monitor's api_key)."""
    return json.dumps(redact(ds_config), indent=2, sort_keys=True) + "\n"
