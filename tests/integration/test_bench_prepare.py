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
        [sys.executable, "benchmarks/bench_prepare.py", "--quick", "--tokenizers", "bpe", "--rss-records", "2000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["records"] == 500
    bpe = report["tokenizers"]["bpe"]
    measurements = (
        "raw_tokenizer_1core",
        "raw_tokenizer_2cores_rayon",
        "prepare_w1_1core",
        "prepare_w1",
        "prepare_w2",
        "datasets_map_typical_np1",
        "datasets_map_typical_np2",
        "datasets_map_batched_np1",
        "datasets_map_batched_np2",
        "real_samples",
    )
    for key in measurements:
        assert bpe[key]["tokens"] > 0 and bpe[key]["tokens_per_s"] > 0 and bpe[key]["cpu_s"] > 0, key
    # The same corpus gives the same tokens whatever the worker count or cores, and the baselines do the same job.
    assert bpe["prepare_w1"]["tokens"] == bpe["prepare_w2"]["tokens"] == bpe["prepare_w1_1core"]["tokens"]
    assert bpe["raw_tokenizer_1core"]["tokens"] == bpe["raw_tokenizer_2cores_rayon"]["tokens"]
    assert bpe["prepare_w1"]["records"] == 500
    baselines = [bpe[f"datasets_map_{style}_np{n}"]["tokens"] for style in ("typical", "batched") for n in (1, 2)]
    assert len(set(baselines)) == 1
    assert 0.9 < bpe["prepare_w1"]["packing_efficiency"] <= 1.0
    assert bpe["prepare_w2"]["peak_rss_worker_mb"] > 0
    # Each worker's own peak (VmHWM), not the parent's peak that ru_maxrss carries across fork.
    assert len(bpe["prepare_w2"]["peak_rss_workers_mb"]) == 2
    assert bpe["prepare_w1_1core"]["peak_rss_workers_mb"] == []
    profile = bpe["profile_1core"]
    assert profile["tokens"] == bpe["prepare_w1"]["tokens"]
    assert set(profile["stages_cpu_s"]) == {
        "start_up",
        "reading",
        "transfer",
        "parsing",
        "rendering",
        "tokenizer",
        "labels",
        "routing",
        "packing",
        "writing",
    }
    assert profile["stages_cpu_s"]["tokenizer"] > 0 and abs(sum(profile["stages_share"].values()) - 1) < 0.01
    # The memory run: short records at 1/50 and full size, every record read, both workers measured.
    assert (report["rss_small"]["records"], report["rss_run"]["records"]) == (40, 2000)
    assert len(report["rss_run"]["peak_rss_workers_mb"]) == 2
    assert set(bpe["ratios"]) == {
        "w1_1core_vs_raw_1core",
        "w1_vs_raw_2cores_rayon",
        "w1_vs_raw_1core",
        "w2_vs_w1_1core",
        "w2_vs_w1",
        "w1_1core_vs_datasets_map_typical_np1",
        "w2_vs_datasets_map_typical_np2",
        "w1_1core_vs_datasets_map_batched_np1",
        "w2_vs_datasets_map_batched_np2",
    }
