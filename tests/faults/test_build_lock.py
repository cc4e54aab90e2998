"""Drill: a launch killed while DeepSpeed builds (or loads) an op leaves torch's build lock behind, which made every
later launch wait forever inside init_distributed, silently (issue 20). The fault is real: a process takes the lock
with torch's own FileBaton, exactly as torch.utils.cpp_extension does, and is SIGKILLed while holding it. The
extensions folder is a temporary one (TORCH_EXTENSIONS_DIR); the real ~/.cache/torch_extensions is never touched.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import drill_env, launch
from trainer.build_lock import StaleLock, find_stale_locks

pytestmark = pytest.mark.faults

HOLD = """
import sys, time
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()  # what torch's _jit_compile does before building or loading an op
print("held", flush=True)
time.sleep(600)
"""


def hold_lock(lock: Path) -> subprocess.Popen[str]:
    """A process that holds ``lock`` as a builder does (created with O_EXCL, kept open); returns once it does."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def kill(holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)


def plant_stale_lock(root: Path, op: str = "deepspeed_shm_comm") -> Path:
    """The state a launch SIGKILLed during the op's build leaves: the lock file, nobody holding it."""
    lock = root / op / "lock"
    kill(hold_lock(lock))
    assert lock.is_file()
    return lock


def test_a_held_lock_is_live_and_the_same_lock_after_a_kill_is_stale(tmp_path: Path) -> None:
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    holder = hold_lock(lock)
    try:
        assert find_stale_locks(tmp_path) == []  # a build in progress: wait for it, as torch does
    finally:
        kill(holder)
    assert lock.is_file()  # the kill left it: torch's FileBaton removes it only in release()
    (stale,) = find_stale_locks(tmp_path)
    assert stale == StaleLock(path=lock, op="deepspeed_shm_comm")
    message = stale.message()
    assert "\n" not in message and message.startswith(f"{lock}: stale lock of DeepSpeed's deepspeed_shm_comm build")
    assert message.endswith(f"Delete it: rm {lock}")
    lock.unlink()
    assert find_stale_locks(tmp_path) == []


def test_no_extensions_folder_means_no_lock(tmp_path: Path) -> None:
    assert find_stale_locks(tmp_path / "never_built") == []


@pytest.mark.slow
def test_a_launch_with_a_stale_lock_fails_fast_naming_the_file(tmp_path: Path, drill_data: Path) -> None:
    """The real `deepspeed --num_gpus 2 launcher/run.py` on a valid config: it stops before the process group with
    the line naming the lock, instead of waiting forever. Bound: 300 s, far above the launcher's start and two
    ranks' imports (about 30 s on the loaded 2-core CI machine) and far below forever, which is what it was."""
    extensions = tmp_path / "torch_extensions"
    lock = plant_stale_lock(extensions)
    started = time.monotonic()
    result = launch(tmp_path / "out", drill_data, env=drill_env(TORCH_EXTENSIONS_DIR=str(extensions)))
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert elapsed < 300, elapsed
    lines = [
        line for line in output.splitlines() if line.startswith("sft: error: ")
    ]  # local rank 0 speaks for the node
    assert lines == [f"sft: error: {StaleLock(path=lock, op='deepspeed_shm_comm').message()}"], output[-3000:]
    assert "joining the process group" not in output and "Traceback" not in output
    assert lock.is_file()  # the user deletes it, as the line says; the trainer removes nothing it did not create
    assert not (tmp_path / "out").exists()
