"""Shared pieces of the fault drills: one prepared data set, one uninterrupted 2-rank reference run, a launcher.

Every drill that trains runs the real `deepspeed` launcher (2 gloo ranks on CPU) on configs/tiny_cpu.yaml with
DRILL_OVERRIDES: 6 optimizer steps of 8 rows (2 micro x 2 accum x 2 ranks), a checkpoint every 2 steps (the
last 2 kept), full fine-tuning with ZeRO-2 in fp32 (bit-exact on CPU), export at the end, tracking off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sft_stack.common.ports import free_port
from tests.helpers.data import make_prepared_dir

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
DRILL_OVERRIDES = [
    f"train.max_steps={STEPS}",
    "train.save_every_steps=2",
    "train.keep_last_checkpoints=2",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=2",
    "train.log_every_steps=1",
    "eval.every_steps=0",
    "tracking.enabled=false",
    f"deepspeed.config={ROOT / 'ds_configs' / 'zero2.json'}",
]


def drill_env(**extra: str) -> dict[str, str]:
    """The environment of a drill's processes: CPU accelerator, this checkout, one compute thread per rank.

    One thread: bit-exact comparisons between separate processes need every kernel to sum in the same order, and
    a multi-threaded BLAS may pick its thread count (hence its blocking) by the machine's load; the 2 ranks
    share 2 cores anyway. (Measured: with the default threads, one of two runs on a loaded machine differed from
    the reference by 1e-8 in the last step.)
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return {**env, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), **threads, **extra}


def launch(
    out: Path, data: Path, *overrides: str, env: dict[str, str] | None = None, world: int = 2
) -> subprocess.CompletedProcess[str]:
    """One `deepspeed --num_gpus world launcher/run.py` of the drill config into ``out``; the process result."""
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(world),
        "--master_port",
        str(free_port()),
        str(ROOT / "launcher" / "run.py"),
        "--config",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"data.path={data}",
        f"train.output_dir={out}",
        *DRILL_OVERRIDES,
        *overrides,
    ]
    return subprocess.run(
        command, cwd=ROOT, env=env or drill_env(), capture_output=True, text=True, timeout=900, check=False
    )


def start_by_hand(
    out: Path,
    data: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    world: int = 2,
    preexec: dict[int, Callable[[], None]] | None = None,
) -> list[subprocess.Popen[str]]:
    """``world`` ranks of the drill config started by hand, as ``srun`` does: no launcher ends a rank's peers.

    Each rank's stdout and stderr are pipes (text); the caller waits for them (``collect``). ``preexec`` runs a
    function in the child of the ranks it names, before the trainer starts (a resource limit, say).
    """
    port = str(free_port())
    command = [
        sys.executable,
        str(ROOT / "launcher" / "run.py"),
        "--config",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"data.path={data}",
        f"train.output_dir={out}",
        *DRILL_OVERRIDES,
        *overrides,
    ]
    ranks = []
    for rank in range(world):
        rank_env = {
            **(env or drill_env()),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        ranks.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=(preexec or {}).get(rank),
            )
        )
    return ranks


def collect(
    ranks: list[subprocess.Popen[str]], on_line: Callable[[str], None] | None = None, timeout: float = 900
) -> tuple[list[str], list[str]]:
    """Wait for every rank (killing what is left after ``timeout``); their stdouts and stderrs.

    ``on_line`` sees each line of rank 0's stdout as it arrives. Every pipe is drained by its own thread, so no
    rank blocks on a full pipe.
    """
    outs: list[list[str]] = [[] for _ in ranks]
    errs: list[list[str]] = [[] for _ in ranks]

    def drain(stream: Any, into: list[str], callback: Callable[[str], None] | None) -> None:
        for line in stream:
            into.append(line)
            if callback is not None:
                callback(line)

    threads = [
        threading.Thread(target=drain, args=(process.stdout, outs[rank], on_line if rank == 0 else None))
        for rank, process in enumerate(ranks)
    ] + [threading.Thread(target=drain, args=(process.stderr, errs[rank], None)) for rank, process in enumerate(ranks)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        for process in ranks:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
        for thread in threads:
            thread.join()
    return ["".join(lines) for lines in outs], ["".join(lines) for lines in errs]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = (out / "final").glob("*.safetensors")
    return load_file(weights)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-exact


@pytest.fixture(scope="session")
def drill_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 short arithmetic conversations through the real prepare (tiny BPE, 128 tokens, 10% val)."""
    return make_prepared_dir(tmp_path_factory.mktemp("drill") / "data")


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, drill_data: Path) -> Iterator[Path]:
    """The uninterrupted run every drill's final weights are compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = launch(out, drill_data)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield out
