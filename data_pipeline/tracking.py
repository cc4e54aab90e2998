"""Record a finished ``prepare`` (or ``merge``) as an MLflow run, so training runs can link to their data.

    log_prepare_run(manifest, out_dir, options) -> run id, or None when tracking is off or MLflow is unreachable

The run holds the prepare options (params), the counts, throughput and packing efficiency (metrics), the
manifest and a rejects summary (artifacts), and the output as a dataset input (digest = fingerprint). Its id
is written to ``OUT/mlflow_prepare_run.json``; the trainer reads that file and tags its run with
``data.prepare_run_id`` (the lineage link).

- Store: ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store ``<OUT's parent>/mlruns`` (the same place
  a training run next to it uses, so `make dashboard` shows both).
- Off with ``--no-track`` on the command line or ``SFT_TRACKING=0`` in the environment; mlflow is then not
  imported.
- Never fails the prepare: if the server does not answer, one warning line says so and how to log later:
  ``python -m data_pipeline.tracking OUT``.

This module mirrors a few helpers of trainer/tracking.py (secret redaction, the embedded store path) because
imports run launcher -> trainer -> data_pipeline, never upward.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from data_pipeline.schema import MANIFEST_FILE, Manifest, load_manifest, rejects_summary

PREPARE_RUN_FILE = "mlflow_prepare_run.json"
"""In the prepared directory: {"run_id", "experiment_id", "tracking_uri", "fingerprint"}."""
STORE_DIR = "mlruns"
EXPERIMENT = "sft-data"
REDACTED = "***"
MAX_PARAM_CHARS = 6000
_SECRET_WORDS = frozenset(
    {"token", "key", "apikey", "password", "passwd", "pwd", "secret", "credential", "credentials", "auth"}
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def is_enabled(flag: bool | None = None) -> bool:
    """--track/--no-track when given, else $SFT_TRACKING (0/false/no/off: off), else on."""
    if flag is not None:
        return flag
    return os.environ.get("SFT_TRACKING", "1").strip().lower() not in ("0", "false", "no", "off")


def is_secret_name(name: str) -> bool:
    """Same rule as trainer.tracking.is_secret_name: a word of the name is token/key/password/secret/..."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words) if word)


def _clean(name: str, value: Any) -> str:
    if is_secret_name(name) and value not in (None, ""):
        return REDACTED
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 14] + "...[truncated]"


def _flatten(body: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in body.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def tracking_uri_for(out_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment; None: the server's default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = Path(out_dir).resolve().parent / STORE_DIR
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


def prepare_metrics(manifest: Manifest) -> dict[str, float]:
    """Counts, per-reason rejects, per-split sizes, packing efficiency and timings (throughput) as metrics."""
    metrics: dict[str, float] = {}
    for key, value in manifest.counts.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    for reason, count in manifest.counts.get("rejected_by_reason", {}).items():
        metrics["rejected." + _INVALID_NAME_CHARS.sub("_", str(reason))] = float(count)
    for name, split in manifest.splits.items():
        for field in ("rows", "samples", "tokens", "loss_tokens"):
            metrics[f"{name}.{field}"] = float(getattr(split, field))
    metrics["packing_efficiency"] = float(manifest.packing_efficiency)
    for key, value in manifest.timings.items():
        metrics[f"timing.{key}"] = float(value)
    return metrics


def log_prepare_run(
    manifest: Manifest,
    out_dir: str | Path,
    options: Any = None,
    *,
    experiment: str = EXPERIMENT,
) -> str | None:
    """Log one finished prepare as an MLflow run; return its id (None if tracking is off or unreachable).

    ``options``: the PrepareOptions (dataclass) or a dict; None logs ``manifest.options``. Logging the same
    output (same fingerprint, same store) again returns the existing run instead of a duplicate.
    """
    out_dir = Path(out_dir)
    uri, artifact_location = tracking_uri_for(out_dir)
    previous = _read_prepare_file(out_dir)
    if previous and previous.get("tracking_uri") == uri and previous.get("fingerprint") == manifest.fingerprint:
        return str(previous["run_id"])
    try:
        return _log(manifest, out_dir, options, uri, artifact_location, experiment)
    except Exception as exc:  # tracking must never fail a prepare that succeeded
        reason = " ".join(str(exc).split())[:200]
        print(
            f"prepare: not tracked in MLflow at {uri} ({type(exc).__name__}: {reason}); "
            f"log it later with `python -m data_pipeline.tracking {out_dir}`",
            file=sys.stderr,
        )
        return None


def _read_prepare_file(out_dir: Path) -> dict[str, Any] | None:
    try:
        body = json.loads((out_dir / PREPARE_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("run_id") else None


def _log(
    manifest: Manifest, out_dir: Path, options: Any, uri: str, artifact_location: str | None, experiment: str
) -> str:
    for key, value in _HTTP_ENV.items():
        os.environ.setdefault(key, value)
    import tempfile

    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        raw_options = dataclasses.asdict(options)
    else:
        raw_options = dict(options) if options is not None else dict(manifest.options)
    params = {
        **_flatten(raw_options, "option"),
        "tokenizer_path": manifest.tokenizer_path,
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
        "template": manifest.template,
        "max_seq_len": manifest.max_seq_len,
        "packed": manifest.packed,
        "schema_version": manifest.schema_version,
        "sources": [s.path for s in manifest.sources],
    }
    tags = {
        "kind": "prepare",
        "host": socket.gethostname(),
        "data.path": str(out_dir.resolve()),
        "data.fingerprint": manifest.fingerprint,
        **{f"slurm.{k.lower()}": v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID")},
    }
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            raced = client.get_experiment_by_name(experiment)
            assert raced is not None
            experiment_id = raced.experiment_id
    run = client.create_run(experiment_id, run_name=f"prepare:{out_dir.resolve().name}")
    run_id = run.info.run_id
    param_items = [Param(k, _clean(k, v)) for k, v in params.items()]
    for start in range(0, len(param_items), 100):
        client.log_batch(run_id, params=param_items[start : start + 100])
    client.log_batch(run_id, tags=[RunTag(k, _clean(k, v)) for k, v in tags.items()])
    metrics = [Metric(k, v, run.info.start_time, 0) for k, v in prepare_metrics(manifest).items()]
    client.log_batch(run_id, metrics=metrics)
    with warnings.catch_warnings():  # a local path matches two equivalent registered source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(out_dir.resolve()))
    entity = MetaDataset(source, name=out_dir.resolve().name, digest=manifest.fingerprint[:32])._to_mlflow_entity()  # type: ignore[abstract]
    profile = {"fingerprint": manifest.fingerprint, "counts": manifest.counts}
    dataset = Dataset(entity.name, entity.digest, entity.source_type, entity.source, None, json.dumps(profile))
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "prepare_output")])])
    client.log_artifact(run_id, str(out_dir / MANIFEST_FILE), "data")
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "rejects_summary.json"
        summary.write_text(json.dumps(rejects_summary(out_dir, manifest), indent=2, ensure_ascii=False, default=str))
        client.log_artifact(run_id, str(summary), "data")
    client.set_terminated(run_id, "FINISHED")
    body = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri, "fingerprint": manifest.fingerprint}
    tmp_file = out_dir / (PREPARE_RUN_FILE + ".tmp")
    tmp_file.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp_file, out_dir / PREPARE_RUN_FILE)
    return run_id


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.tracking OUT``: log (or re-log after an outage) a prepared directory."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m data_pipeline.tracking OUT   (a directory written by prepare)", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    run_id = log_prepare_run(load_manifest(out_dir), out_dir)
    if run_id is None:
        return 1
    print(f"prepare run {run_id} -> {out_dir / PREPARE_RUN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
