"""benchmarks/bench_prepare.py --quick runs end to end and reports every measurement (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.data import REPO


@pytest.mark.slow
def test_bench_prepare_quick() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_prepare.py", "--quick", "--tokenizers", "bpe"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["records"] == 500
    bpe = report["tokenizers"]["bpe"]
    for key in ("raw_tokenizer", "prepare_w1", "prepare_w2", "datasets_map_np1", "datasets_map_np2", "real_samples"):
        assert bpe[key]["tokens"] > 0 and bpe[key]["tokens_per_s"] > 0, key
    # The same corpus gives the same tokens whatever the worker count, and the baseline does the same job.
    assert bpe["prepare_w1"]["tokens"] == bpe["prepare_w2"]["tokens"]
    assert bpe["prepare_w1"]["records"] == 500
    assert bpe["datasets_map_np1"]["tokens"] == bpe["datasets_map_np2"]["tokens"]
    assert 0.9 < bpe["prepare_w1"]["packing_efficiency"] <= 1.0
    assert bpe["prepare_w2"]["peak_rss_worker_mb"] > 0
    assert set(bpe["ratios"]) == {
        "w1_vs_raw_tokenizer",
        "w1_vs_raw_tokenizer_per_cpu_s",
        "w2_vs_w1",
        "w1_vs_datasets_map_np1",
        "w2_vs_datasets_map_np2",
        "w2_vs_datasets_map_np2_per_cpu_s",
    }
    assert all(bpe[k]["cpu_s"] > 0 for k in ("raw_tokenizer", "prepare_w1", "prepare_w2"))
