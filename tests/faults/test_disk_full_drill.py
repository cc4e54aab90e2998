"""A real full disk during a 2-rank save and during an export: every rank ends in seconds with one line.

The output folder is a size-limited tmpfs mounted by the test (we run as root, as CI does); where mounting is not
permitted, each process gets a file-size limit instead (RLIMIT_FSIZE: a write past it fails with EFBIG, Python
ignoring SIGXFSZ). Either way the fault comes from the kernel, not from a patched function: on a full tmpfs
torch.save's zip writer raises ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, the legacy
writer and plain files ``OSError(ENOSPC)``.

1. The run trains to step 2 and saves (the resume point), then stops.
2. A filler file leaves a third of a checkpoint free. Two ranks started by hand (as ``srun`` does: no launcher to
   end a rank's peers, train.collective_timeout_s at its 1,800 s default) resume, train to step 4 and fail to
   save it. Both exit 2 within BOUND_S of the step-4 log line, rank 0 prints one line naming the file and the free
   space, no traceback; step 4 is gone, step 2 is untouched and still verifies.
3. The filler is removed; the same command resumes from step 2, finishes and exports, bit-identical to the
   uninterrupted reference run.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sft_stack.cli.export import main as export_main
from tests.faults.conftest import assert_same_weights, collect, drill_env, final_weights, launch, start_by_hand
from trainer.checkpoint import latest_complete

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FS_BYTES = 48 * 2**20
"""The small file system: room for the run's checkpoints (two of about 3 MB kept, plus one being written) and its
export, so only the filler makes it full."""
BOUND_S = 120
"""How long the failing phase may take, from rank 0's step-4 log line to both ranks gone. It covers the save's
writes, the outcome exchange and process exit on a loaded 2-core machine (measured: see docs/RELIABILITY.md);
it is far below train.collective_timeout_s (1,800 s), which is what a rank left in a collective would wait."""


def mount_small_fs(where: Path) -> bool:
    """Mount a FS_BYTES tmpfs at ``where``; False where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    where.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(where)], capture_output=True, check=False
    )
    return result.returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    if not mount_small_fs(where):
        pytest.skip("mounting a tmpfs is not permitted here (needs root); RLIMIT_FSIZE covers the export drill")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on the file system of ``where``."""
    filler = where / "filler"
    size = max(shutil.disk_usage(where).free - leave, 0)
    with filler.open("wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * 2**20
        while size > 0:
            size -= handle.write(chunk[: min(len(chunk), size)])
    return filler


def checkpoint_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def test_full_disk_during_save_ends_every_rank_with_one_line(small_fs: Path, drill_data: Path, reference: Path) -> None:
    out = small_fs / "run"
    first = launch(out, drill_data, "train.stop_at_step=2")
    assert first.returncode == 0, first.stderr[-3000:]
    previous = out / "checkpoints" / "step_00000002"
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    filler = fill(small_fs, checkpoint_bytes(previous) // 3)

    ranks = start_by_hand(out, drill_data)
    step4_seen: list[float] = []

    def on_line(line: str) -> None:
        if line.startswith("step=4 ") and not step4_seen:  # logged just before the save of step 4
            step4_seen.append(time.monotonic())

    _, stderrs = collect(ranks, on_line)
    ended = time.monotonic()
    assert step4_seen, stderrs[0][-3000:]
    failing_phase = ended - step4_seen[0]
    print(f"failing phase: {failing_phase:.1f} s (bound {BOUND_S} s)")
    assert [process.returncode for process in ranks] == [2, 2], stderrs[0][-3000:] + stderrs[1][-3000:]
    assert failing_phase < BOUND_S

    lines = [line for line in stderrs[0].splitlines() if line.startswith("sft: error: ")]
    assert len(lines) == 1, stderrs[0][-3000:]
    (line,) = lines
    print(line)
    assert line.startswith(f"sft: error: saving checkpoint {out / 'checkpoints' / 'step_00000004'} failed: rank ")
    assert " writing " in line and "MiB free)" in line
    assert f"{previous} is untouched and stays the resume point" in line
    assert not any(text.startswith("sft: error: ") for text in stderrs[1].splitlines())  # printed once, by rank 0
    assert "Traceback" not in stderrs[0] + stderrs[1]

    assert not (out / "checkpoints" / "step_00000004").exists()  # never marked, never pointed at, removed
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == "step_00000002"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before

    filler.unlink()
    rerun = launch(out, drill_data)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {previous} at step 2" in rerun.stdout
    assert latest_complete(out) == "step_00000006"
    assert_same_weights(final_weights(out), final_weights(reference))


def test_full_disk_during_the_final_export_ends_both_ranks(small_fs: Path, drill_data: Path, reference: Path) -> None:
    """Checkpoint only at the end; the disk has room for that checkpoint and 300 KiB, not for the 1.3 MB export.

    The ZeRO gather runs on both ranks, rank 0's write fails, both exit 2 with one line; no final/ and no
    final.partial; the step-6 checkpoint is complete. With space freed, the same command exports from it.
    """
    out = small_fs / "run"
    need = checkpoint_bytes(reference / "checkpoints" / "step_00000006") + 2**18
    filler = fill(small_fs, need + 2**18)
    ranks = start_by_hand(out, drill_data, "train.save_every_steps=0")
    _, stderrs = collect(ranks)
    assert [process.returncode for process in ranks] == [2, 2], stderrs[0][-3000:] + stderrs[1][-3000:]
    lines = [line for line in stderrs[0].splitlines() if line.startswith("sft: error: ")]
    assert len(lines) == 1, stderrs[0][-3000:]
    print(lines[0])
    assert lines[0].startswith(f"sft: error: exporting to {out / 'final'} failed: rank 0: ")
    assert "MiB free)" in lines[0] and f"nothing was written to {out / 'final'}" in lines[0]
    assert "Traceback" not in stderrs[0] + stderrs[1]
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    assert latest_complete(out) == "step_00000006"

    filler.unlink()
    rerun = launch(out, drill_data, "train.save_every_steps=0")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000006'} at step 6" in rerun.stdout
    assert_same_weights(final_weights(out), final_weights(reference))


def limit_file_size(limit: int) -> None:
    """In the child: no file may grow past ``limit`` bytes (writes past it fail with EFBIG)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_one_rank_that_cannot_write_ends_both(drill_data: Path, tmp_path: Path) -> None:
    """Only rank 1 fails (its files may not grow past 1 MiB; its 2 MB optimizer partition does), rank 0 succeeds.

    The asymmetric case: rank 0 finishes its writes and waits in DeepSpeed's barrier at the end of save_checkpoint,
    which rank 1 reaches only because its failure is recorded instead of raised. Both still exit 2 with one line.
    Needs no root (RLIMIT_FSIZE), so it also stands in for the tmpfs drill where mounting is not permitted.
    """
    out = tmp_path / "run"
    ranks = start_by_hand(out, drill_data, "train.stop_at_step=2", preexec={1: lambda: limit_file_size(2**20)})
    started = time.monotonic()
    _, stderrs = collect(ranks)
    print(f"whole run with the failing save: {time.monotonic() - started:.1f} s")
    assert [process.returncode for process in ranks] == [2, 2], stderrs[0][-3000:] + stderrs[1][-3000:]
    lines = [line for line in stderrs[0].splitlines() if line.startswith("sft: error: ")]
    assert len(lines) == 1, stderrs[0][-3000:]
    print(lines[0])
    assert lines[0].startswith(
        f"sft: error: saving checkpoint {out / 'checkpoints' / 'step_00000002'} failed: rank 1: "
    )
    assert "rank 0:" not in lines[0]  # rank 0 wrote everything it had to
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in lines[0] and "no earlier checkpoint" in lines[0]
    assert "Traceback" not in stderrs[0] + stderrs[1]
    assert not (out / "checkpoints" / "step_00000002").exists() and latest_complete(out) is None


def test_full_disk_during_export_is_one_line_and_leaves_nothing(
    tmp_path: Path, reference: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``cli.export --checkpoint`` of the reference run into a file system too small for its 0.7 MB of weights."""
    where = tmp_path / "small"
    out = where / "exported"
    command = ["--checkpoint", str(reference), "--out", str(out)]
    if mount_small_fs(where):
        try:
            fill(where, 2**18)  # 256 KiB left
            code, err = export_main(command), capfd.readouterr().err
            left = sorted(p.name for p in where.iterdir())
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
    else:  # not root: the same command in a child none of whose files may grow past 256 KiB
        result = subprocess.run(
            [sys.executable, "-m", "sft_stack.cli.export", *command],
            env=drill_env(),
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=lambda: limit_file_size(2**18),
        )
        code, err, left = result.returncode, result.stderr, sorted(p.name for p in where.iterdir())
    assert code == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("sft: error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"sft: error: exporting to {out} failed: "), err[-3000:]
    assert "MiB free)" in lines[0] and f"nothing was written to {out}" in lines[0]
    assert "Traceback" not in err
    print(lines[0])
    assert "exported" not in left and "exported.partial" not in left  # no partial output presented as good
