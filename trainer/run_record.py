"""What a training run records in MLflow, built from the trainer's config and data: params, tags, the
lineage to its prepare run, the dataset input and the config files; and ``open_tracker``, which hands them
to ``tracking`` (rank 0 with ``tracking.enabled``; a no-op tracker elsewhere, mlflow never imported).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from data_pipeline.schema import Manifest, rejects_summary
from tracking.naming import flatten_dict, redact
from tracking.records import PREPARE_RUN_FILE, dumps, git_commit, package_versions
from tracking.tracker import RunRecord, Tracker, TrackerSettings
from tracking.tracker import open_tracker as start_tracker
from trainer.config import RunConfig, dump_yaml, flatten

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent


def model_family(cfg: RunConfig) -> str:
    """cfg.model.family, or config.json's model_type when it is "auto"."""
    if cfg.model.family != "auto":
        return cfg.model.family
    try:
        return str(json.loads((Path(cfg.model.path) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def run_name(cfg: RunConfig) -> str:
    """``tracking.run_name``, else what the run is: ``<model>-<method>-<data>`` (folder names)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{Path(cfg.model.path).name}-{cfg.model.method}-{Path(cfg.data.path).name}"


def run_params(cfg: RunConfig, ds_config: dict[str, Any], world_size: int, device: str) -> dict[str, Any]:
    """Every param of a training run, before cleaning: resolved config, DeepSpeed config, cluster, versions."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or max(1, world_size // local_world)
    params: dict[str, Any] = dict(flatten(cfg))
    params.update(flatten_dict(ds_config, "ds"))
    params.update({"world_size": world_size, "nodes": int(nodes), "gpu_type": device})
    params.update(package_versions())
    params["git_commit"] = git_commit(_REPO) or "unknown"
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
    commit = git_commit(_REPO)
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


def dataset_input(manifest: Manifest, data_dir: str | Path) -> dict[str, Any]:
    """The training data as a dataset input: fingerprint, sources, counts, splits (tracking.sender.log_dataset)."""
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
        "path": str(Path(data_dir).resolve()),
        "name": Path(data_dir).resolve().name,
        # mlflow stores at most 36 characters of digest; the full fingerprint is in the profile and a tag
        "digest": manifest.fingerprint[:32],
        "profile": profile,
        "context": "train",
        "columns": ["input_ids", "labels", "position_ids"],
    }


def open_tracker(
    *,
    cfg: RunConfig,
    ds_config: dict[str, Any],
    output_dir: str | Path,
    rank: int,
    world_size: int,
    device: str,
    manifest: Manifest | None = None,
    data_dir: str | Path | None = None,
    resume_run_id: str | None = None,
    files: dict[str, str | Path] | None = None,
) -> Tracker:
    """Start tracking this run (rank 0 with tracking.enabled) or return a no-op tracker.

    - ``ds_config``: the merged DeepSpeed config as given to deepspeed.initialize (ds.* params and
      ``config/deepspeed_config.json``).
    - ``device``: the accelerator's name ("NVIDIA H100 80GB HBM3", or "cpu"), logged as ``gpu_type``.
    - ``manifest``/``data_dir``: the prepared data (dataset input, manifest and rejects summary artifacts, and
      the link to the prepare run).
    - ``resume_run_id``: the run id stored in the checkpoint being resumed; used when OUT/mlflow_run.json is
      missing (e.g. a copied checkpoint).
    - ``files``: extra files to upload at start, {artifact_path: file}.
    """
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker()
    texts = {
        "config/config.yaml": dump_yaml(cfg),
        "config/deepspeed_config.json": dumps(redact(ds_config)),
    }
    dataset = None
    if manifest is not None and data_dir is not None:
        dataset = dataset_input(manifest, data_dir)
        texts["data/manifest.json"] = manifest.to_json()
        texts["data/rejects_summary.json"] = dumps(rejects_summary(Path(data_dir), manifest))
    record = RunRecord(
        experiment=cfg.tracking.experiment,
        run_name=run_name(cfg),
        params=run_params(cfg, ds_config, world_size, device),
        tags={**run_tags(cfg), **lineage_tags(data_dir, manifest)},
        texts=texts,
        files=dict(files or {}),
        dataset=dataset,
    )
    settings = TrackerSettings(
        uri=cfg.tracking.uri,
        close_timeout_s=cfg.tracking.close_timeout_s,
        system_metrics=cfg.tracking.system_metrics,
        upload_weights=cfg.tracking.upload_weights,
    )
    return start_tracker(output_dir, record, settings, resume_run_id)
