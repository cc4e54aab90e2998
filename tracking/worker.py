"""The background thread of a tracked training run: journal every operation, send what is pending, retry.

The training thread only puts small dicts on ``Worker.queue``. The thread turns each into journal ops
(``tracking.journal``), appends them to the spool, and sends the pending ones with ``tracking.sender``. A
server that does not answer (at start or mid-run) gets one warning; the thread keeps journaling and retries
with exponential backoff (1 s to 30 s), replaying everything in order when the server is back. On close it
waits at most ``close_timeout_s``; what is left stays in the spool for ``python -m tracking sync OUT``.

Why not MLflow's own asynchronous logging (``log_batch(synchronous=False)``,
``mlflow.config.enable_async_logging``): it queues in memory and drops what fails, so a crash, a requeued
job or a server that is down when the run starts loses metrics, and ``create_run`` is synchronous anyway.
This thread journals first, then calls MLflow synchronously, which gives the same never-blocking loop plus
restart and outage survival. It also samples MLflow's system-metrics monitors through the same journal and
draws ``loss_curve.png`` at the end.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

from tracking.journal import Spool
from tracking.naming import metric_name, redact_text
from tracking.sender import Offline, Sender, short

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0
_COPY_LIMIT_BYTES = 1 << 30
"""Artifacts up to 1 GiB are copied into the spool; bigger ones are uploaded from where they are."""
_SYSTEM_METRICS_INTERVAL_S = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


class Worker(threading.Thread):
    """Turns queued commands into journal ops, sends pending ops, retries with backoff, samples system metrics."""

    def __init__(
        self,
        *,
        spool: Spool,
        tracking_uri: str,
        resume_run_id: str | None,
        close_timeout_s: float,
        system_metrics: bool,
    ) -> None:
        super().__init__(name="mlflow-tracking", daemon=True)
        self.spool = spool
        self.tracking_uri = tracking_uri
        self.close_timeout_s = close_timeout_s
        self.system_metrics = system_metrics
        self.queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.started = threading.Event()
        self.sender = Sender(spool.output_dir, tracking_uri, resume_run_id)
        self.pending: list[dict[str, Any]] = []
        self.prior_steps: dict[str, int] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.offline_since: float | None = None
        self.retry_at = 0.0
        self.backoff = 1.0
        self.warned = False
        self.closing_deadline: float | None = None
        self.monitors: list[Any] = []
        self.next_sample = 0.0
        self.system_step = 0

    @property
    def run_id(self) -> str | None:
        return self.sender.run_id

    def run(self) -> None:
        try:
            self.load_journal()
            self._flush()  # the start op (and anything an earlier session left pending)
            self.started.set()
            self._start_monitors()
            while True:
                self._take(timeout=0.2 if self.pending or self.monitors else 1.0)
                if self.closing_deadline is not None:
                    self.drain_until(self.closing_deadline)
                    return
                self._flush()
                self._sample_system_metrics()
        except Exception as exc:  # the thread must never take training down
            log.warning("tracking: background thread failed (%s); ops stay in %s", short(exc), self.spool.dir)
        finally:
            self.started.set()
            self.spool.close()

    def load_journal(self) -> None:
        """Read what earlier sessions journaled: the unsent ops become pending, logged steps are remembered."""
        ops = self.spool.read()
        sent = self.spool.sent_seq()
        self.pending = [op for op in ops if op["seq"] > sent]
        for op in ops:
            if op["op"] == "metrics":
                for key, value in op["metrics"].items():
                    self.prior_steps[key] = max(self.prior_steps.get(key, -1), op["step"])
                    self.history.setdefault(key, []).append((op["step"], value))
        self.system_step = self.prior_steps.get("system/cpu_utilization_percentage", -1) + 1
        self._take(timeout=0)  # the start op of this session was queued before the thread started

    def drain_until(self, deadline: float) -> None:
        """Send until nothing is pending or ``deadline`` (time.monotonic) passes; say what is left."""
        while self.pending and time.monotonic() < deadline:
            self._flush()
            if self.pending:
                time.sleep(max(0.0, min(self.retry_at, deadline) - time.monotonic()))
        if self.pending:
            log.warning(
                "tracking: %d operations not sent to %s within %.0f s; they are kept in %s; send them with "
                "`python -m tracking sync %s`",
                len(self.pending),
                redact_text(self.tracking_uri),
                self.close_timeout_s,
                self.spool.dir,
                self.spool.output_dir,
            )

    def _take(self, timeout: float) -> None:
        """Move queued commands into the journal (and pending); block up to ``timeout`` for the first."""
        commands = []
        try:
            commands.append(self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait())
            while True:
                commands.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        ops: list[dict[str, Any]] = []
        for command in commands:
            if command["op"] == "close":
                self.closing_deadline = time.monotonic() + self.close_timeout_s
                self.monitors = []
                continue
            ops += self._expand(command)
        if ops:
            self.spool.append(ops)
            self.pending += ops

    def _expand(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        """Journal ops for one command: metrics filtered against earlier sessions, files written or copied in."""
        match command["op"]:
            case "metrics":
                return self._metrics_ops(command)
            case "artifact":
                path = Path(command["path"])
                if not path.exists():
                    log.warning("tracking: log_artifact(%s): no such file; not logged", path)
                    return []
                if command.get("copy", True) and _path_size(path) <= _COPY_LIMIT_BYTES:
                    path = self.spool.copy_in(path)
                return [{"op": "artifact", "path": str(path), "artifact_path": command.get("artifact_path")}]
            case "text_artifact":
                target = self.spool.new_file(command["name"])
                target.write_text(redact_text(command["text"]), encoding="utf-8")
                return [{"op": "artifact", "path": str(target), "artifact_path": command.get("artifact_path")}]
            case "table":
                return [self._table_op(command["rows"], command["artifact_file"])]
            case "loss_curve":
                png = self._plot_loss_curve()
                return [{"op": "artifact", "path": str(png), "artifact_path": None}] if png else []
            case "final":
                return self._final_ops(Path(command["dir"]), command["upload_weights"])
        return [command]

    def _metrics_ops(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        step = command["step"]
        named = {metric_name(k): v for k, v in command["metrics"].items()}
        fresh = {k: v for k, v in named.items() if step > self.prior_steps.get(k, -1)}
        for key, value in fresh.items():
            self.history.setdefault(key, []).append((step, value))
        return [{**command, "metrics": fresh}] if fresh else []

    def _table_op(self, rows: list[dict[str, Any]], artifact_file: str) -> dict[str, Any]:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        body = {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}
        target = self.spool.new_file(Path(artifact_file).name)
        target.write_text(json.dumps(body, ensure_ascii=False, default=str), encoding="utf-8")
        return {"op": "table", "file": str(target), "artifact_file": artifact_file}

    def _final_ops(self, final_dir: Path, upload_weights: bool) -> list[dict[str, Any]]:
        if not final_dir.exists():  # a session stopped before max_steps (stop_at_step) exports nothing
            return []
        is_adapter = (final_dir / "adapter_config.json").is_file()
        ops: list[dict[str, Any]] = [
            {
                "op": "tags",
                "tags": {"final.path": str(final_dir.resolve()), "final.kind": "adapter" if is_adapter else "full"},
            }
        ]
        if is_adapter or upload_weights:
            ops += self._expand({"op": "artifact", "path": str(final_dir), "artifact_path": None, "copy": False})
        return ops

    def _plot_loss_curve(self) -> Path | None:
        """loss_curve.png of every metric whose name contains "loss", over all sessions of this run."""
        series = {k: sorted(dict(v).items()) for k, v in self.history.items() if "loss" in k and v}
        if not series:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
        for key, points in sorted(series.items()):
            steps, values = zip(*[(s, v) for s, v in points if math.isfinite(v)], strict=False) if points else ((), ())
            axes.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend()
        target = self.spool.new_file("loss_curve.png")
        figure.savefig(target, bbox_inches="tight")
        plt.close(figure)
        return target

    def _flush(self) -> None:
        """Send pending ops in order until done or the server stops answering (then back off)."""
        while self.pending:
            if self.offline_since is not None and time.monotonic() < self.retry_at:
                return
            try:
                count = self.sender.send(self.pending)
            except Offline as exc:
                self._went_offline(str(exc))
                return
            self.spool.mark_sent(self.pending[count - 1]["seq"])
            del self.pending[:count]
            if self.offline_since is not None:
                log.warning(
                    "tracking: MLflow at %s answers again after %.0f s; replaying the spool",
                    redact_text(self.tracking_uri),
                    time.monotonic() - self.offline_since,
                )
                self.offline_since = None
                self.backoff = 1.0

    def _went_offline(self, reason: str) -> None:
        now = time.monotonic()
        if self.offline_since is None:
            self.offline_since = now
        if not self.warned:
            self.warned = True
            log.warning(
                "tracking: MLflow at %s is unreachable (%s); training continues, logging is spooled to %s "
                "and replayed when the server answers (or run `python -m tracking sync %s`)",
                redact_text(self.tracking_uri),
                reason,
                self.spool.dir,
                self.spool.output_dir,
            )
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF_S)

    def _start_monitors(self) -> None:
        """mlflow's own system-metrics samplers (psutil; pynvml for GPUs), routed through the journal."""
        if not self.system_metrics:
            return
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        except ImportError:  # psutil missing
            return
        self.monitors = [CPUMonitor(), DiskMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # pynvml missing or no NVIDIA driver: CPU metrics only
            pass
        self.next_sample = time.monotonic() + _SYSTEM_METRICS_INTERVAL_S

    def _sample_system_metrics(self) -> None:
        if not self.monitors or time.monotonic() < self.next_sample:
            return
        self.next_sample = time.monotonic() + _SYSTEM_METRICS_INTERVAL_S
        values: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            values.update({f"system/{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
            monitor.clear_metrics()
        op = {"op": "metrics", "step": self.system_step, "time_ms": now_ms(), "metrics": values}
        self.system_step += 1
        self.spool.append([op])
        self.pending.append(op)


def replay(spool: Spool, tracking_uri: str, timeout_s: float) -> tuple[int, int, str | None]:
    """Send what ``spool`` still holds, from this thread; return (ops pending, ops left, run id).

    The caller holds the spool's lock (a running job replays its own spool) and closes it.
    """
    worker = Worker(
        spool=spool, tracking_uri=tracking_uri, resume_run_id=None, close_timeout_s=timeout_s,
        system_metrics=False,
    )  # fmt: skip
    worker.load_journal()
    total = len(worker.pending)
    worker.drain_until(time.monotonic() + timeout_s)
    return total, len(worker.pending), worker.run_id


def _path_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
