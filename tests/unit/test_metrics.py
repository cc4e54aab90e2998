"""MFU arithmetic (trainer/metrics.py), checked by hand."""

from __future__ import annotations

import pytest

from trainer.metrics import eta_s, mfu, peak_flops, train_flops


def test_full_training_is_6nt_plus_attention() -> None:
    # 7B-ish: N = 6.7e9, 32 layers, hidden 4096, one 4096-token row
    flops = train_flops(
        n_params=6_700_000_000, n_trainable=6_700_000_000, n_layers=32, hidden=4096, tokens=4096, sum_seq_sq=4096**2
    )
    assert flops == 6 * 6.7e9 * 4096 + 12 * 32 * 4096 * 4096**2
    # LoRA: weight gradients only for the adapters
    lora = train_flops(n_params=100, n_trainable=10, n_layers=0, hidden=0, tokens=7, sum_seq_sq=0)
    assert lora == (4 * 100 + 2 * 10) * 7


def test_mfu_against_the_device_peak() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Some CPU") is None
    # 8 GPUs at 989 TFLOP/s for 2 s: 40% MFU means 0.4 * 8 * 989e12 * 2 FLOPs
    assert mfu(0.4 * 8 * 989e12 * 2, 2.0, 8, 989e12) == pytest.approx(0.4)
    assert mfu(1e12, 2.0, 8, None) is None


def test_eta() -> None:
    assert eta_s(30.0, 10, 5) == 15.0
    assert eta_s(30.0, 0, 5) is None
