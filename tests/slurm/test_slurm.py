"""The real sbatch scripts on a real two-node SLURM cluster (scripts/slurm_cluster.sh): training across nodes,
preemption with checkpoint + requeue + resume, and the prepare array job with its dependent merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.cli import main as data_cli
from data_pipeline.schema import load_manifest
from tests.helpers.slurm_cluster import REPO, SlurmCluster

pytestmark = pytest.mark.slow

ALPACA = REPO / "tests/fixtures/real/alpaca/alpaca_en_demo.json"
TINY_BPE = REPO / "tests/fixtures/tokenizers/tiny_bpe"
# 999 records in blocks of 200: 5 blocks, so each of the 2 array tasks prepares some and skips others.
PREPARE_OPTIONS = ["--tokenizer", str(TINY_BPE), "--max-seq-len", "256", "--pack", "--block-size", "200"]


def test_prepare_array_then_merge_equals_one_run(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    array = slurm_cluster.sbatch(
        "slurm/prepare_array.sbatch",
        "prepare",
        str(out),
        "--source",
        str(ALPACA),
        *PREPARE_OPTIONS,
        options=["--array=0-1", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path}/prepare-%A_%a.out"],
    )
    merge = slurm_cluster.sbatch(
        "slurm/prepare_array.sbatch",
        "merge",
        str(out),
        options=[f"--dependency=afterok:{array}", "--cpus-per-task=1", "--mem=2G", f"--output={tmp_path}/merge.out"],
    )
    slurm_cluster.wait_for(merge, {"COMPLETED"}, timeout_s=300)
    tasks = slurm_cluster.jobs(array)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}
    for task in (0, 1):
        assert (tmp_path / "merged.parts" / f"task-{task}" / "train").is_dir()

    assert data_cli(["verify", str(out)]) == 0
    reference = tmp_path / "one_run"
    assert (
        data_cli(["prepare", "--source", str(ALPACA), *PREPARE_OPTIONS, "--out", str(reference), "--no-progress"]) == 0
    )
    merged, single = load_manifest(out), load_manifest(reference)
    assert merged.counts == single.counts
    assert merged.counts["samples_read"] == 999
    for split in ("train", "val"):
        assert [(s.file, s.rows, s.sha256) for s in merged.splits[split].shards] == [
            (s.file, s.rows, s.sha256) for s in single.splits[split].shards
        ]
