"""Throughput, MFU, ETA and the metrics.jsonl log (rank 0 only).

MFU formula (pure functions below, reused by benchmarks/):

    train_flops = (4*N + 2*N_trainable) * T  +  12 * L * H * sum_rows(S_row^2)

- N: all parameters, N_trainable: those with gradients, T: real (non-padding) tokens processed.
  A dense transformer costs 2N FLOPs per token forward, 2N for the activation gradients and 2N_trainable
  for the weight gradients; for full training this is the familiar 6*N*T. (N includes the embedding table,
  whose lookup costs nothing, so this slightly over-counts for small models with large vocabularies.)
- Attention scores and the weighted sum cost 2*2*S*H per token per layer forward and twice that backward:
  12*L*H*S per token, i.e. 12*L*H*S^2 per row of S positions (PaLM's convention, full square counted
  even though causal attention needs half).
- mfu = train_flops / (elapsed_s * world_size * peak), peak = the device's dense bf16 peak; None when
  unknown (CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM dense bf16; the PCIe card is 756e12 but reports the same family name
    "H200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "H800": 989e12,
    "L40S": 362e12,
    "A10": 125e12,
}
"""Dense (no sparsity) bf16 tensor-core peak per GPU, by the name fragment torch reports."""


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device from its name (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    if not device_name:
        return None
    upper = device_name.upper()
    for fragment, peak in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if fragment in upper:
            return peak
    return None


def train_flops(*, n_params: int, n_trainable: int, n_layers: int, hidden: int, tokens: int, sum_seq_sq: int) -> float:
    """FLOPs of forward + backward over ``tokens`` real tokens in rows whose squared lengths sum to sum_seq_sq."""
    return float((4 * n_params + 2 * n_trainable) * tokens + 12 * n_layers * hidden * sum_seq_sq)


def mfu(flops: float, elapsed_s: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the peak of all devices; None when the peak is unknown."""
    if peak is None or elapsed_s <= 0:
        return None
    return flops / (elapsed_s * world_size * peak)


def eta_s(elapsed_s: float, steps_done: int, steps_left: int) -> float | None:
    """Seconds left at the average speed so far (this session's steps only); None before the first step."""
    if steps_done <= 0:
        return None
    return elapsed_s / steps_done * steps_left


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl and prints a short line (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")
        print(format_row(row), flush=True)


def format_row(row: dict[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)
