"""Record a finished ``prepare`` (or ``merge``) as an MLflow run, so training runs can link to their data.

This module turns the manifest into plain values and hands them to ``tracking.records.log_prepare_run``; the
MLflow calls live there. The run holds the prepare options (params), the counts, throughput and packing
efficiency (metrics), the manifest and a rejects summary (artifacts), and the output as a dataset input
(digest = fingerprint). Its id is written to ``OUT/mlflow_prepare_run.json``; the trainer reads that file and
tags its run with ``data.prepare_run_id``.

- ``record_in_background(OUT)`` (what the CLI calls) starts ``python -m data_pipeline.tracking OUT`` as a
  detached process and returns at once: opening MLflow costs seconds (importing mlflow, and on a fresh
  embedded store creating its tables) that the user would otherwise wait for after the data is written. Its
  output goes to ``OUT/mlflow_prepare_run.log``.
- Store: ``$MLFLOW_TRACKING_URI``, else the default sqlite store ``./mlruns`` in the current directory (the
  one training and ``python -m tracking dashboard`` use). The URI is written and printed redacted.
- Off with ``--no-track`` or ``SFT_TRACKING=0``; mlflow is then not imported.
- Never fails the prepare: if the server does not answer, one line says so and how to log later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.schema import Manifest, load_manifest, rejects_summary
from sft_stack.common.atomic import write_json_atomic
from tracking.naming import flatten_dict, redact_text, resolve_tracking_uri
from tracking.records import PREPARE_RUN_FILE, PrepareRecord, dumps
from tracking.records import log_prepare_run as log_record
from tracking.sender import short

__all__ = ["PREPARE_RUN_FILE", "is_enabled", "log_prepare_run", "record_in_background"]

EXPERIMENT = "sft-data"
LOG_FILE = "mlflow_prepare_run.log"
BACKGROUND_RETRY_DELAYS_S = (5.0, 30.0, 60.0)
"""The detached record (and ``python -m data_pipeline.tracking``) tries four times over about 95 s: nobody waits
on it, and a server restarting meanwhile still gets the record."""
OPTIONS_FILE = "mlflow_prepare_options.json"
"""The options as given, for the background process: in a file, since a command line has a length limit (620
sources overran it)."""


def is_enabled(flag: bool | None = None) -> bool:
    """--track/--no-track when given, else $SFT_TRACKING (0/false/no/off: off), else on."""
    if flag is not None:
        return flag
    return os.environ.get("SFT_TRACKING", "1").strip().lower() not in ("0", "false", "no", "off")


def prepare_metrics(manifest: Manifest) -> dict[str, float]:
    """Counts, per-reason rejects, per-split sizes, packing efficiency and timings (throughput) as metrics."""
    metrics: dict[str, float] = {}
    for key, value in manifest.counts.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    for reason, count in manifest.counts.get("rejected_by_reason", {}).items():
        metrics[f"rejected.{reason}"] = float(count)
    for name, split in manifest.splits.items():
        for field in ("rows", "samples", "tokens", "loss_tokens"):
            metrics[f"{name}.{field}"] = float(getattr(split, field))
    metrics["packing_efficiency"] = float(manifest.packing_efficiency)
    for key, value in manifest.timings.items():
        metrics[f"timing.{key}"] = float(value)
    return metrics


def prepare_record(manifest: Manifest, out_dir: Path, options: Any = None) -> PrepareRecord:
    """The prepare run's params, tags, metrics, dataset and files; ``options`` as in ``log_prepare_run``."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        raw_options = dataclasses.asdict(options)
    else:
        raw_options = dict(options) if options is not None else dict(manifest.options)
    params = {
        **flatten_dict(raw_options, "option"),
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
    dataset = {
        "path": str(out_dir.resolve()),
        "name": out_dir.resolve().name,
        "digest": manifest.fingerprint[:32],
        "profile": {"fingerprint": manifest.fingerprint, "counts": manifest.counts},
        "context": "prepare_output",
    }
    texts = {
        "data/manifest.json": manifest.to_json(),
        "data/rejects_summary.json": dumps(rejects_summary(out_dir, manifest)),
    }
    return PrepareRecord(
        out_dir=out_dir,
        fingerprint=manifest.fingerprint,
        params=params,
        tags=tags,
        metrics=prepare_metrics(manifest),
        dataset=dataset,
        texts=texts,
    )


def log_prepare_run(
    manifest: Manifest, out_dir: str | Path, options: Any = None, retry_delays_s: tuple[float, ...] = ()
) -> str | None:
    """Log one finished prepare as an MLflow run, now; return its id (None if MLflow is unreachable).

    ``options``: the PrepareOptions (dataclass) or a dict; None logs ``manifest.options``. Logging the same
    output (same fingerprint, same store) again returns the existing run instead of a duplicate.
    ``retry_delays_s``: after a failed attempt, wait this long and try again, once per entry (each request is
    tried once, so one dropped connection or slow answer would otherwise lose the record).
    """
    out_dir = Path(out_dir)
    uri = redact_text(resolve_tracking_uri(None)[0])
    previous = _read_prepare_file(out_dir)
    if previous and previous.get("tracking_uri") == uri and previous.get("fingerprint") == manifest.fingerprint:
        return str(previous["run_id"])
    for attempt, delay in enumerate((*retry_delays_s, None), start=1):
        try:
            body = log_record(prepare_record(manifest, out_dir, options), EXPERIMENT)
            break
        except Exception as exc:  # tracking must never fail a prepare that succeeded
            failure = f"{type(exc).__name__}: {short(exc)}"
            if delay is None:
                print(
                    f"prepare: not tracked in MLflow at {uri} ({failure}); "
                    f"log it later with `python -m data_pipeline.tracking {out_dir}`",
                    file=sys.stderr,
                )
                return None
            print(f"prepare: attempt {attempt} to record in MLflow failed ({failure}); retrying", file=sys.stderr)
            time.sleep(delay)
    write_json_atomic(out_dir / PREPARE_RUN_FILE, body)
    return body["run_id"]


def record_in_background(out_dir: str | Path, options: Any = None) -> None:
    """Record ``out_dir``'s prepare from a detached process (``python -m data_pipeline.tracking OUT``);
    ``options`` (the PrepareOptions) travel in ``OUT/mlflow_prepare_options.json``: nothing on its command line grows
    with the number of sources."""
    out_dir = Path(out_dir)
    extra: list[str] = []
    if options is not None:
        write_json_atomic(out_dir / OPTIONS_FILE, dataclasses.asdict(options))
        extra = ["--options-file", str((out_dir / OPTIONS_FILE).resolve())]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with open(out_dir / LOG_FILE, "ab") as log_file:
        subprocess.Popen(
            [sys.executable, "-m", "data_pipeline.tracking", str(out_dir.resolve()), *extra],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,  # survives the prepare's terminal and its Ctrl-C
        )
    print(f"prepare: recording the run in MLflow in the background (log: {out_dir / LOG_FILE})")


def _read_prepare_file(out_dir: Path) -> dict[str, Any] | None:
    try:
        body = json.loads((out_dir / PREPARE_RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("run_id") else None


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.tracking OUT [--options-file JSON_FILE]``: log (or re-log after an outage) a
    prepared directory; ``--options-file``: the prepare options as given (default: those the manifest keeps)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--options-file"):
        print("usage: python -m data_pipeline.tracking OUT   (a directory written by prepare)", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    options = json.loads(Path(args[2]).read_text(encoding="utf-8")) if len(args) == 3 else None
    run_id = log_prepare_run(load_manifest(out_dir), out_dir, options, retry_delays_s=BACKGROUND_RETRY_DELAYS_S)
    if run_id is None:
        return 1
    print(f"prepare run {run_id} -> {out_dir / PREPARE_RUN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
