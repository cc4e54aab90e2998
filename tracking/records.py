"""One-shot MLflow records: a finished ``prepare``, an evaluation; and the environment facts a run records.

Both records are a handful of synchronous ``MlflowClient`` calls that end with the run: nothing is left to
send later, so they need neither the journal nor a thread. Callers pass plain values and decide what a
failure means (``prepare`` must never fail because of tracking; ``evaluate`` reports it).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracking.naming import (
    MAX_TAG_CHARS,
    clean_params,
    get_or_create_experiment,
    metric_name,
    open_client,
    redact,
    redact_text,
    resolve_tracking_uri,
)
from tracking.sender import log_batch, log_dataset

PREPARE_RUN_FILE = "mlflow_prepare_run.json"
"""In a prepared data directory: {"run_id", "experiment_id", "tracking_uri", "fingerprint"} of its prepare run;
a training run on that directory reads it to tag its run with ``data.prepare_run_id`` (the lineage link)."""
VERSIONED_PACKAGES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "mlflow", "datasets")


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
    """{"version.torch": "2.13.0", ...} for the packages a training run depends on."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "not installed"
    return versions


@dataclass(frozen=True, kw_only=True)
class PrepareRecord:
    """A finished prepare as plain values (data_pipeline builds it from its manifest)."""

    out_dir: Path
    fingerprint: str
    params: dict[str, Any]
    tags: dict[str, Any]
    metrics: dict[str, float]
    dataset: dict[str, Any]
    """See tracking.sender.log_dataset."""
    texts: dict[str, str] = field(default_factory=dict)
    """{artifact path: text}, e.g. the manifest and the rejects summary."""


def log_prepare_run(record: PrepareRecord, experiment: str) -> dict[str, str]:
    """Log a finished prepare as one MLflow run; return {"run_id", "experiment_id", "tracking_uri" (redacted),
    "fingerprint"}.

    The store: ``$MLFLOW_TRACKING_URI``, else the default store ``./mlruns`` (where a training run started in
    the same directory logs, so one dashboard shows both). Raises whatever MLflow raises.
    """
    from mlflow.entities import Metric, Param, RunTag

    uri, artifact_location = resolve_tracking_uri(None)
    client = open_client(uri)
    experiment_id = get_or_create_experiment(client, experiment, artifact_location)
    run = client.create_run(experiment_id, run_name=f"prepare:{record.out_dir.resolve().name}")
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in clean_params(record.params).items()]
    tags = [RunTag(k, v) for k, v in clean_params(record.tags, MAX_TAG_CHARS).items()]
    metrics = [Metric(metric_name(k), v, run.info.start_time, 0) for k, v in record.metrics.items()]
    try:
        log_batch(client, run_id, metrics=metrics, params=params, tags=tags)
        log_dataset(client, run_id, record.dataset)
        _log_texts(client, run_id, record.texts)
    except Exception:
        with contextlib.suppress(Exception):  # a half-logged run must not stay RUNNING; the caller retries
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": redact_text(uri),
        "fingerprint": record.fingerprint,
    }


def log_evaluation(
    results: dict[str, Any],
    generations: list[dict[str, Any]] | None,
    *,
    tracking_uri: str | None,
    run_id: str | None,
    experiment: str,
    prefix: str = "eval",
) -> str:
    """Log prefix/* metrics (eval/* by default), the results JSON and the generations table to MLflow under
    ``prefix/``; returns the run id.

    With ``run_id`` the metrics land in that run (e.g. the training run), else in a new run of ``experiment``.
    The store: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the default store ``./mlruns``. Distinct prefixes keep several evaluations of
    one run apart (before and after training, a subset). Secret-looking keys and URL passwords are redacted.
    """
    from mlflow.entities import Metric

    uri, artifact_location = resolve_tracking_uri(tracking_uri)
    client = open_client(uri)
    results = redact(results)
    generations = redact(generations) if generations else generations
    metrics: dict[str, float] = {}
    if "loss" in results:
        metrics |= {f"{prefix}/loss": results["loss"]["loss"], f"{prefix}/perplexity": results["loss"]["perplexity"]}
    if "generation" in results:
        gen = results["generation"]
        metrics |= {f"{prefix}/{k}": gen[k] for k in ("exact_match", "bleu", "rouge_l", "stopped_fraction") if k in gen}
    new_run = run_id is None
    if run_id is None:
        run_id = client.create_run(get_or_create_experiment(client, experiment, artifact_location)).info.run_id
    timestamp = int(time.time() * 1000)
    log_batch(client, run_id, metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()])
    client.log_dict(run_id, results, f"{prefix}/results.json")
    if generations:
        columns = list(dict.fromkeys(key for row in generations for key in row))
        table = {key: [str(row.get(key, "")) for row in generations] for key in columns}
        client.log_table(run_id, table, artifact_file=f"{prefix}/generations.json")
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def log_harness(
    results: dict[str, Any],
    samples: dict[str, list[dict[str, Any]]],
    metrics: dict[str, float],
    params: dict[str, str],
    *,
    tracking_uri: str | None,
    run_id: str | None,
    experiment: str,
    prefix: str = "harness",
    step: int = 0,
) -> str:
    """Log an lm-evaluation-harness result: ``prefix/<task>/<metric>`` metrics at ``step``, params (harness
    version, few-shot settings, task hashes), ``prefix/results.json`` and ``prefix/samples_<task>.jsonl``.

    With ``run_id`` into that run (params already set there with another value are skipped: a second
    evaluation of the same run keeps the first's params), else into a new run of ``experiment``.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    client = open_client(tracking_uri or mlflow.get_tracking_uri())
    new_run = run_id is None
    if run_id is None:
        run_id = client.create_run(get_or_create_experiment(client, experiment, None)).info.run_id
    existing = client.get_run(run_id).data.params
    timestamp = int(time.time() * 1000)
    log_batch(
        client,
        run_id,
        metrics=[Metric(metric_name(f"{prefix}/{k}"), v, timestamp, step) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in clean_params(params).items() if k not in existing],
    )
    texts = {f"{prefix}/results.json": dumps(redact(results))}
    for task, rows in samples.items():
        lines = "".join(json.dumps(redact(row), ensure_ascii=False, default=str) + "\n" for row in rows)
        texts[f"{prefix}/samples_{metric_name(task)}.jsonl"] = lines
    _log_texts(client, run_id, texts)
    if new_run:
        client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def _log_texts(client: Any, run_id: str, texts: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for artifact_file, text in texts.items():
            directory, _, name = artifact_file.rpartition("/")
            path = Path(tmp) / name
            path.write_text(redact_text(text), encoding="utf-8")
            client.log_artifact(run_id, str(path), directory or None)


def dumps(body: Any) -> str:
    """Indented JSON for an artifact (non-JSON values as strings)."""
    return json.dumps(body, indent=2, ensure_ascii=False, default=str)
