"""A real two-node SLURM cluster for tests, stood up by scripts/slurm_cluster.sh on free loopback ports.

    def test_x(slurm_cluster: SlurmCluster) -> None:      # the module-scoped fixture below
        job = slurm_cluster.sbatch("slurm/train.sbatch", "configs/tiny_cpu.yaml", options=["--nodes=2"])
        info = slurm_cluster.wait_for(job, {"COMPLETED"}, timeout_s=300)

Jobs run as root with the test process's environment (PATH of this venv, SLURM_CONF of this cluster), in the
repository root. No accounting here, so job states come from ``scontrol show job`` (kept for MinJobAge=600 s).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def free_port(count: int = 1) -> int:
    """A loopback port p such that p..p+count-1 are all free (the two slurmd take consecutive ports)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        try:
            for extra in range(1, count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


class SlurmCluster:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.conf = self.state_dir / "slurm.conf"
        self.ports = {"SLURM_CLUSTER_CTLD_PORT": str(free_port()), "SLURM_CLUSTER_NODE_PORT": str(free_port(2))}
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            # Jobs inherit this environment: this venv's python first on PATH, DeepSpeed on CPU.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(REPO),
        }

    def up(self) -> None:
        self._script("up")

    def down(self) -> None:
        self._script("down")

    def _script(self, action: str) -> None:
        result = subprocess.run(
            ["bash", str(SCRIPT), action, str(self.state_dir)],
            env={**self.env, **self.ports},
            capture_output=True,
            text=True,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"scripts/slurm_cluster.sh {action} failed: {result.stderr.strip()}\n{self.logs()}")

    def run(self, *argv: str, timeout_s: float = 60) -> str:
        """A SLURM client command against this cluster; its stdout."""
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(
        self, script: str, *args: str, options: list[str] | None = None, env: Mapping[str, str] | None = None
    ) -> int:
        """Submit a repository sbatch script (path relative to the repo) from the repo root; its job id."""
        argv = ["sbatch", "--parsable", f"--chdir={REPO}", *(options or []), str(REPO / script), *args]
        result = subprocess.run(
            argv, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=REPO, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0].split("_")[0])

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job -o`` as dicts: one for a plain job, one per task for an array job."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return [parse_record(line) for line in out.splitlines() if line.strip()]

    def wait_for(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, str]:
        """Poll until every record of the job is in one of ``states``; fail with its logs on a final other state."""
        deadline = time.monotonic() + timeout_s
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            job_states = {r["JobState"] for r in records}
            if records and job_states <= states:
                return records[0]
            final = job_states & (FINAL_STATES - states)
            never = [r for r in records if r.get("Reason") == "DependencyNeverSatisfied"]
            if final or never:
                raise AssertionError(f"job {job_id} ended {sorted(job_states)}:\n{self.describe(records)}")
            time.sleep(1.0)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f}s:\n{self.describe(records)}")

    def describe(self, records: list[dict[str, str]]) -> str:
        lines = []
        for record in records:
            keys = ("JobId", "ArrayTaskId", "JobState", "Reason", "ExitCode", "Restarts")
            lines.append(" ".join(f"{k}={record[k]}" for k in keys if k in record))
            out = Path(record.get("StdOut", ""))
            if out.is_file():
                lines.append(f"--- {out} (tail) ---\n" + tail(out, 60))
        return "\n".join(lines) + "\n" + self.logs()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (tail) ---\n{tail(p, 15)}" for p in sorted(self.state_dir.glob("*.log")))


def parse_record(line: str) -> dict[str, str]:
    """``Key=value Key=value ...`` from ``scontrol -o``; a value never contains ' Key=' so split on spaces."""
    record: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        name, sep, value = token.partition("=")
        if sep and name and name[0].isupper():
            key = name
            record[key] = value
        elif key is not None:
            record[key] += " " + token
    return record


def tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munge + slurmctld + slurmd node1/node2 for one test module; every daemon it started is stopped after."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster tests need root (slurmd runs jobs as their owner)")
    if shutil.which("slurmctld") is None:
        pytest.fail("SLURM is not installed: run scripts/system_deps.sh as root (make test does)")
    # A short path: slurmd's socket path lives under the state dir and sockets are limited to 108 bytes.
    cluster = SlurmCluster(Path(tmp_path_factory.mktemp("slurm")))
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()
