"""The layout of a run's output folder (``train.output_dir``): one frozen dataclass naming every path in it.

    OUT/
        run_config.yaml         the resolved run config (trainer.config.dump_yaml), written by rank 0 at start
        ds_config.json          the merged DeepSpeed config
        metrics.jsonl           one JSON object per logged step and per evaluation (trainer.metrics)
        checkpoints/            DeepSpeed tag directories step_XXXXXXXX/ (trainer.checkpoint describes one)
            latest_complete     the tag of the newest complete checkpoint
            universal/          checkpoints converted for a resume on another world size
        final/                  the export at the end of the run (trainer.export): model or adapter, tokenizer
            sft_export.json     how to load the export and render its prompts (template, method, base model)
        random_init_base/       the seeded random base of a model.random_init LoRA run
        mlflow_run.json         the tracking run this folder logs into (written by the tracking sender)
        mlflow_spool/           tracking operations not yet sent (the tracking journal)

Every module that reads or writes one of these asks ``RunDir`` for the path instead of spelling the name.
The tracking code sits below the trainer and does not import it; its two names are imported from it here,
so each name still has one home.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tracking.journal import RUN_FILE, SPOOL_DIR

RUN_CONFIG_FILE = "run_config.yaml"
"""The resolved run config; also inside every checkpoint tag directory."""
DS_CONFIG_FILE = "ds_config.json"
"""The merged DeepSpeed config; also inside every checkpoint tag directory."""
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest_complete"
"""Under checkpoints/: DeepSpeed's own ``latest`` is never written (it can name an incomplete checkpoint)."""
UNIVERSAL_DIR = "universal"
FINAL_DIR = "final"
EXPORT_INFO_FILE = "sft_export.json"
"""Inside an export (final/, or any directory trainer.export writes): template, method, base_model_path, ...; how
generation loads the export and renders its prompts."""
METRICS_FILE = "metrics.jsonl"
RANDOM_BASE_DIR = "random_init_base"
"""The randomly initialized base written once for random_init LoRA/QLoRA runs, so the adapter has a base on disk
to load onto (export, PeftModel.from_pretrained, --merge)."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one run's output folder; nothing is created or read by building one."""

    root: Path
    """``train.output_dir``."""

    @classmethod
    def of(cls, output_dir: str | Path) -> RunDir:
        return cls(Path(output_dir))

    @classmethod
    def of_export(cls, export_dir: str | Path) -> RunDir:
        """The run folder that holds an export written at the end of training (OUT/final -> OUT)."""
        return cls(Path(export_dir).resolve().parent)

    @property
    def run_config(self) -> Path:
        return self.root / RUN_CONFIG_FILE

    @property
    def ds_config(self) -> Path:
        return self.root / DS_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def latest(self) -> Path:
        """The pointer file naming the newest complete checkpoint tag."""
        return self.checkpoints / LATEST_FILE

    @property
    def universal(self) -> Path:
        return self.checkpoints / UNIVERSAL_DIR

    def checkpoint(self, tag: str) -> Path:
        """One checkpoint tag directory (``step_00000010``)."""
        return self.checkpoints / tag

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    @property
    def random_base(self) -> Path:
        return self.root / RANDOM_BASE_DIR

    @property
    def tracking_run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def tracking_spool(self) -> Path:
        return self.root / SPOOL_DIR
