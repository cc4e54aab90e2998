"""trainer/harness.py's own parts: metric names from the harness's result keys, relative data files, task hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from trainer.harness import flat_metrics, metric_key, resolve_data_files, task_hashes


def test_metric_keys_drop_the_none_filter_and_keep_others() -> None:
    assert metric_key("mmlu", "acc,none") == "mmlu/acc"
    assert metric_key("gsm8k", "exact_match,strict-match") == "gsm8k/exact_match_strict-match"
    assert metric_key("mmlu", "alias") is None


def test_flat_metrics_keeps_numbers_only() -> None:
    results = {"t": {"alias": "t", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": 1}}
    assert flat_metrics(results) == {"t/acc": 0.5, "t/f1": 1.0}


def test_relative_data_files_resolve_against_the_yaml_folder() -> None:
    config = {"task": "t", "dataset_kwargs": {"data_files": {"test": "a.jsonl", "train": ["/abs/b.jsonl", "c.jsonl"]}}}
    resolved = resolve_data_files(config, Path("/tasks"))
    assert resolved["dataset_kwargs"]["data_files"] == {
        "test": "/tasks/a.jsonl",
        "train": ["/abs/b.jsonl", "/tasks/c.jsonl"],
    }
    assert resolve_data_files({"task": "t", "dataset_path": "cais/mmlu"}, Path("/tasks")) == {
        "task": "t",
        "dataset_path": "cais/mmlu",
    }


def test_task_hash_is_the_harness_trackers_recipe() -> None:
    rows = [
        {"doc_hash": "a", "prompt_hash": "b", "target_hash": "c"},
        {"doc_hash": "d", "prompt_hash": "e", "target_hash": "f"},
    ]
    assert task_hashes({"t": rows}) == {"t": hashlib.sha256(b"abcdef").hexdigest()}
