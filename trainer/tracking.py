"""MLflow tracking (placeholder interface; the tracking issue replaces the body, not the signatures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Tracker:
    """What the training loop calls. Only rank 0 gets a real tracker; other ranks get a no-op one."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record one metrics.jsonl row (or eval metrics) at optimizer step ``step``. Never blocks."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory (queued; never blocks the step)."""

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Record rows (e.g. sample generations) as a table artifact."""

    def close(self, status: str = "FINISHED", final_dir: str | Path | None = None) -> None:
        """Flush, upload end-of-run artifacts (final adapter / weight path), and end the run."""


def open_tracker(**kwargs: Any) -> Tracker:
    """Return a tracker for this rank; see the tracking module's docstring for the arguments."""
    return Tracker()
