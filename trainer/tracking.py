"""MLflow tracking of a training run: rank 0 only, never blocking the step, surviving server outages and resumes.

How it works:

- ``open_tracker`` (rank 0, ``tracking.enabled``) starts one background thread and returns a ``Tracker``.
  The training thread only puts small dicts on a queue (``log_metrics`` costs microseconds); every other
  rank, and every rank when tracking is off, gets a no-op ``Tracker`` and mlflow is never imported.
- The thread appends every operation to a journal, ``OUT/mlflow_spool/ops.jsonl`` (append-only, one JSON
  object per line with a sequence number), then sends what is not yet sent with ``MlflowClient.log_batch``
  (and ``log_artifact``/``log_inputs``) and records the last sent sequence number in
  ``OUT/mlflow_spool/sent.json``. Artifacts are copied into the spool first, so a replay uploads the bytes
  of the moment they were logged.
- Server unreachable (at start or mid-run): the thread says so once, keeps journaling, and retries with
  exponential backoff (1 s to 30 s). When the server answers again everything pending is replayed in
  order. ``close`` waits at most ``tracking.close_timeout_s``; what is still pending then stays in the spool
  and ``python -m trainer.tracking sync OUT`` sends it later. Replays are idempotent: a metric carries the
  timestamp of the moment it was logged, so a metric sent twice is the same row to MLflow.
- If the run could not be created at start, the replay creates it and writes its id to
  ``OUT/mlflow_run.json``. A resumed or requeued job reads that file (or the id the loop stored in its
  checkpoint, ``resume_run_id``) and continues the same run; metric steps already in the journal from an
  earlier session are not logged again.
- With no ``tracking.uri`` and no ``$MLFLOW_TRACKING_URI`` the store is embedded: sqlite at
  ``<output_dir's parent>/mlruns/mlflow.db`` with artifacts in ``<...>/mlruns/artifacts``; ``make dashboard``
  (``python -m trainer.tracking dashboard``) serves it.
- Params and tags whose names look like secrets (token, key, password, secret, credential, auth) are logged
  as ``***``; user:password in URLs is removed.

Command line: ``python -m trainer.tracking sync OUT [--uri URI]`` and
``python -m trainer.tracking dashboard [--store DIR] [--host 127.0.0.1] [--port 5000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import write_json_atomic

if TYPE_CHECKING:
    from data_pipeline.schema import Manifest
    from trainer.config import RunConfig

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
"""In the output directory: {"run_id", "experiment_id", "tracking_uri"} of the run this directory logs to."""
SPOOL_DIR = "mlflow_spool"
"""In the output directory: the journal of every tracking operation and copies of logged artifacts."""
JOURNAL_FILE = "ops.jsonl"
CURSOR_FILE = "sent.json"
LOCK_FILE = "lock"
PREPARE_RUN_FILE = "mlflow_prepare_run.json"
"""In a prepared data directory (written by data_pipeline.tracking): the MLflow run of that prepare."""
STORE_DIR = "mlruns"
"""The embedded store's directory name, next to the output directory."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)."""
MAX_TAG_CHARS = 8000
REDACTED = "***"
VERSIONED_PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "mlflow", "datasets")
_SECRET_WORDS = frozenset(
    {"token", "key", "apikey", "password", "passwd", "pwd", "secret", "credential", "credentials", "auth"}
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")
"""Characters MLflow refuses in metric names (mlflow.utils.validation); replaced by "_"."""
_START_TIMEOUT_S = 30.0
"""How long open_tracker waits for the run to be created before training starts anyway (spooling)."""
_MAX_BACKOFF_S = 30.0
_COPY_LIMIT_BYTES = 1 << 30
"""Artifacts up to 1 GiB are copied into the spool; bigger ones are uploaded from where they are."""
_SNAPSHOT_LIMIT_BYTES = 1 << 20
"""Files up to 1 MiB given to log_artifact are copied on the calling thread: the upload has that call's bytes."""
_SYSTEM_METRICS_INTERVAL_S = 10.0
# mlflow's REST client retries 7 times with backoff by default (minutes against a dead server); our thread
# retries itself, so each request is tried once and waits at most this long.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_TRANSIENT_CODES = frozenset({"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "ABORTED"})


# ----------------------------------------------------------------------------- what is logged (pure functions)


def is_secret_name(name: str) -> bool:
    """True when a param/tag/env name looks like it holds a credential (hf_token, API_KEY, db.password, ...).

    Names are split into words (on non-letters and camelCase), so ``tokenizer_path`` or ``max_new_tokens``
    are not secrets but ``hf_token``, ``apiKey`` and ``MLFLOW_TRACKING_PASSWORD`` are.
    """
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words) if word)


def clean_value(name: str, value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """The string MLflow gets for one param or tag: redacted if secret, URL passwords removed, truncated."""
    if is_secret_name(name) and value not in (None, ""):
        return REDACTED
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    if len(text) > limit:
        marker = "...[truncated]"
        text = text[: limit - len(marker)] + marker
    return text


def clean_params(params: dict[str, Any], limit: int = MAX_PARAM_CHARS) -> dict[str, str]:
    return {key: clean_value(key, value, limit) for key, value in params.items()}


def redact(tree: Any, name: str = "") -> Any:
    """A copy of a JSON-like tree for an MLflow artifact: values under secret-looking keys become ``***`` and
    user:password is removed from URLs in every string (the rule of ``clean_value``, without truncation)."""
    if name and is_secret_name(name) and tree not in (None, ""):
        return REDACTED
    if isinstance(tree, dict):
        return {key: redact(value, str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(value) for value in tree]
    if isinstance(tree, str):
        return _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", tree)
    return tree


def flatten_dict(body: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in body.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_dict(value, name))
        else:
            flat[name] = value
    return flat


def embedded_store(output_dir: str | Path) -> Path:
    """The embedded store directory used when no tracking URI is configured: ``<output_dir>/../mlruns``."""
    return Path(output_dir).resolve().parent / STORE_DIR


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the server's default)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = embedded_store(output_dir)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def git_commit(repo_dir: Path) -> str | None:
    """HEAD of the code being run (with "-dirty" when the work tree has changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "not installed"
    return versions


def device_name() -> str:
    """GPU model of this rank (e.g. "NVIDIA H100 80GB HBM3"), or "cpu"."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return "cpu"


def model_family(cfg: RunConfig) -> str:
    """cfg.model.family, or config.json's model_type when it is "auto"."""
    if cfg.model.family != "auto":
        return cfg.model.family
    try:
        return str(json.loads((Path(cfg.model.path) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def run_params(cfg: RunConfig, ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Every param of a training run, before cleaning: resolved config, DeepSpeed config, cluster, versions."""
    from trainer.config import flatten

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or max(1, world_size // local_world)
    params: dict[str, Any] = dict(flatten(cfg))
    params.update(flatten_dict(ds_config, "ds"))
    params.update({"world_size": world_size, "nodes": int(nodes), "gpu_type": device_name()})
    params.update(package_versions())
    params["git_commit"] = git_commit(Path(__file__).resolve().parent) or "unknown"
    return params


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """Tags of a training run: where it ran (SLURM ids, host) and what it is (method, model family)."""
    env = os.environ
    tags = {
        "host": socket.gethostname(),
        "method": cfg.model.method,
        "model_family": model_family(cfg),
        "slurm.job_id": env.get("SLURM_JOB_ID", ""),
        "slurm.array_job_id": env.get("SLURM_ARRAY_JOB_ID", ""),
        "slurm.array_task_id": env.get("SLURM_ARRAY_TASK_ID", ""),
        "slurm.restart_count": env.get("SLURM_RESTART_COUNT", "0" if "SLURM_JOB_ID" in env else ""),
    }
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return {key: value for key, value in tags.items() if value != ""}


def lineage_tags(data_dir: str | Path | None, manifest: Manifest | None) -> dict[str, str]:
    """Tags linking a training run to its data: the manifest fingerprint and the prepare run that wrote it."""
    tags: dict[str, str] = {}
    if data_dir is not None:
        tags["data.path"] = str(Path(data_dir).resolve())
        prepare_file = Path(data_dir) / PREPARE_RUN_FILE
        if prepare_file.is_file():
            try:
                prepare = json.loads(prepare_file.read_text())
                tags["data.prepare_run_id"] = str(prepare["run_id"])
                tags["data.prepare_tracking_uri"] = str(prepare["tracking_uri"])
                tags["data.prepare_experiment_id"] = str(prepare["experiment_id"])
            except (OSError, ValueError, KeyError) as exc:
                log.warning("tracking: %s unreadable (%s); the run is not linked to its prepare run", prepare_file, exc)
    if manifest is not None:
        tags["data.fingerprint"] = manifest.fingerprint
    return tags


def dataset_op(manifest: Manifest, data_dir: str | Path) -> dict[str, Any]:
    """A journal op describing the training data for ``log_inputs`` (fingerprint, sources, counts)."""
    profile = {
        "fingerprint": manifest.fingerprint,
        "sources": [{"path": s.path, "sha256": s.sha256, "records": s.records} for s in manifest.sources],
        "counts": manifest.counts,
        "splits": {
            name: {"rows": s.rows, "samples": s.samples, "tokens": s.tokens} for name, s in manifest.splits.items()
        },
        "template": manifest.template,
        "max_seq_len": manifest.max_seq_len,
        "packed": manifest.packed,
    }
    return {
        "op": "dataset",
        "path": str(Path(data_dir).resolve()),
        "name": Path(data_dir).resolve().name,
        # mlflow stores at most 36 characters of digest; the full fingerprint is in the profile and a tag
        "digest": manifest.fingerprint[:32],
        "profile": profile,
        "context": "train",
    }


# ----------------------------------------------------------------------------- the journal


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
            self._handle.write(json.dumps(op, ensure_ascii=False) + "\n")
        self._handle.flush()

    def mark_sent(self, seq: int) -> None:
        write_json_atomic(self.cursor, {"seq": seq})

    def copy_in(self, path: Path, seq_hint: int) -> Path:
        """Copy a file or directory into the spool so a later replay uploads these bytes."""
        target = self.dir / "artifacts" / str(seq_hint) / path.name
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


def _path_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- sending to MLflow


class Offline(Exception):
    """The tracking server (or store) did not answer; the op stays pending."""


def _is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, OSError):  # requests' exceptions derive from OSError too
        return True
    return type(exc).__name__ in ("OperationalError", "TimeoutError")  # sqlite busy / locked


class Sender:
    """Sends journal ops to one MLflow tracking URI, creating or reopening the run on the first op."""

    def __init__(self, output_dir: Path, tracking_uri: str, resume_run_id: str | None = None) -> None:
        for key, value in _HTTP_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.output_dir = output_dir
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.refused = 0
        state = read_run_file(output_dir)
        if state and state.get("tracking_uri") == tracking_uri:
            self.run_id, self.experiment_id = state["run_id"], state["experiment_id"]
        elif resume_run_id:
            self.run_id = resume_run_id

    def send(self, ops: list[dict[str, Any]]) -> int:
        """Send a prefix of ``ops`` (one MLflow call); return how many ops it covered. Raises Offline."""
        try:
            return self._send(ops)
        except Exception as exc:
            if _is_transient(exc):
                raise Offline(_short(exc)) from exc
            self.refused += 1
            if self.refused <= 5:
                log.warning("tracking: MLflow refused a %s operation (%s); skipping it", ops[0]["op"], _short(exc))
            return 1

    def _send(self, ops: list[dict[str, Any]]) -> int:
        from mlflow.entities import Metric, RunTag

        first = ops[0]
        kind = first["op"]
        if kind == "start":
            self._start(first)
            return 1
        if self.run_id is None:
            raise Offline("no run yet")
        if kind == "metrics":
            metrics: list[Metric] = []
            taken = 0
            for op in ops:
                if op["op"] != "metrics" or len(metrics) + len(op["metrics"]) > 1000:
                    break
                metrics += [Metric(k, v, op["time_ms"], op["step"]) for k, v in op["metrics"].items()]
                taken += 1
            if taken == 0:  # one op with more than 1000 keys
                metrics = [Metric(k, v, first["time_ms"], first["step"]) for k, v in first["metrics"].items()]
                taken = 1
            for chunk in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[chunk : chunk + 1000], synchronous=True)
            return taken
        if kind == "params":
            self._log_params(first["params"])
            return 1
        if kind == "tags":
            tags = [RunTag(k, v) for k, v in first["tags"].items()]
            for chunk in range(0, len(tags), 100):
                self.client.log_batch(self.run_id, tags=tags[chunk : chunk + 100], synchronous=True)
            return 1
        if kind == "artifact":
            path = Path(first["path"])
            if not path.exists():
                log.warning("tracking: artifact %s no longer exists; skipping it", path)
            elif path.is_dir():
                target = "/".join(p for p in (first.get("artifact_path"), path.name) if p)
                self.client.log_artifacts(self.run_id, str(path), target)
            else:
                self.client.log_artifact(self.run_id, str(path), first.get("artifact_path"))
            return 1
        if kind == "table":
            self._log_table(first)
            return 1
        if kind == "dataset":
            self._log_dataset(first)
            return 1
        if kind == "end":
            self.client.set_terminated(self.run_id, first["status"], first["time_ms"])
            return 1
        log.warning("tracking: unknown journal op %r; skipping it", kind)
        return 1

    def _start(self, op: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:
            # a resumed session (or a replay of a start whose run exists): reopen the run
            try:
                self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
                self._save_state()
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("tracking: run %s not found at %s; starting a new run", self.run_id, self.tracking_uri)
                self.run_id = None

        self.experiment_id = get_or_create_experiment(self.client, op["experiment"], op.get("artifact_location"))
        run = self.client.create_run(self.experiment_id, start_time=op["time_ms"], run_name=op["run_name"])
        self.run_id = run.info.run_id
        self._save_state()

    def _save_state(self) -> None:
        write_json_atomic(
            self.output_dir / RUN_FILE,
            {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri},
        )

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        assert self.run_id is not None
        items = [Param(k, v) for k, v in params.items()]
        try:
            for chunk in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[chunk : chunk + 100], synchronous=True)
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
            for chunk in range(0, len(new), 100):
                self.client.log_batch(self.run_id, params=new[chunk : chunk + 100], synchronous=True)
            for chunk in range(0, len(changed), 100):
                self.client.log_batch(self.run_id, tags=changed[chunk : chunk + 100], synchronous=True)

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

    def _log_dataset(self, op: dict[str, Any]) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import Schema
        from mlflow.types.schema import Array, ColSpec, DataType

        assert self.run_id is not None
        columns = Schema([ColSpec(Array(DataType.integer), name) for name in ("input_ids", "labels", "position_ids")])
        with warnings.catch_warnings():  # a local path matches two equivalent registered source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(op["path"])
        meta = MetaDataset(source, name=op["name"], digest=op["digest"], schema=columns)  # type: ignore[abstract]
        entity = meta._to_mlflow_entity()
        with_profile = Dataset(
            name=entity.name,
            digest=entity.digest,
            source_type=entity.source_type,
            source=entity.source,
            schema=entity.schema,
            profile=json.dumps(op["profile"], ensure_ascii=False),
        )
        context = InputTag("mlflow.data.context", op["context"])
        self.client.log_inputs(self.run_id, [DatasetInput(with_profile, [context])])


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created (with ``artifact_location``, None: the server's default) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException as exc:  # created by another process meanwhile
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(client.get_experiment_by_name(name).experiment_id)


def read_run_file(output_dir: str | Path) -> dict[str, Any] | None:
    """OUT/mlflow_run.json as a dict, or None when the directory has no run yet."""
    path = Path(output_dir) / RUN_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("run_id") else None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


# ----------------------------------------------------------------------------- the background thread


class _Worker(threading.Thread):
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
        self.resume_run_id = resume_run_id
        self.close_timeout_s = close_timeout_s
        self.system_metrics = system_metrics
        self.queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.started = threading.Event()
        self.sender: Sender | None = None
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
        return self.sender.run_id if self.sender else None

    def run(self) -> None:
        try:
            self._load_journal()
            self.sender = Sender(self.spool.output_dir, self.tracking_uri, self.resume_run_id)
            self._flush()  # the start op (and anything an earlier session left pending)
            self.started.set()
            self._start_monitors()
            while True:
                self._take(timeout=0.2 if self.pending or self.monitors else 1.0)
                if self.closing_deadline is not None:
                    self._drain_until(self.closing_deadline)
                    return
                self._flush()
                self._sample_system_metrics()
        except Exception as exc:  # the thread must never take training down
            log.warning("tracking: background thread failed (%s); ops stay in %s", _short(exc), self.spool.dir)
        finally:
            self.started.set()
            self.spool.close()

    def _load_journal(self) -> None:
        ops = self.spool.read()
        sent = self.spool.sent_seq()
        self.pending = [op for op in ops if op["seq"] > sent]
        for op in ops:
            if op["op"] == "metrics":
                for key, value in op["metrics"].items():
                    self.prior_steps[key] = max(self.prior_steps.get(key, -1), op["step"])
                    self.history.setdefault(key, []).append((op["step"], value))
        self.system_step = self.prior_steps.get("system/cpu_utilization_percentage", -1) + 1
        # the start op of this session was queued before the thread started
        self._take(timeout=0)

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
                self._stop_monitors()
                continue
            ops += self._expand(command)
        if ops:
            self.spool.append(ops)
            self.pending += ops

    def _expand(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        """Journal ops for one command: metrics filtered against earlier sessions, artifacts copied in."""
        kind = command["op"]
        if kind == "metrics":
            step = command["step"]
            named = {_INVALID_NAME_CHARS.sub("_", k): v for k, v in command["metrics"].items()}
            fresh = {k: v for k, v in named.items() if step > self.prior_steps.get(k, -1)}
            for key, value in fresh.items():
                self.history.setdefault(key, []).append((step, value))
            return [{**command, "metrics": fresh}] if fresh else []
        if kind == "artifact":
            path = Path(command["path"])
            if not path.exists():
                log.warning("tracking: log_artifact(%s): no such file; not logged", path)
                return []
            if command.get("copy", True) and _path_size(path) <= _COPY_LIMIT_BYTES:
                path = self.spool.copy_in(path, self.spool.next_seq)
            return [{"op": "artifact", "path": str(path), "artifact_path": command.get("artifact_path")}]
        if kind == "json_artifact":
            target = self.spool.dir / "artifacts" / str(self.spool.next_seq) / command["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(command["text"], encoding="utf-8")
            return [{"op": "artifact", "path": str(target), "artifact_path": command.get("artifact_path")}]
        if kind == "table":
            rows = command["rows"]
            columns = list(dict.fromkeys(key for row in rows for key in row))
            body = {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}
            target = self.spool.dir / "artifacts" / str(self.spool.next_seq) / Path(command["artifact_file"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(body, ensure_ascii=False, default=str), encoding="utf-8")
            return [{"op": "table", "file": str(target), "artifact_file": command["artifact_file"]}]
        if kind == "rejects":
            from data_pipeline.schema import rejects_summary

            summary = rejects_summary(Path(command["data_dir"]), command["manifest"])
            return self._expand(
                {
                    "op": "json_artifact",
                    "name": "rejects_summary.json",
                    "text": json.dumps(summary, indent=2, ensure_ascii=False, default=str),
                    "artifact_path": "data",
                }
            )
        if kind == "loss_curve":
            png = self._plot_loss_curve()
            return [{"op": "artifact", "path": str(png), "artifact_path": None}] if png else []
        if kind == "final":
            return self._final_ops(Path(command["dir"]), command["upload_weights"])
        return [command]

    def _final_ops(self, final_dir: Path, upload_weights: bool) -> list[dict[str, Any]]:
        if not final_dir.exists():  # a session stopped before max_steps (stop_at_step) exports nothing
            return []
        is_adapter = (final_dir / "adapter_config.json").is_file()
        ops = [
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
        target = self.spool.dir / "artifacts" / str(self.spool.next_seq) / "loss_curve.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, bbox_inches="tight")
        plt.close(figure)
        return target

    def _flush(self) -> None:
        """Send pending ops in order until done or the server stops answering (then back off)."""
        assert self.sender is not None
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
                    self.tracking_uri,
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
                "and replayed when the server answers (or run `python -m trainer.tracking sync %s`)",
                self.tracking_uri,
                reason,
                self.spool.dir,
                self.spool.output_dir,
            )
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF_S)

    def _drain_until(self, deadline: float) -> None:
        while self.pending and time.monotonic() < deadline:
            self._flush()
            if self.pending:
                time.sleep(max(0.0, min(self.retry_at, deadline) - time.monotonic()))
        if self.pending:
            log.warning(
                "tracking: %d operations not sent to %s within %.0f s; they are kept in %s; send them with "
                "`python -m trainer.tracking sync %s`",
                len(self.pending),
                self.tracking_uri,
                self.close_timeout_s,
                self.spool.dir,
                self.spool.output_dir,
            )

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
        op = {"op": "metrics", "step": self.system_step, "time_ms": _now_ms(), "metrics": values}
        self.system_step += 1
        self.spool.append([op])
        self.pending.append(op)

    def _stop_monitors(self) -> None:
        self.monitors = []


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------- what the loop calls


class Tracker:
    """What the training loop calls. Only rank 0 gets a real tracker; other ranks get a no-op one.

    Every method only enqueues (microseconds) and never raises because of MLflow.
    """

    def __init__(self, worker: _Worker | None = None, upload_weights: bool = False) -> None:
        self._worker = worker
        self._upload_weights = upload_weights
        self._closed = False
        self._snapshots = 0

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once created (None when tracking is off or the server has not answered yet)."""
        return self._worker.run_id if self._worker else None

    @property
    def enabled(self) -> bool:
        return self._worker is not None

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
            self._worker.queue.put({"op": "metrics", "step": int(step), "time_ms": _now_ms(), "metrics": values})

    def log_params(self, params: dict[str, Any]) -> None:
        """Extra params (redacted and truncated like the rest)."""
        if self._worker is not None:
            self._worker.queue.put({"op": "params", "params": clean_params(params)})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._worker is not None:
            self._worker.queue.put({"op": "tags", "tags": clean_params(tags, MAX_TAG_CHARS)})

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

        Waits at most ``tracking.close_timeout_s`` for the server; what is not sent stays in the spool.
        """
        if self._worker is None or self._closed:
            return
        self._closed = True
        put = self._worker.queue.put
        if final_dir is not None:
            put({"op": "final", "dir": str(Path(final_dir).resolve()), "upload_weights": self._upload_weights})
        put({"op": "loss_curve"})
        put({"op": "end", "status": status, "time_ms": _now_ms()})
        put({"op": "close"})
        self._worker.join(timeout=self._worker.close_timeout_s + 30)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close("FAILED" if exc is not None else "FINISHED")


def open_tracker(
    *,
    cfg: RunConfig,
    ds_config: dict[str, Any],
    output_dir: str | Path,
    rank: int,
    world_size: int,
    manifest: Manifest | None = None,
    data_dir: str | Path | None = None,
    resume_run_id: str | None = None,
    files: dict[str, str | Path] | None = None,
) -> Tracker:
    """Start tracking this run (rank 0 with tracking.enabled) or return a no-op tracker.

    - ``ds_config``: the merged DeepSpeed config as given to deepspeed.initialize (logged as ds.* params and
      as ``deepspeed_config.json``).
    - ``manifest``/``data_dir``: the prepared data (dataset input, manifest and rejects summary artifacts, and
      the link to the prepare run).
    - ``resume_run_id``: the run id stored in the checkpoint being resumed; used when OUT/mlflow_run.json is
      missing (e.g. a copied checkpoint).
    - ``files``: extra files to upload at start, {artifact_path: file}.

    Waits up to 30 s for the run to be created (the server may be down; training then starts anyway).
    """
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker()
    import yaml

    from trainer.config import to_dict

    output_dir = Path(output_dir)
    spool = Spool(output_dir)
    if not spool.lock():
        log.warning("tracking: %s is used by another process (a sync?); this run is not tracked", spool.dir)
        return Tracker()
    tracking_uri, artifact_location = resolve_tracking_uri(cfg.tracking.uri, output_dir)
    if artifact_location is not None:
        embedded_store(output_dir).mkdir(parents=True, exist_ok=True)
    worker = _Worker(
        spool=spool,
        tracking_uri=tracking_uri,
        resume_run_id=resume_run_id,
        close_timeout_s=cfg.tracking.close_timeout_s,
        system_metrics=cfg.tracking.system_metrics,
    )
    put = worker.queue.put
    tags = {**run_tags(cfg), **lineage_tags(data_dir, manifest)}
    put(
        {
            "op": "start",
            "experiment": cfg.tracking.experiment,
            "run_name": cfg.tracking.run_name or output_dir.resolve().name,
            "artifact_location": artifact_location,
            "tracking_uri": tracking_uri,
            "time_ms": _now_ms(),
        }
    )
    put({"op": "tags", "tags": clean_params(tags, MAX_TAG_CHARS)})
    put({"op": "params", "params": clean_params(run_params(cfg, ds_config, world_size))})
    config_text = yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True)
    put({"op": "json_artifact", "name": "config.yaml", "text": config_text, "artifact_path": "config"})
    put(
        {
            "op": "json_artifact",
            "name": "deepspeed_config.json",
            "text": json.dumps(redact(ds_config), indent=2, default=str),
            "artifact_path": "config",
        }
    )
    if manifest is not None and data_dir is not None:
        put(dataset_op(manifest, data_dir))
        put({"op": "json_artifact", "name": "manifest.json", "text": manifest.to_json(), "artifact_path": "data"})
        put({"op": "rejects", "data_dir": str(data_dir), "manifest": manifest})
    for artifact_path, path in (files or {}).items():
        put({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})
    worker.start()
    worker.started.wait(_START_TIMEOUT_S)
    return Tracker(worker, upload_weights=cfg.tracking.upload_weights)


# ----------------------------------------------------------------------------- command line


def sync(output_dir: str | Path, uri: str | None = None, timeout_s: float = 300.0) -> int:
    """Send what the spool of ``output_dir`` still holds; return the number of ops left (0: all sent)."""
    output_dir = Path(output_dir)
    spool = Spool(output_dir)
    if not spool.lock():
        raise SystemExit(f"sync: {spool.dir} is in use by a running job; wait for it to end (it replays itself)")
    ops = spool.read()
    if not ops:
        print(f"sync: {spool.dir / JOURNAL_FILE} is empty or missing; nothing to send")
        return 0
    start = next((op for op in ops if op["op"] == "start"), None)
    tracking_uri = uri or (start or {}).get("tracking_uri") or resolve_tracking_uri(None, output_dir)[0]
    worker = _Worker(
        spool=spool, tracking_uri=tracking_uri, resume_run_id=None, close_timeout_s=timeout_s, system_metrics=False
    )
    worker._load_journal()
    total = len(worker.pending)
    worker.sender = Sender(output_dir, tracking_uri)
    worker._drain_until(time.monotonic() + timeout_s)
    spool.close()
    left = len(worker.pending)
    print(f"sync: {total - left} of {total} pending operations sent to {tracking_uri} (run {worker.run_id})")
    return left


def dashboard_command(store: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The ``mlflow server`` command line serving an embedded store."""
    store = store.resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        (store / "artifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        # one worker is plenty for one person's dashboard and starts in seconds (mlflow's default is 4)
        *([] if any(arg.startswith(("--workers", "-w")) for arg in extra) else ["--workers", "1"]),
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sync_cmd = commands.add_parser("sync", help="send what OUT/mlflow_spool still holds to MLflow")
    sync_cmd.add_argument("output_dir", type=Path, help="a training output directory (train.output_dir)")
    sync_cmd.add_argument("--uri", help="tracking URI (default: the one the run was started with)")
    sync_cmd.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    dash = commands.add_parser("dashboard", help="serve an embedded store with `mlflow server`")
    dash.add_argument("--store", type=Path, default=Path("demo_out") / STORE_DIR, help="the mlruns directory")
    dash.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    dash.add_argument("--port", type=int, default=5000)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.command == "sync":
        if extra:
            parser.error(f"unknown arguments {extra}")
        if not (args.output_dir / SPOOL_DIR).is_dir():
            print(f"sync: {args.output_dir / SPOOL_DIR} not found; pass a training output directory", file=sys.stderr)
            return 2
        return 0 if sync(args.output_dir, args.uri, args.timeout) == 0 else 1
    if not (args.store / "mlflow.db").is_file():
        print(
            f"dashboard: no store at {args.store / 'mlflow.db'}; pass --store <output_dir's parent>/{STORE_DIR} "
            "(make dashboard STORE=...)",
            file=sys.stderr,
        )
        return 2
    command = dashboard_command(args.store, args.host, args.port, extra)
    print(f"MLflow dashboard: http://{args.host}:{args.port}  (store {args.store.resolve()}; Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.call(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
