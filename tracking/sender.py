"""Sending journal operations to one MLflow tracking URI with ``MlflowClient`` (synchronously, from the
tracker's own thread): create or reopen the run, params, tags, metrics, artifacts, tables, the dataset input.

``send`` raises ``Offline`` when the server or store does not answer, so the caller keeps the op and retries;
an op MLflow refuses for good is skipped with a warning. Replays are idempotent: a metric carries the time it
was logged, so sending it twice writes the same row.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracking.journal import read_run_file, write_run_file
from tracking.naming import get_or_create_experiment, open_client, redact_text

log = logging.getLogger(__name__)

_TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"})
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}
"""MLflow's log_batch limits per request."""


class Offline(Exception):
    """The tracking server (or store) did not answer; the op stays pending."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: the server unreachable or overloaded, sqlite busy or locked."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, OSError):  # requests' exceptions derive from OSError too
        return True
    return type(exc).__name__ in ("OperationalError", "TimeoutError")  # sqlite busy / locked


def short(exc: BaseException) -> str:
    """One line of at most 200 characters describing ``exc`` (credentials in a URL it names redacted)."""
    text = redact_text(" ".join(str(exc).split()))
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def log_batch(
    client: Any, run_id: str, *, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Sequence[Any] = ()
) -> None:
    """``client.log_batch`` in chunks MLflow accepts."""
    for kind, items in (("metrics", metrics), ("params", params), ("tags", tags)):
        size = _BATCH[kind]
        for start in range(0, len(items), size):
            client.log_batch(run_id, **{kind: items[start : start + size]}, synchronous=True)


def log_dataset(client: Any, run_id: str, dataset: dict[str, Any]) -> None:
    """Record a prepared data directory as the run's dataset input.

    ``dataset``: {"path", "name", "digest" (at most 36 characters), "profile" (JSON-able), "context",
    "columns" (token columns, optional)}.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema
    from mlflow.types.schema import Array, ColSpec, DataType

    columns = dataset.get("columns")
    schema = Schema([ColSpec(Array(DataType.integer), name) for name in columns]) if columns else None
    with warnings.catch_warnings():  # a local path matches two equivalent registered source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset["path"])
    meta = MetaDataset(source, name=dataset["name"], digest=dataset["digest"], schema=schema).to_dict()  # type: ignore[abstract]
    entity = Dataset(
        name=meta["name"],
        digest=meta["digest"],
        source_type=meta["source_type"],
        source=meta["source"],
        schema=meta.get("schema"),
        profile=json.dumps(dataset["profile"], ensure_ascii=False),
    )
    context = InputTag("mlflow.data.context", dataset["context"])
    client.log_inputs(run_id, [DatasetInput(entity, [context])])


class Sender:
    """Sends journal ops to one MLflow tracking URI, creating or reopening the run on the first op."""

    def __init__(self, output_dir: Path, tracking_uri: str, resume_run_id: str | None = None) -> None:
        self.output_dir = output_dir
        self.tracking_uri = tracking_uri
        self._client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.refused = 0
        state = read_run_file(output_dir)
        if state and state.get("tracking_uri") == redact_text(tracking_uri):
            self.run_id, self.experiment_id = state["run_id"], state["experiment_id"]
        elif resume_run_id:
            self.run_id = resume_run_id

    @property
    def client(self) -> Any:
        """The MlflowClient, its store opened on first use (so a store that fails to open is retried)."""
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def send(self, ops: list[dict[str, Any]]) -> int:
        """Send a prefix of ``ops`` (one MLflow call); return how many ops it covered. Raises Offline."""
        try:
            return self._send(ops)
        except Exception as exc:
            if is_transient(exc):
                raise Offline(short(exc)) from exc
            self.refused += 1
            if self.refused <= 5:
                log.warning("tracking: MLflow refused a %s operation (%s); skipping it", ops[0]["op"], short(exc))
            return 1

    def _send(self, ops: list[dict[str, Any]]) -> int:
        from mlflow.entities import RunTag

        first = ops[0]
        kind = first["op"]
        if kind == "start":
            self._start(first)
            return 1
        if self.run_id is None:
            raise Offline("no run yet")
        match kind:
            case "metrics":
                return self._log_metrics(ops)
            case "params":
                self._log_params(first["params"])
            case "tags":
                log_batch(self.client, self.run_id, tags=[RunTag(k, v) for k, v in first["tags"].items()])
            case "artifact":
                self._log_artifact(Path(first["path"]), first.get("artifact_path"))
            case "table":
                self._log_table(first)
            case "dataset":
                log_dataset(self.client, self.run_id, first)
            case "end":
                self.client.set_terminated(self.run_id, first["status"], first["time_ms"])
            case _:
                log.warning("tracking: unknown journal op %r; skipping it", kind)
        return 1

    def _start(self, op: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:
            # a resumed session (or a replay of a start whose run exists): reopen the run
            try:
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
                write_run_file(self.output_dir, self.run_id, self.experiment_id, self.tracking_uri)
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "tracking: run %s not found at %s; starting a new run", self.run_id, redact_text(self.tracking_uri)
                )
                self.run_id = None
        self.experiment_id = get_or_create_experiment(self.client, op["experiment"], op.get("artifact_location"))
        run = self.client.create_run(self.experiment_id, start_time=op["time_ms"], run_name=op["run_name"])
        self.run_id = run.info.run_id
        write_run_file(self.output_dir, self.run_id, self.experiment_id, self.tracking_uri)

    def _log_metrics(self, ops: list[dict[str, Any]]) -> int:
        """Send the leading metrics ops, up to 1000 values (one request); return how many ops were sent."""
        from mlflow.entities import Metric

        assert self.run_id is not None
        metrics: list[Metric] = []
        taken = 0
        for op in ops:
            if op["op"] != "metrics" or len(metrics) + len(op["metrics"]) > _BATCH["metrics"]:
                break
            metrics += [Metric(k, v, op["time_ms"], op["step"]) for k, v in op["metrics"].items()]
            taken += 1
        if taken == 0:  # one op with more than 1000 keys
            first = ops[0]
            metrics = [Metric(k, v, first["time_ms"], first["step"]) for k, v in first["metrics"].items()]
            taken = 1
        log_batch(self.client, self.run_id, metrics=metrics)
        return taken

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        assert self.run_id is not None
        items = [Param(k, v) for k, v in params.items()]
        try:
            log_batch(self.client, self.run_id, params=items)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            # A resumed session whose config differs (e.g. train.stop_at_step): MLflow params are write-once,
            # so new keys become params and changed values become tags "changed_on_resume.<key>".
            existing = self.client.get_run(self.run_id).data.params
            new = [p for p in items if p.key not in existing]
            changed = [
                RunTag(f"changed_on_resume.{p.key}", p.value) for p in items if existing.get(p.key, p.value) != p.value
            ]
            log_batch(self.client, self.run_id, params=new, tags=changed)

    def _log_artifact(self, path: Path, artifact_path: str | None) -> None:
        assert self.run_id is not None
        if not path.exists():
            log.warning("tracking: artifact %s no longer exists; skipping it", path)
        elif path.is_dir():
            target = "/".join(p for p in (artifact_path, path.name) if p)
            self.client.log_artifacts(self.run_id, str(path), target)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def _log_table(self, op: dict[str, Any]) -> None:
        """Upload a table in the JSON layout MLflow's UI reads (like MlflowClient.log_table, but idempotent)."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        assert self.run_id is not None
        artifact_file = op["artifact_file"]
        directory, _, _ = artifact_file.rpartition("/")
        self.client.log_artifact(self.run_id, op["file"], directory or None)
        logged = json.loads(self.client.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
