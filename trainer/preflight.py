"""Everything a run can be wrong about that needs no process group, checked before it joins one.

launcher/run.py calls ``find_problems`` on every rank after loading the config and before
``init_distributed``, and prints every problem found (one line each) instead of surfacing them one at a time
after the rendezvous, or never, behind a wait. Nothing here loads weights, a tokenizer or a shard:

- the DeepSpeed config file (exists, valid, no "auto", nothing the run config injects);
- method/stage combinations (QLoRA with ZeRO-3 or offload, fp16 QLoRA, flash-attention without flash-attn)
  and sequence parallelism against the world size and the model's heads;
- the model directory: config.json, tokenizer files, weights unless model.random_init, an original checkpoint
  that needs converting, the family and LoRA targets;
- the prepared data: manifest, a train split with shards, every listed shard file present;
- eval.prompts_file and the template its prompts are rendered with (the data's);
- eval.harness_tasks: known task names whose data loads offline;
- the output folder is not a file;
- a stale DeepSpeed extension-build lock (trainer/build_lock.py).

What needs the process group or reads much stays where it runs: shard hashes (rank 0, trainer/data.py), the
tokenizer fingerprint against the data, remote-code allow-listing (trainer/model.py), the resume point.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.schema import DataError, load_manifest
from sft_stack.chat.registry import template_names
from sft_stack.common.tokenizer import TOKENIZER_FILES, has_tokenizer
from trainer.build_lock import find_stale_locks
from trainer.config import ConfigError, RunConfig
from trainer.dist import zero_stage
from trainer.ds_config import load_ds_json
from trainer.families import check_not_original, lora_target_modules, resolve_family
from trainer.harness import HarnessError, load_tasks

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
"""Files that hold a model's weights (sharded or not) in a Hugging Face model directory."""


def find_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """One line per problem found (empty: the run can start); each check runs even when another failed."""
    problems: list[str] = []

    def check(step: Callable[[], Any]) -> Any:
        try:
            return step()
        except (ConfigError, DataError) as exc:
            problems.append(str(exc))
            return None

    ds_config = check(lambda: load_ds_json(cfg.deepspeed.config))
    if ds_config is not None:
        check(lambda: validate_method(cfg, ds_config))
    hf_config = check(lambda: check_model_dir(cfg))
    if hf_config is not None:
        check(lambda: check_model_family(cfg, hf_config, world_size))
    manifest = check(lambda: check_data_dir(cfg.data.path))
    check(lambda: check_prompts(cfg, None if manifest is None else manifest.template))
    check(lambda: check_output_dir(cfg.train.output_dir))
    check(lambda: check_harness_tasks(cfg))
    problems += [lock.message() for lock in find_stale_locks()]
    return problems


def offloaded(ds_config: dict[str, Any]) -> list[str]:
    """Names of the ZeRO offload sections that move state off the accelerator (offload_optimizer, offload_param)."""
    zero = ds_config.get("zero_optimization", {})
    return [
        key
        for key in ("offload_optimizer", "offload_param")
        if isinstance(zero.get(key), dict) and zero[key].get("device", "none") not in ("none", None)
    ]


def validate_method(cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    """Refuse combinations that cannot train, before anything heavy is loaded; one line naming the key to change."""
    method = cfg.model.method
    where = f"deepspeed.config={cfg.deepspeed.config}"
    if method == "qlora":
        if zero_stage(ds_config) == 3:
            raise ConfigError(
                f"model.method=qlora with ZeRO-3 ({where}): 4-bit weights cannot be partitioned; "
                "use ds_configs/zero2.json (or zero1/no ZeRO), or model.method=lora"
            )
        if offloaded(ds_config):
            raise ConfigError(
                f"model.method=qlora with {' and '.join(offloaded(ds_config))} ({where}): 4-bit weights and their "
                "adapters stay on the GPU; use ds_configs/zero2.json without offload"
            )
        if cfg.model.dtype == "fp16":
            raise ConfigError("model.dtype=fp16 with model.method=qlora: QLoRA computes in bf16; set model.dtype=bf16")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("model.method=qlora needs bitsandbytes; pip install bitsandbytes")
    if method in ("lora", "qlora"):
        lora = cfg.lora
        if lora.r <= 0 or lora.alpha <= 0:
            raise ConfigError(f"lora.r={lora.r}, lora.alpha={lora.alpha}: both must be > 0")
        if not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout={lora.dropout}: must be in [0, 1)")
    if cfg.model.attn_implementation == "flash_attention_2" and not is_flash_attention_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2: flash-attn is not installed or there is no CUDA device; "
            "use model.attn_implementation=auto (sdpa)"
        )


def is_flash_attention_available() -> bool:
    import torch

    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model directory; ConfigError in one line when it is missing or not JSON."""
    config_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"model.path={path}: no such directory; point model.path at a local HF model directory")
    if not config_file.is_file():
        raise ConfigError(f"model.path={path}: no config.json there; point model.path at a local HF model directory")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_file}: not valid JSON ({exc}); re-download or re-convert the model") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: expected a JSON object")
    return raw


def check_model_dir(cfg: RunConfig) -> dict[str, Any]:
    """The model directory's config.json, after checking it is not an original checkpoint that needs converting,
    and has a tokenizer and (unless random_init) weights."""
    path = Path(cfg.model.path)
    raw = read_hf_config(path)
    check_not_original(cfg.model.path, str(raw.get("model_type", "")))  # first: its remedy covers the rest
    if not has_tokenizer(path):
        raise ConfigError(
            f"model.path={path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there"
        )
    if not cfg.model.random_init and not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ConfigError(
            f"model.path={path}: no weights ({', '.join(WEIGHT_PATTERNS)}); download them there, "
            "or set model.random_init=true to train from random weights"
        )
    return raw


def check_model_family(cfg: RunConfig, hf_config: dict[str, Any], world_size: int) -> None:
    """An unknown family, LoRA targets, sequence parallelism."""
    model_type = str(hf_config.get("model_type", ""))
    family = resolve_family(cfg.model.family, model_type)
    if cfg.model.method in ("lora", "qlora"):
        lora_target_modules(cfg.lora.target_modules, family)
    if cfg.train.sequence_parallel_size > 1:
        from trainer import sequence_parallel  # imports torch and the data code: only when it has work to do

        sequence_parallel.check(cfg, world_size, hf_config)


def check_data_dir(data_dir: str) -> Any:
    """The prepared data's manifest, after checking it lists train shards that are all there (not hashed here)."""
    if not Path(data_dir).is_dir():
        raise DataError(
            f"data.path={data_dir}: no such directory; prepare the data first "
            f"(python -m data_pipeline prepare --out {data_dir} ...) or point data.path at its output"
        )
    manifest = load_manifest(data_dir)
    if "train" not in manifest.splits or not manifest.splits["train"].shards:
        raise DataError(f"{Path(data_dir) / 'manifest.json'}: no train shards; re-run prepare")
    missing = [
        str(Path(data_dir) / split / shard.file)
        for split, info in manifest.splits.items()
        for shard in info.shards
        if not (Path(data_dir) / split / shard.file).is_file()
    ]
    if missing:
        raise DataError(f"{missing[0]}: missing ({len(missing)} shard file(s) the manifest lists); re-run prepare")
    return manifest


def check_prompts(cfg: RunConfig, template: str | None) -> None:
    """eval.prompts_file exists and the template they are rendered with (the data's) is one this code knows."""
    if cfg.eval.prompts_file is None:
        return
    if not Path(cfg.eval.prompts_file).is_file():
        raise ConfigError(f"eval.prompts_file={cfg.eval.prompts_file}: no such file; fix the path or unset it")
    if template is not None and template not in template_names():
        raise DataError(
            f"{Path(cfg.data.path) / 'manifest.json'}: template {template!r} is not one this code renders "
            f"(valid: {', '.join(template_names())}); eval.prompts_file needs it: re-run prepare with --template, "
            "or unset eval.prompts_file"
        )


def check_harness_tasks(cfg: RunConfig) -> None:
    """eval.harness_tasks are known and their data loads offline (else the first save would fail hours in)."""
    if not cfg.eval.harness_tasks:
        return
    try:
        load_tasks(cfg.eval.harness_tasks, cfg.eval.harness_include_path)
    except HarnessError as exc:
        raise ConfigError(f"eval.harness_tasks: {exc}") from None


def check_output_dir(output_dir: str) -> None:
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"train.output_dir={output_dir}: is a file; point it at a directory")
