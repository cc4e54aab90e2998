"""benchmarks/bench_train.py: the measurement arithmetic, and the CPU dry run end to end (QLoRA vs HF + PEFT)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trainer.metrics import mfu, train_flops

REPO = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_measure_windows_after_warmup_and_uses_the_trainer_formula() -> None:
    bench = load_bench()
    shape = bench.Shape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32)
    rows = [
        {"step": 1, "elapsed_s": 5.0, "tokens_seen": 100, "mfu": 0.1, "mem_gb": 1.0, "loss": 3.0},
        {"step": 2, "elapsed_s": 6.0, "tokens_seen": 190, "mfu": 0.3, "mem_gb": 2.0, "loss": 2.5},
        {"step": 3, "elapsed_s": 8.0, "tokens_seen": 300, "mfu": 0.6, "mem_gb": 1.5, "loss": 2.0},
    ]
    replayed = [(100, 1000), (90, 900), (110, 1100)]
    got = bench.measure(rows, replayed, 1, n_params=1000, n_trainable=10, shape=shape, peak=1e6)
    flops = train_flops(n_params=1000, n_trainable=10, n_layers=2, hidden=8, tokens=200, sum_seq_sq=2000)
    assert got["tokens"] == 200
    assert got["elapsed_s"] == 3.0
    assert got["tokens_per_s"] == 200 / 3.0
    assert got["flops"] == flops
    assert got["mfu"] == mfu(flops, 3.0, 1, 1e6)
    assert got["mfu_logged"] == pytest.approx((0.3 * 1.0 + 0.6 * 2.0) / 3.0)
    assert got["peak_mem_gb"] == 2.0
    assert got["steps_measured"] == 2
    with pytest.raises(RuntimeError, match="replayed data gives 201 tokens"):
        bench.measure(rows, [(100, 1), (91, 1), (110, 1)], 1, n_params=1, n_trainable=1, shape=shape, peak=None)


@pytest.mark.slow
def test_qlora_dry_run_writes_results_with_baseline(tmp_path: Path) -> None:
    results = tmp_path / "results"
    command = [sys.executable, "benchmarks/bench_train.py", "--case", "qlora_7b", "--dry-run", "--peak-tflops", "1"]
    command += ["--results-dir", str(results), "--work-dir", str(tmp_path / "work")]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((results / "qlora_7b_dryrun.json").read_text(encoding="utf-8"))
    assert json.loads(completed.stdout) == result

    assert result["device"]["name"] and result["versions"]["torch"] and result["versions"]["deepspeed"]
    assert result["config"]["run"]["model"]["method"] == "qlora"
    assert result["config"]["case"]["shape"] == {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 4,
                                                 "kv_heads": 2, "vocab": 32000}  # fmt: skip
    # LoRA r=16 on all 7 linear layers of 2 blocks: 16 x (in + out) summed = 16 x 1024 per block.
    assert result["n_trainable"] == 2 * 16 * 1024
    assert result["steps_measured"] == 2  # 3 steps, the first one left out
    assert result["tokens_per_s"] == result["tokens"] / result["elapsed_s"] > 0
    assert result["peak_mem_gb"] > 0
    flops = train_flops(
        n_params=result["n_params"],
        n_trainable=result["n_trainable"],
        n_layers=result["n_layers"],
        hidden=result["hidden"],
        tokens=result["tokens"],
        sum_seq_sq=result["sum_seq_sq"],
    )
    assert result["flops"] == flops
    assert result["mfu"] == mfu(flops, result["elapsed_s"], 1, 1e12)
    assert result["baseline_tokens_per_s"] > 0 and result["baseline_peak_mem_gb"] > 0
    assert result["speedup"] == result["tokens_per_s"] / result["baseline_tokens_per_s"]
    assert result["baseline"]["steps_measured"] == 2
    # The measured tokens are the trainer's own: its log agrees (bench_train refuses otherwise).
    rows = [json.loads(line) for line in (tmp_path / "work/qlora_7b/out/metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert train_rows[-1]["tokens_seen"] - train_rows[0]["tokens_seen"] == result["tokens"]
