"""The run configuration: frozen, keyword-only sections under one root, loaded strictly from YAML + overrides.

A run file is flat YAML with one mapping per section (``model:``, ``train:``, ...). Overrides are dotted
``section.key=value`` strings whose value is parsed as YAML. Numbers follow YAML 1.2, so ``lr: 3e-5`` and
``train.lr=1e-5`` are numbers. Unknown sections or keys, and values of the wrong type, fail at start-up with a
message that names the key, lists the valid ones and says where the value came from (``run.yaml:17`` or
``override train.lr=abc``). The machinery (type coercion, unknown keys, overrides) is
sft_stack/common/strict_config.py, shared with prepare's options; this module holds the run's sections, their
cross-field checks, and how relative paths resolve (``PATH_KEYS``, docs/trainer.md "Paths"):

- a relative path written in the YAML file is relative to that file's folder;
- a relative path given as an override (or with no file) is relative to the current directory;
- ``deepspeed.config`` only: when no file is there, the same relative path inside the project
  (``ds_configs/zero2.json`` -> the project's shipped ds_configs/zero2.json).

Every path in the loaded config is absolute, so the resolved run_config.yaml means the same from anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sft_stack.common import strict_config
from sft_stack.common.strict_config import ConfigError as ConfigError  # re-exported: the trainer's error type
from tracking.naming import redact

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (or editable install) this trainer runs from: its ds_configs/ backs a relative deepspeed.config."""

PATH_KEYS = (
    "model.path",
    "model.trust_remote_code_paths",
    "data.path",
    "train.output_dir",
    "deepspeed.config",
    "eval.prompts_file",
    "eval.harness_include_path",
)
"""The keys whose values are file-system paths, resolved by ``resolve_path`` (tracking.uri is a URI: left as is)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str
    """Local Hugging Face model directory holding config.json and the tokenizer (weights unless random_init)."""
    random_init: bool = False
    """Build the weights from config.json with random values instead of loading them (tests, demo, benchmarks)."""
    method: Literal["full", "lora", "qlora"] = "full"
    """full: every parameter trains. lora: PEFT adapters on a frozen base. qlora: lora on a 4-bit NF4 base."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision; injected into the DeepSpeed config (bf16/fp16 sections). fp32 for exact CPU tests."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto: flash_attention_2 when installed and on GPU, else sdpa."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% more compute."""
    family: str = "auto"
    """Model family for LoRA targets and packing isolation (llama, qwen2, qwen, mistral, glm, codegen, gpt2,
    starcoder); auto reads config.json's model_type. ChatGLM2/3, Baichuan and MOSS train as glm, llama and
    codegen after ``python -m trainer.convert``."""
    trust_remote_code_paths: tuple[str, ...] = ()
    """Model directories allowed to run their own modeling code (e.g. Qwen-1). Empty: none."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str = "auto"
    """auto: the family registry's modules; all-linear: every linear layer but the head; or a comma list."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA); slower, sometimes better at low rank."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str
    """A directory written by ``python -m data_pipeline prepare`` (manifest.json, train/, val/)."""
    verify_shards: bool = True
    """Recompute shard hashes against the manifest before the first step (rank 0), refusing on mismatch."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str
    """Where checkpoints, metrics.jsonl, the resolved configs and the final export go."""
    max_steps: int
    """Optimizer steps of the whole run; the LR schedule is laid out over this many steps."""
    micro_batch_size: int = 1
    """Rows per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. global_batch_size = micro_batch_size x grad_accum_steps x world size
    (divided by train.sequence_parallel_size)."""
    lr: float = 2e-5
    """Peak learning rate, reached after warmup_steps."""
    seed: int = 42
    """Seeds model init, data order (with the epoch) and dropout."""
    save_every_steps: int = 0
    """Save a checkpoint every this many optimizer steps (0: only at the end)."""
    log_every_steps: int = 1
    """Print and append to metrics.jsonl every this many optimizer steps."""
    stop_at_step: int | None = None
    """Save and stop cleanly after this step, without changing the LR schedule (a job with a time limit)."""
    keep_last_checkpoints: int = 2
    """Complete checkpoints of this run's own line to keep (>= 1); older ones are deleted only after a newer one is
    complete, hashed and named by latest_complete. A damaged or skipped tag never counts, and the tag just written
    and the one latest_complete names are never deleted. 1 is allowed (unlike torchtitan's keep_latest_k, whose
    purge may run while an async save is unfinished): there is always one complete checkpoint, but none to fall
    back to if it is damaged later, and a save still needs room for two (docs/RELIABILITY.md, Retention)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to lr x min_lr_ratio at max_steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay; never applied to norms and biases."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0: off); injected into the DeepSpeed config."""
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """What to do when the loss is NaN/Inf: skip that optimizer step, or save nothing and stop with an error."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest complete checkpoint in output_dir if there is one."""
    export: bool = True
    """Write OUT/final (HF model or PEFT adapter + tokenizer) at the end of the run."""
    loss_tile_tokens: int = 0
    """Tokens per tile of the tiled loss (trainer/tiled_loss.py): the output head and the fp32 cross-entropy run
    on this many positions at a time, recomputed in backward, so the loss never holds full logits (peak:
    tile x vocab instead of micro_batch_size x seq x vocab). 0: the plain loss over the model's full logits.
    Same loss up to fp32 summation order; costs one extra head matmul per token. Use it for long sequences."""
    sequence_parallel_size: int = 1
    """Ranks that share one row, each holding 1/size of its tokens (DeepSpeed's Ulysses sequence parallelism,
    trainer/sequence_parallel.py): attention swaps sequence shards for head shards with two all-to-alls per
    layer. Must divide the world size and the model's attention and KV head counts; the data-parallel degree
    becomes world size / size, so global_batch_size = micro_batch_size x grad_accum_steps x world size / size.
    1: off. For rows too long for one GPU's activations; families llama, qwen2, mistral, glm."""
    collective_timeout_s: float = 1800.0
    """Seconds a rank waits in one collective (all-reduce, barrier) before the job fails with an error naming
    the step and the rank(s) that stopped reporting progress, instead of hanging until the wall-clock limit.
    Must exceed the slowest legitimate wait: a checkpoint save or export on another rank, ds_to_universal."""


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"
    """Path to a ds_configs JSON with DeepSpeed-only settings; batch sizes, clipping and precision are injected.
    A relative path not found where it resolves falls back to the project's own (ds_configs/zero2.json)."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Compute val loss (token-weighted, all ranks) every this many optimizer steps; 0: only at the end."""
    max_batches: int = 0
    """Cap on val micro-batches per evaluation per rank (0: the whole val split)."""
    prompts_file: str | None = None
    """JSON lines or CSV of prompts to generate for at each evaluation (fixed seed); None: no generation."""
    max_new_tokens: int = 64
    """Tokens generated per prompt during evaluation."""
    harness_tasks: tuple[str, ...] = ()
    """lm-evaluation-harness tasks (``[ceval-valid, gsm8k]``) run on rank 0 after each checkpoint is written,
    logged as harness/<task>/<metric> at that step (trainer/harness.py); (): none. Data must be on disk.
    ZeRO-0/1/2 only: rank 0 needs the whole model."""
    harness_limit: int | None = None
    """Documents per task for ``harness_tasks`` (None: all; a few hundred keeps a save short)."""
    harness_include_path: str | None = None
    """A folder of your own task YAMLs for ``harness_tasks``."""


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Track the run in MLflow. false: mlflow is not even imported."""
    uri: str | None = None
    """Tracking URI; None: $MLFLOW_TRACKING_URI, else the default store ./mlruns in the current directory (sqlite;
    the one prepare and `python -m tracking dashboard` use). Written to files and logs with credentials redacted."""
    experiment: str = "sft"
    """MLflow experiment name."""
    run_name: str | None = None
    """Run name shown in the dashboard; None: what the run is, ``<model folder>-<method>-<data folder>``."""
    upload_weights: bool = False
    """Upload full model weights as artifacts; false logs their path only. LoRA adapters are always uploaded."""
    close_timeout_s: float = 60.0
    """At the end of the run, wait at most this long for the server to take what is still queued or spooled;
    the rest stays in OUT/mlflow_spool for `python -m tracking sync OUT`."""
    system_metrics: bool = True
    """Log CPU, memory, disk (and GPU with pynvml) usage every 10 s as system/* metrics."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        t = self.train
        if t.max_steps <= 0:
            raise ConfigError(f"train.max_steps={t.max_steps}: must be > 0")
        if t.micro_batch_size <= 0 or t.grad_accum_steps <= 0:
            raise ConfigError("train.micro_batch_size and train.grad_accum_steps must be > 0")
        if t.stop_at_step is not None and not 0 < t.stop_at_step <= t.max_steps:
            raise ConfigError(f"train.stop_at_step={t.stop_at_step}: must be in 1..train.max_steps ({t.max_steps})")
        if t.warmup_steps >= t.max_steps and t.warmup_steps > 0:
            raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be < train.max_steps={t.max_steps}")
        if t.keep_last_checkpoints < 1:
            raise ConfigError("train.keep_last_checkpoints must be >= 1")
        if t.loss_tile_tokens < 0:
            raise ConfigError(f"train.loss_tile_tokens={t.loss_tile_tokens}: must be >= 0 (0: plain loss)")
        if t.sequence_parallel_size < 1:
            raise ConfigError(f"train.sequence_parallel_size={t.sequence_parallel_size}: must be >= 1 (1: off)")
        for key in ("save_every_steps", "log_every_steps"):
            if getattr(t, key) < (1 if key == "log_every_steps" else 0):
                raise ConfigError(f"train.{key}={getattr(t, key)}: must be >= {1 if key == 'log_every_steps' else 0}")
        for key in ("lr", "weight_decay", "adam_eps", "grad_clip", "min_lr_ratio", "collective_timeout_s"):
            value = getattr(t, key)
            if not math.isfinite(value) or value < 0 or (key in ("lr", "collective_timeout_s") and value == 0):
                raise ConfigError(
                    f"train.{key}={value}: must be a finite number {'> 0' if key in ('lr', 'collective_timeout_s') else '>= 0'}"
                )
        for key in ("adam_beta1", "adam_beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(t, key) <= 1.0:
                raise ConfigError(f"train.{key}={getattr(t, key)}: must be in [0, 1]")
        if t.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
        if t.on_nonfinite == "skip" and t.grad_clip == 0 and self.model.dtype == "fp32":
            raise ConfigError(
                "train.on_nonfinite=skip with train.grad_clip=0 and model.dtype=fp32: DeepSpeed would apply a "
                "non-finite update; set train.grad_clip > 0 or train.on_nonfinite=stop"
            )
        if self.lora.r < 1 or self.lora.alpha < 1 or not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(
                f"lora.r={self.lora.r}, lora.alpha={self.lora.alpha}, lora.dropout={self.lora.dropout}: "
                "r and alpha must be >= 1 and dropout in [0, 1)"
            )
        for key in ("every_steps", "max_batches"):
            if getattr(self.eval, key) < 0:
                raise ConfigError(f"eval.{key}={getattr(self.eval, key)}: must be >= 0")
        if self.eval.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens={self.eval.max_new_tokens}: must be >= 1")
        if not math.isfinite(self.tracking.close_timeout_s) or self.tracking.close_timeout_s < 0:
            raise ConfigError(f"tracking.close_timeout_s={self.tracking.close_timeout_s}: must be a finite number >= 0")
        if self.model.method == "qlora" and self.model.dtype == "fp16":
            raise ConfigError("model.dtype=fp16 with model.method=qlora: QLoRA computes in bf16; set model.dtype=bf16")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a nested dict, strictly."""
    return strict_config.apply_overrides(raw, overrides, list(_section_types()))


def build_config(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, failing on unknown sections/keys and wrong types."""
    sections = _section_types()
    unknown = [name for name in raw if name not in sections]
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(sections)}", key=unknown[0]
        )
    for name, body in raw.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"section {name}: expected a mapping of key: value, got {body!r}", key=name)
    built: dict[str, Any] = {name: strict_config.build_dataclass(sections[name], raw[name] or {}, name) for name in raw}
    for name in ("model", "data", "train"):
        if name not in built:
            raise ConfigError(f"missing section {name!r}")
    return RunConfig(**built)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML (or nothing) and apply dotted overrides; the one way a RunConfig is made from files.

    Relative paths resolve as the module docstring says. A ConfigError's message starts with where the faulty
    value came from: ``run.yaml:17: train.lr='abc': expected a number`` or ``override train.lr=abc: ...``."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        loaded, lines = strict_config.read_yaml_with_lines(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train:, ...)")
        raw = loaded
    origins = strict_config.Origins.of(path, lines, overrides or [])
    try:
        config = build_config(apply_overrides(raw, overrides or []))
        config_dir = None if path is None else Path(os.path.abspath(path)).parent
        return resolve_paths(config, config_dir, overridden=origins.overrides)
    except ConfigError as exc:
        raise ConfigError(origins.describe(exc), key=exc.key) from None


def resolve_path(value: str, base: Path, key: str) -> str:
    """``value`` as an absolute path: itself if absolute (``~`` expanded), else joined to ``base`` and normalized.

    ``deepspeed.config`` only: when nothing exists there, the project's file of the same relative path if it
    exists (``ds_configs/zero2.json`` -> PROJECT_ROOT/ds_configs/zero2.json), so a shipped recipe runs from any
    directory."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    joined = Path(os.path.normpath(base / path))
    if key == "deepspeed.config" and not joined.exists() and (PROJECT_ROOT / path).is_file():
        return os.path.normpath(PROJECT_ROOT / path)
    return str(joined)


def resolve_paths(config: RunConfig, config_dir: Path | None, *, overridden: Collection[str] = ()) -> RunConfig:
    """``config`` with every ``PATH_KEYS`` value absolute: relative to ``config_dir`` (the YAML file's folder) for
    values from the file and defaults, to the current directory for ``overridden`` keys or without a file."""
    changes: dict[str, dict[str, Any]] = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        base = Path.cwd() if config_dir is None or key in overridden else config_dir
        if isinstance(value, tuple):
            changes.setdefault(section, {})[name] = tuple(resolve_path(v, base, key) for v in value)
        elif value is not None:
            changes.setdefault(section, {})[name] = resolve_path(value, base, key)
    sections = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in changes.items()}
    return dataclasses.replace(config, **sections)


def to_dict(config: RunConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), for YAML/JSON dumps."""
    plain: dict[str, Any] = strict_config.to_plain(config)
    return plain


def flatten(config: RunConfig) -> dict[str, Any]:
    """``{"section.key": value}`` for every field, e.g. for MLflow params."""
    return {f"{section}.{key}": value for section, body in to_dict(config).items() for key, value in body.items()}


def dump_yaml(config: RunConfig) -> str:
    """The resolved config as written to files (run_config.yaml, every checkpoint, the MLflow artifact):
    credentials redacted (``tracking.naming.redact``: ``tracking.uri``'s user:password and tokens)."""
    return yaml.safe_dump(redact(to_dict(config)), sort_keys=False, allow_unicode=True)
