"""The on-disk journal of a training run's tracking: ``OUT/mlflow_spool`` and ``OUT/mlflow_run.json``.

Every operation the tracker is given is appended to ``ops.jsonl`` (one JSON object per line, numbered by
``seq``) before it is sent; ``sent.json`` holds the last ``seq`` MLflow has. Artifacts are copied into the
spool so a replay uploads the bytes of the moment they were logged. This is what MLflow's own asynchronous
logging does not do: its queue lives in memory, so a crash, a requeued job or a server that is down when the
run starts loses it; the journal survives all three and ``python -m tracking sync OUT`` replays it.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path
from typing import Any

from sft_stack.common.atomic import write_json_atomic
from tracking.naming import redact_strings, redact_text

RUN_FILE = "mlflow_run.json"
"""In the output directory: {"run_id", "experiment_id", "tracking_uri"} of the run this directory logs to (the
URI redacted: no password or token reaches the disk)."""
SPOOL_DIR = "mlflow_spool"
"""In the output directory: the journal of every tracking operation and copies of logged artifacts."""
JOURNAL_FILE = "ops.jsonl"
CURSOR_FILE = "sent.json"
LOCK_FILE = "lock"


class Spool:
    """OUT/mlflow_spool: the append-only journal of operations, the sent cursor, artifact copies, a lock."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / SPOOL_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal = self.dir / JOURNAL_FILE
        self.cursor = self.dir / CURSOR_FILE
        self._lock_handle: Any = None
        self._handle: Any = None
        self.next_seq = 0

    def lock(self) -> bool:
        """Hold the spool for this process (a training run or a sync); False if another process holds it."""
        self._lock_handle = open(self.dir / LOCK_FILE, "w")  # noqa: SIM115 (held for the spool's lifetime)
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_handle.close()
            self._lock_handle = None
            return False
        return True

    def read(self) -> list[dict[str, Any]]:
        """Every op in the journal, in order; a torn last line (a crash mid-write) is ignored."""
        if not self.journal.is_file():
            return []
        ops = []
        with open(self.journal, encoding="utf-8") as handle:
            for line in handle:
                try:
                    ops.append(json.loads(line))
                except ValueError:
                    break
        if ops:
            self.next_seq = ops[-1]["seq"] + 1
        return ops

    def sent_seq(self) -> int:
        """Sequence number of the last op known to be in MLflow (-1: none)."""
        try:
            return int(json.loads(self.cursor.read_text())["seq"])
        except (OSError, ValueError, KeyError):
            return -1

    def append(self, ops: list[dict[str, Any]]) -> None:
        if self._handle is None:
            self._handle = open(self.journal, "a", encoding="utf-8")  # noqa: SIM115 (kept open, closed in close())
        for op in ops:
            op["seq"] = self.next_seq
            self.next_seq += 1
            self._handle.write(json.dumps(redact_strings(op), ensure_ascii=False) + "\n")
        self._handle.flush()

    def mark_sent(self, seq: int) -> None:
        write_json_atomic(self.cursor, {"seq": seq})

    def new_file(self, name: str) -> Path:
        """A path in the spool for a file the next op will upload (its directory exists)."""
        target = self.dir / "artifacts" / str(self.next_seq) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def copy_in(self, path: Path) -> Path:
        """Copy a file or directory into the spool so a later replay uploads these bytes."""
        target = self.dir / "artifacts" / str(self.next_seq) / path.name
        if target.exists():
            shutil.rmtree(target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return target

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None


def read_run_file(output_dir: str | Path) -> dict[str, Any] | None:
    """OUT/mlflow_run.json as a dict, or None when the directory has no run yet."""
    try:
        state = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("run_id") else None


def write_run_file(output_dir: str | Path, run_id: str, experiment_id: str | None, tracking_uri: str) -> None:
    body = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": redact_text(tracking_uri)}
    write_json_atomic(Path(output_dir) / RUN_FILE, body)
