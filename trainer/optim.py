"""AdamW and the learning-rate schedule.

The optimizer class follows the DeepSpeed config and accelerator: DeepSpeedCPUAdam when ZeRO offloads the
optimizer to CPU, FusedAdam on CUDA, torch AdamW on the CPU accelerator (tests, demo). The schedule is a pure
function of the optimizer step, so resume needs no scheduler state and skipped steps cannot shift it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from trainer.config import TrainConfig
from trainer.ds_config import offload_device

AdamKind = Literal["cpu_adam", "fused_adam", "torch_adamw"]


def choose_adam(ds_config: dict[str, Any], accelerator: str) -> AdamKind:
    """Which AdamW implementation the DeepSpeed config and accelerator ("cuda", "cpu", ...) imply."""
    if offload_device(ds_config, "offload_optimizer") != "none":
        return "cpu_adam"
    if accelerator == "cuda":
        return "fused_adam"
    return "torch_adamw"


def build_optimizer(param_groups: list[dict[str, Any]], train: TrainConfig, kind: AdamKind) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (each carrying its own weight_decay) with the run's betas and eps."""
    common: dict[str, Any] = {"lr": train.lr, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    match kind:
        case "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **common)
        case "fused_adam":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(param_groups, adam_w_mode=True, **common)
        case "torch_adamw":
            return torch.optim.AdamW(param_groups, **common)


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate of the optimizer update that follows ``step`` completed updates (step is 0-based).

    Linear warmup reaches train.lr at update warmup_steps; then decay to lr x min_lr_ratio at max_steps.
    """
    peak = train.lr
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    floor = peak * train.min_lr_ratio
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    match train.lr_schedule:
        case "constant":
            return peak
        case "linear":
            return peak - (peak - floor) * progress
        case "cosine":
            return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the LR of every param group (works through DeepSpeed's ZeRO wrappers, which expose param_groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
