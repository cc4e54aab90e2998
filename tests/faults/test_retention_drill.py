"""Retention after a fallback, end to end: a damaged newest checkpoint, a resume that falls back, a preemption save
below the damaged tag, and pruning with train.keep_last_checkpoints=1 (the sharpest setting).

Ranking tags by step (the old prune) kept only the damaged step 6 here and deleted the step-5 checkpoint just
written, so the next resume found "no usable checkpoint". Now:

1. a copy of the reference run (checkpoints 4 and 6); one bit of step 6's rank-0 optimizer file is flipped on disk;
2. two ranks started by hand resume (the warning names the file; step 4 is used); as soon as rank 0 says it resumed,
   the test sends rank 1 a real SIGUSR1 (what slurm/train.sbatch forwards before a time limit): both ranks stop
   after step 5 with a checkpoint and exit 0. Pruning keeps step 5 (written, pointed at) and the damaged 6 (not of
   this line, never counted); it deletes step 4, the one older checkpoint of the line beyond keep_last=1;
3. the same command resumes from step 5, replaces the damaged 6 with a good one, exports: the final weights equal
   the uninterrupted reference run's, bit for bit.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import assert_same_weights, collect, final_weights, launch, losses, start_by_hand
from trainer.checkpoint import complete_tags, latest_complete

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KEEP_ONE = "train.keep_last_checkpoints=1"


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def preempt_after_resume(ranks: list[subprocess.Popen[str]]) -> tuple[str, list[str]]:
    """Send rank 1 SIGUSR1 once rank 0 printed that it resumed; rank 0's stdout and every rank's stderr."""

    def on_line(line: str) -> None:
        if line.startswith("resumed from "):  # both ranks installed their handlers before resuming
            ranks[1].send_signal(signal.SIGUSR1)

    stdouts, stderrs = collect(ranks, on_line)
    return stdouts[0], stderrs


def test_fallback_then_preemption_save_keeps_everything_usable(
    reference: Path, drill_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    root = out / "checkpoints"
    damaged = root / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_bit(damaged)
    damaged_bytes = damaged.read_bytes()

    ranks = start_by_hand(out, drill_data, KEEP_ONE)
    stdout, stderrs = preempt_after_resume(ranks)
    assert [process.returncode for process in ranks] == [0, 0], stderrs[0][-3000:] + stderrs[1][-3000:]
    assert f"{damaged}: sha256 differs" in stderrs[0]
    assert f"resumed from {root / 'step_00000004'} at step 4" in stdout
    assert "received SIGUSR1: stopping after this optimizer step with a checkpoint" in stderrs[1]
    assert f"saved {root / 'step_00000005'}" in stdout
    assert (root / "latest_complete").read_text().strip() == "step_00000005"
    # 5 written and pointed at; 6 damaged, kept as it was and never counted; 4 beyond keep_last=1 of 5's line.
    assert complete_tags(root) == ["step_00000005", "step_00000006"]
    assert damaged.read_bytes() == damaged_bytes
    assert latest_complete(out) == "step_00000005"

    rerun = launch(out, drill_data, KEEP_ONE)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {root / 'step_00000005'} at step 5" in rerun.stdout
    assert complete_tags(root) == ["step_00000006"]  # the good 6 replaced the damaged one; 5 pruned after it
    assert latest_complete(out) == "step_00000006"
    assert_same_weights(final_weights(out), final_weights(reference))
    assert losses(out) == losses(reference)  # the last logged value of every step, reruns included
