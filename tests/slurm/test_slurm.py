"""The real sbatch scripts on a real two-node SLURM cluster (scripts/slurm_cluster.sh): training across nodes,
preemption with checkpoint + requeue + resume, and the prepare array job with its dependent merge."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_pipeline.cli import main as data_cli
from data_pipeline.schema import load_manifest
from tests.helpers.data import make_prepared_dir
from tests.helpers.slurm_cluster import REPO, SlurmCluster

pytestmark = pytest.mark.slow

MAX_STEPS = 40
# Two ranks, one per simulated node, one CPU each; --gpus-per-node=0 overrides the script's GPU request.
# --time stays well above the script's --signal=B:USR1@600, which would otherwise fire at once.
TRAIN_OPTIONS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=4G", "--time=60"]
# The first DeepSpeed job on a machine JIT-compiles a C++ op (~80 s on 2 cores) before its first step.
FIRST_JOB_TIMEOUT_S = 900


@dataclass(frozen=True)
class TrainJob:
    job: int
    out: Path
    log: Path


def submit_training(cluster: SlurmCluster, root: Path, data: Path, name: str) -> TrainJob:
    out, log = root / name, root / f"{name}.out"
    job = cluster.sbatch(
        "slurm/train.sbatch",
        "configs/tiny_cpu.yaml",
        f"data.path={data}",
        f"train.output_dir={out}",
        f"train.max_steps={MAX_STEPS}",
        "train.save_every_steps=20",
        "eval.every_steps=0",
        options=[*TRAIN_OPTIONS, f"--output={log}"],
    )
    return TrainJob(job=job, out=out, log=log)


def train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def train_data(train_root: Path) -> Path:
    return make_prepared_dir(train_root / "data", pack=True)


@pytest.fixture(scope="module")
def straight_run(slurm_cluster: SlurmCluster, train_root: Path, train_data: Path) -> TrainJob:
    """The uninterrupted 2-node run that the preempted one must reproduce step for step."""
    run = submit_training(slurm_cluster, train_root, train_data, "straight")
    slurm_cluster.wait_for(run.job, {"COMPLETED"}, timeout_s=FIRST_JOB_TIMEOUT_S)
    return run


def test_training_across_two_nodes(slurm_cluster: SlurmCluster, straight_run: TrainJob) -> None:
    (record,) = slurm_cluster.jobs(straight_run.job)
    assert record["ExitCode"] == "0:0"
    assert record["NodeList"] == "node[1-2]"
    assert "2 ranks on node[1-2], master 127.0.0.1:" in straight_run.log.read_text(encoding="utf-8")
    assert [row["step"] for row in train_rows(straight_run.out)] == list(range(1, MAX_STEPS + 1))
    checkpoints = straight_run.out / "checkpoints"
    assert (checkpoints / "latest_complete").read_text(encoding="utf-8").strip() == f"step_{MAX_STEPS:08d}"
    last = checkpoints / f"step_{MAX_STEPS:08d}"
    assert (last / "COMPLETE").is_file()
    assert sorted(p.name for p in last.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert (straight_run.out / "final" / "config.json").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, straight_run: TrainJob, train_root: Path, train_data: Path
) -> None:
    run = submit_training(slurm_cluster, train_root, train_data, "preempted")
    deadline = time.monotonic() + 300
    while not any(row["step"] >= 3 for row in train_rows(run.out)):
        assert time.monotonic() < deadline, slurm_cluster.describe(slurm_cluster.jobs(run.job))
        time.sleep(0.2)
    # What the --signal=B:USR1@600 timer (or a partition preemption) does, on demand.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(run.job))

    record = slurm_cluster.wait_for(run.job, {"COMPLETED"}, timeout_s=600)
    assert record["Restarts"] == "1"
    assert record["ExitCode"] == "0:0"
    log = run.log.read_text(encoding="utf-8")
    assert "restart 0:" in log and "restart 1:" in log  # --open-mode=append kept both runs' output
    assert "checkpoint saved, requeueing" in log
    (stopped_at,) = {int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("resumed from ")}
    assert 3 <= stopped_at < MAX_STEPS, f"the signal should land mid-run; it stopped at {stopped_at}"

    rows = train_rows(run.out)
    assert [row["step"] for row in rows] == list(range(1, MAX_STEPS + 1)), "a step repeated or missing"
    # Exact resume: the interrupted run's losses are the uninterrupted run's, bit for bit (CPU, fp32).
    assert [row["loss"] for row in rows] == [row["loss"] for row in train_rows(straight_run.out)]


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
