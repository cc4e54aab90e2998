"""``Tracker``, what the training loop calls, and ``open_tracker``, which starts one from plain values.

Only the process that tracks (rank 0 with tracking on) gets a working ``Tracker``; every other caller gets a
no-op one and mlflow is never imported. Every method only enqueues for ``tracking.worker`` (microseconds)
and never raises because of MLflow.

The store: ``uri`` (else ``$MLFLOW_TRACKING_URI``, else the default sqlite store ``./mlruns``, the one
``prepare`` and ``python -m tracking dashboard`` use). Files and logs name it redacted (``naming.redact_text``). A resumed or requeued job continues the run named in ``OUT/mlflow_run.json`` (or
``resume_run_id``, the id its checkpoint stored); steps already journaled are not logged again.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracking.journal import Spool
from tracking.naming import MAX_TAG_CHARS, clean_params, redact_logs, redact_text, resolve_tracking_uri
from tracking.worker import Worker, now_ms

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
"""How long open_tracker waits for the run to be created before training starts anyway (spooling)."""
_SNAPSHOT_LIMIT_BYTES = 1 << 20
"""Files up to 1 MiB given to log_artifact are copied on the calling thread: the upload has that call's bytes."""


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """What a training run records at start, as plain values (the caller builds it from its own config)."""

    experiment: str
    run_name: str
    params: dict[str, Any]
    """Redacted and truncated here (secret-looking names become ``***``)."""
    tags: dict[str, Any]
    texts: dict[str, str] = field(default_factory=dict)
    """{artifact path ("config/config.yaml"): text}, uploaded at start; the caller redacts them."""
    files: dict[str, str | Path] = field(default_factory=dict)
    """{artifact directory: file}, uploaded at start."""
    dataset: dict[str, Any] | None = None
    """The training data as a dataset input (see tracking.sender.log_dataset)."""


@dataclass(frozen=True, kw_only=True)
class TrackerSettings:
    """Where and how to send: the ``tracking.*`` config section as plain values."""

    uri: str | None = None
    close_timeout_s: float = 60.0
    system_metrics: bool = True
    upload_weights: bool = False


class Tracker:
    """What the training loop calls: metrics, artifacts, tables, close. A tracker without a worker does nothing."""

    def __init__(self, worker: Worker | None = None, upload_weights: bool = False) -> None:
        self._worker = worker
        self._upload_weights = upload_weights
        self._closed = False
        self._snapshots = 0

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once created (None when tracking is off or the server has not answered yet)."""
        return self._worker.run_id if self._worker else None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Record one metrics.jsonl row (or eval metrics) at optimizer step ``step``. Never blocks.

        Numeric fields become metrics (a ``step`` field is the step itself); other fields are ignored.
        """
        if self._worker is None:
            return
        values = {
            key: float(value)
            for key, value in metrics.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if values:
            self._worker.queue.put({"op": "metrics", "step": int(step), "time_ms": now_ms(), "metrics": values})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory as it is now; never blocks the step.

        A small file (up to 1 MiB) is copied into the spool right here (well under a millisecond), anything
        bigger by the background thread, so change a big artifact only after ``close`` or under a new name.
        """
        if self._worker is None:
            return
        source = Path(path).resolve()
        command: dict[str, Any] = {"op": "artifact", "path": str(source), "artifact_path": artifact_path}
        if source.is_file() and source.stat().st_size <= _SNAPSHOT_LIMIT_BYTES:
            self._snapshots += 1
            target = self._worker.spool.dir / "artifacts" / f"snapshot-{os.getpid()}-{self._snapshots}" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            command.update(path=str(target), copy=False)
        self._worker.queue.put(command)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Record rows (e.g. sample generations) as a table artifact (``.json``), shown in MLflow's UI.

        Logging the same ``artifact_file`` again replaces it (unlike MlflowClient.log_table, which appends).
        """
        if self._worker is None:
            return
        if not artifact_file.endswith(".json"):
            raise ValueError(f"log_table({artifact_file!r}): the artifact file must end in .json")
        self._worker.queue.put({"op": "table", "rows": [dict(row) for row in rows], "artifact_file": artifact_file})

    def close(self, status: str = "FINISHED", final_dir: str | Path | None = None) -> None:
        """Log end-of-run artifacts (loss curve; final adapter, or the full weights' path), end the run, flush.

        Waits at most ``close_timeout_s`` for the server; what is not sent stays in the spool.
        """
        if self._worker is None or self._closed:
            return
        self._closed = True
        put = self._worker.queue.put
        if final_dir is not None:
            put({"op": "final", "dir": str(Path(final_dir).resolve()), "upload_weights": self._upload_weights})
        put({"op": "loss_curve"})
        put({"op": "end", "status": status, "time_ms": now_ms()})
        put({"op": "close"})
        self._worker.join(timeout=self._worker.close_timeout_s + 30)


def open_tracker(
    output_dir: str | Path, record: RunRecord, settings: TrackerSettings, resume_run_id: str | None = None
) -> Tracker:
    """Start tracking the run writing ``output_dir``: queue its start, params, tags and files, start the worker.

    Waits up to 30 s for the run to be created (the server may be down; training then starts anyway).
    """
    output_dir = Path(output_dir)
    redact_logs()
    spool = Spool(output_dir)
    if not spool.lock():
        log.warning("tracking: %s is used by another process (a sync?); this run is not tracked", spool.dir)
        return Tracker()
    tracking_uri, artifact_location = resolve_tracking_uri(settings.uri)
    worker = Worker(
        spool=spool,
        tracking_uri=tracking_uri,
        resume_run_id=resume_run_id,
        close_timeout_s=settings.close_timeout_s,
        system_metrics=settings.system_metrics,
    )
    put = worker.queue.put
    put(
        {
            "op": "start",
            "experiment": record.experiment,
            "run_name": record.run_name,
            "artifact_location": artifact_location,
            "tracking_uri": redact_text(tracking_uri),  # `sync` takes the real one from --uri or the environment
            "time_ms": now_ms(),
        }
    )
    put({"op": "tags", "tags": clean_params(record.tags, MAX_TAG_CHARS)})
    put({"op": "params", "params": clean_params(record.params)})
    for artifact_file, text in record.texts.items():
        directory, _, name = artifact_file.rpartition("/")
        put({"op": "text_artifact", "name": name, "text": text, "artifact_path": directory or None})
    if record.dataset is not None:
        put({"op": "dataset", **record.dataset})
    for artifact_path, path in record.files.items():
        put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})
    worker.start()
    worker.started.wait(_START_TIMEOUT_S)
    return Tracker(worker, upload_weights=settings.upload_weights)
