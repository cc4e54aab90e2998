"""Fault drills on the real `deepspeed` launcher (2 gloo ranks on CPU): nothing is lost, the final weights are
bit-exact with an uninterrupted run.

One output directory goes through a gauntlet, each stage the same command (plus one fault) as a user would
rerun it after a crash:

1. rank 1 is SIGKILLed in the middle of step 3 (after its optimizer update, before the step's reduction);
2. the rerun resumes from step 2; rank 1 is SIGKILLed in the middle of saving step 4 (files written, no marker);
3. the rerun resumes from step 2, trains to 6, saves, and rank 0 is SIGKILLed in the middle of the export;
4. one bit of step 6's rank-1 optimizer file is flipped; the rerun detects it, names the file, falls back to
   step 4, trains 5-6 again and exports.

The final weights then equal the uninterrupted reference run's, bit for bit, and so does every step's loss.
A second drill hangs one rank and checks that the other fails within train.collective_timeout_s naming both.
The full disk (a real size-limited file system) is test_disk_full_drill.py; retention after a fallback is
test_retention_drill.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import (
    assert_same_weights,
    drill_env,
    final_weights,
    launch,
    losses,
    start_by_hand,
)
from trainer.checkpoint import COMPLETE

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def pointer(out: Path) -> str:
    return (out / "checkpoints" / "latest_complete").read_text().strip()


@pytest.fixture(scope="module")
def gauntlet(tmp_path_factory: pytest.TempPathFactory, drill_data: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run the four stages into one output directory; each stage's process result, and state seen after it."""
    out = tmp_path_factory.mktemp("gauntlet") / "run"
    stages: dict[str, subprocess.CompletedProcess[str]] = {}
    seen: dict[str, object] = {}

    stages["kill_mid_step"] = launch(out, drill_data, env=drill_env(SFT_TEST_FAULT="update:3:1:kill"))
    seen["after_kill_mid_step"] = pointer(out)

    stages["kill_mid_save"] = launch(out, drill_data, env=drill_env(SFT_TEST_FAULT="save:4:1:kill"))
    seen["after_kill_mid_save"] = (pointer(out), (out / "checkpoints/step_00000004" / COMPLETE).exists())

    stages["kill_mid_export"] = launch(out, drill_data, env=drill_env(SFT_TEST_FAULT="export:6:0:kill"))
    seen["after_kill_mid_export"] = (pointer(out), (out / "final").exists())

    damaged = out / "checkpoints" / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    stages["damaged_newest"] = launch(out, drill_data)
    (out / "seen.json").write_text(json.dumps({**seen, "damaged": str(damaged)}))
    stages["out"] = out  # type: ignore[assignment]
    return stages


def test_kill_one_rank_mid_step(gauntlet: dict) -> None:  # type: ignore[type-arg]
    result = gauntlet["kill_mid_step"]
    assert result.returncode != 0
    assert "exits with return code = -9" in result.stdout + result.stderr  # the launcher saw rank 1 SIGKILLed
    seen = json.loads((gauntlet["out"] / "seen.json").read_text())
    assert seen["after_kill_mid_step"] == "step_00000002"


def test_kill_one_rank_mid_save(gauntlet: dict) -> None:  # type: ignore[type-arg]
    result = gauntlet["kill_mid_save"]
    assert result.returncode != 0
    assert "resumed from" in result.stdout and "step_00000002 at step 2" in result.stdout
    seen = json.loads((gauntlet["out"] / "seen.json").read_text())
    assert seen["after_kill_mid_save"] == ["step_00000002", False]  # step 4 was written but never counted


def test_kill_one_rank_mid_export(gauntlet: dict) -> None:  # type: ignore[type-arg]
    result = gauntlet["kill_mid_export"]
    assert result.returncode != 0
    assert "saved" in result.stdout and "step_00000006" in result.stdout
    seen = json.loads((gauntlet["out"] / "seen.json").read_text())
    assert seen["after_kill_mid_export"] == ["step_00000006", False]  # no half export under the final name


def test_damaged_newest_checkpoint_falls_back_and_everything_matches(gauntlet: dict, reference: Path) -> None:  # type: ignore[type-arg]
    result = gauntlet["damaged_newest"]
    out = gauntlet["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    damaged = json.loads((out / "seen.json").read_text())["damaged"]
    assert f"{damaged}: sha256 differs" in result.stderr
    assert "step_00000004 at step 4" in result.stdout
    assert_same_weights(final_weights(out), final_weights(reference))
    assert losses(out) == losses(reference)  # the last logged value of every step, reruns included


def test_hung_rank_fails_within_the_timeout_naming_rank_and_step(drill_data: Path, tmp_path: Path) -> None:
    """Two ranks started by hand (as srun does); rank 1 hangs at the start of step 3."""
    ranks = start_by_hand(
        tmp_path / "run", drill_data, "train.collective_timeout_s=20", env=drill_env(SFT_TEST_FAULT="start:3:1:hang")
    )
    try:
        _, stderr = ranks[0].communicate(timeout=600)  # rank 0 ends by itself...
        assert ranks[0].returncode == 1, stderr[-3000:]
        assert ranks[1].poll() is None  # ...while rank 1 is still hanging
        assert (
            "sft: error: rank 0: a collective of step 3 did not complete within train.collective_timeout_s=20: "
            "rank 1 stopped at step 2 (done) while others reached step 3 (data)"
        ) in stderr
    finally:
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.communicate()
