"""Export a trained model to plain Hugging Face directories.

Layout of ``OUT/final`` (written by ``export_final`` at the end of a run, or by this module's CLI):

- full: ``model.safetensors`` (or shards) + ``config.json`` + ``generation_config.json`` + tokenizer files;
- lora / qlora: ``adapter_model.safetensors`` + ``adapter_config.json`` + tokenizer files;
- always ``sft_export.json``: ``{template, method, base_model_path, data_fingerprint, ...}`` so generation
  renders prompts with the template the model was trained on.

Under ZeRO-3 the weights live in partitions; ``gathered_state_dict`` is the one place they are gathered, one
parameter at a time so a 16B model is never whole on any accelerator. An adapter that is empty (no tensors,
zero-size tensors, or every lora_B still zero) is refused instead of written.

The command a person runs to export a checkpoint or merge an adapter is ``python -m sft_stack.cli.export``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.schema import DataError, load_manifest
from sft_stack.chat.conversation import InputError
from sft_stack.chat.templates import resolve_template
from trainer import progress
from trainer.checkpoint import COMPLETE, CheckpointError, is_tag, latest_tag_text, verify
from trainer.config import ConfigError, RunConfig
from trainer.dist import barrier, is_rank0, rank
from trainer.model import DTYPES, LoadedModel, load_model
from trainer.models.norm_head import NormHead, normalized_lm_head
from trainer.run_dir import EXPORT_INFO_FILE, LATEST_FILE, RunDir
from trainer.write_errors import WRITE_ERRORS, describe, fail_together, gather_failures

log = logging.getLogger(__name__)


class EmptyAdapterError(RuntimeError):
    """An adapter with nothing trained in it (adapter_problem), refused instead of written."""


def gathered_state_dict(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> dict[str, torch.Tensor]:
    """CPU copies of the kept parameters (and, when every parameter is kept, the persistent buffers) on rank 0.

    All ranks must call it: under ZeRO-3 each parameter is gathered with a collective. Other ranks get {}.
    """
    import deepspeed

    rank0 = is_rank0()
    params = dict(model.named_parameters(remove_duplicate=False))
    keep_all = all(keep(name, param) for name, param in params.items())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        param = params.get(name)
        if param is None:
            if keep_all and rank0 and isinstance(tensor, torch.Tensor):
                out[name] = tensor.detach().to("cpu", copy=True)
            continue
        if not keep(name, param):
            continue
        # A no-op for parameters that ZeRO-3 does not partition.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank0:
                out[name] = param.detach().to("cpu", copy=True)
    return out


def adapter_problem(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why an adapter state dict must not be written, or None when it holds trained weights."""
    if not state_dict:
        return "no adapter tensors were collected"
    empty = [name for name, tensor in state_dict.items() if tensor.numel() == 0]
    if empty:
        return f"{len(empty)} adapter tensors have size 0 (ZeRO-3 partitions not gathered), e.g. {empty[0]}"
    lora_b = [tensor for name, tensor in state_dict.items() if "lora_B" in name]
    if lora_b and all(not bool(tensor.any()) for tensor in lora_b):
        return "every lora_B matrix is all zeros (the adapter never trained, or its weights were lost)"
    return None


def export_info(cfg: RunConfig, base_model_path: str) -> dict[str, Any]:
    """The contents of sft_export.json: how to load the export and render prompts for it."""
    template: str | None = None
    fingerprint: str | None = None
    try:
        manifest = load_manifest(cfg.data.path)
        template, fingerprint = manifest.template, manifest.fingerprint
    except DataError as exc:
        log.warning("export: no data manifest (%s); sft_export.json records template=null", exc)
    return {
        "template": template,
        "method": cfg.model.method,
        "base_model_path": base_model_path,
        "data_fingerprint": fingerprint,
        "dtype": cfg.model.dtype,
    }


def template_stop_token_ids(template: str | None, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn under the training template ([] when unknown)."""
    if template is None:
        return []
    try:
        return list(resolve_template(template, tokenizer).stop_token_ids)
    except InputError as exc:
        log.warning("export: template %r not usable with this tokenizer (%s); eos left as is", template, exc)
        return []


def _replace_dir(partial: Path, final: Path) -> None:
    """Move a fully written directory into place, so a crash never leaves a half export under the final name."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def _partial_of(out_dir: Path) -> Path:
    """Where an export is written before it is moved to ``out_dir``."""
    return out_dir.with_name(out_dir.name + ".partial")


def _fresh_partial(out_dir: Path) -> Path:
    partial = _partial_of(out_dir)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def write_full(
    model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any, info: dict[str, Any], out_dir: Path
) -> None:
    """Rank 0: HF safetensors + config + generation config (eos = template stop tokens) + tokenizer."""
    partial = _fresh_partial(out_dir)
    stop_ids = template_stop_token_ids(info["template"], tokenizer)
    generation_config = model.generation_config
    if stop_ids:
        generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True  # training turned it off; generation wants it
    try:
        model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
    finally:
        model.config.use_cache = False
    tokenizer.save_pretrained(partial)
    (partial / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _replace_dir(partial, out_dir)


def write_adapter(
    model: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any, info: dict[str, Any], out_dir: Path
) -> None:
    """Rank 0: PEFT adapter (adapter_model.safetensors + adapter_config.json) + tokenizer + sft_export.json."""
    problem = adapter_problem(state_dict)
    if problem is not None:
        raise EmptyAdapterError(f"refusing to write an empty LoRA adapter to {out_dir}: {problem}")
    partial = _fresh_partial(out_dir)
    model.save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _replace_dir(partial, out_dir)


def fold_norm_heads(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a NormHead's rows normalized, so the export is a plain Linear head that plain transformers runs."""
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, NormHead) and key in state_dict:
            state_dict[key] = normalized_lm_head(state_dict[key])


def export_model(model: nn.Module, loaded: LoadedModel, cfg: RunConfig, out_dir: Path) -> Path:
    """Export a model (the engine's module, or one rebuilt from a checkpoint); all ranks call it."""
    out_dir = Path(out_dir)
    info = export_info(cfg, loaded.base_model_path)
    if cfg.model.method == "full":
        state_dict = gathered_state_dict(model, keep=lambda _name, _param: True)
        fold_norm_heads(model, state_dict)
        writer = write_full
    else:
        state_dict = gathered_state_dict(model, keep=lambda _name, param: param.requires_grad)
        writer = write_adapter
    progress.fault_hook("export", cfg.train.max_steps, rank())  # drills: a rank dies between gather and write
    other: Exception | None = None
    failure: str | None = None
    if is_rank0():
        try:
            writer(model, state_dict, loaded.tokenizer, info, out_dir)
        except EmptyAdapterError as exc:
            other = exc
        except WRITE_ERRORS as exc:  # a full disk: OSError, or RuntimeError from torch's or safetensors' writer
            failure = describe(exc, out_dir)
            shutil.rmtree(_partial_of(out_dir), ignore_errors=True)  # never presented as an export; frees the space
        except Exception as exc:  # anything else must reach the other ranks too
            other = exc
    failures = gather_failures(failure)  # every rank hears rank 0's outcome; none is left waiting in a collective
    if failures:
        kept = f"the previous {out_dir} is untouched" if out_dir.exists() else f"nothing was written to {out_dir}"
        fail_together(f"exporting to {out_dir} failed: {'; '.join(failures)}; {kept}: free space and export again")
    error = [str(other) if other is not None else ""]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(error, src=0)
    if other is not None:
        raise other
    if error[0]:
        raise RuntimeError(error[0])
    barrier()
    return out_dir


def export_final(engine: Any, loaded: LoadedModel, cfg: RunConfig, out_dir: Path) -> Path:
    """Write OUT/final from a trained DeepSpeed engine; all ranks call it (ZeRO-3 gathers are collective)."""
    return export_model(engine.module, loaded, cfg, out_dir)


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Merge an exported adapter into its base loaded un-quantized (bf16 for QLoRA) and save a full HF model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info_file = adapter_dir / EXPORT_INFO_FILE
    if not info_file.is_file():
        raise ConfigError(f"{info_file}: not found; --adapter must be a directory written by trainer.export")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info["method"] not in ("lora", "qlora"):
        raise ConfigError(f"{info_file}: method={info['method']}, only lora/qlora adapters can be merged")
    # QLoRA trained on NF4 weights but merges into the original bf16 base: the merged model differs from the
    # trained one by the 4-bit quantization error of the base (see docs/models.md).
    dtype = torch.bfloat16 if info["method"] == "qlora" else DTYPES[info["dtype"]]
    base = AutoModelForCausalLM.from_pretrained(info["base_model_path"], dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    partial = _fresh_partial(out_dir)
    try:
        merged.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(partial)
        merged_info = {**info, "merged_from": str(adapter_dir)}
        (partial / EXPORT_INFO_FILE).write_text(json.dumps(merged_info, indent=2) + "\n", encoding="utf-8")
    except WRITE_ERRORS as exc:  # a full disk: the partial merge is removed, never presented as a model
        failure = describe(exc, out_dir)
        shutil.rmtree(partial, ignore_errors=True)
        fail_together(f"merging into {out_dir} failed: {failure}; free space and merge again")
    _replace_dir(partial, out_dir)
    return out_dir


def resolve_checkpoint(path: Path) -> Path:
    """The tag directory meant by a run directory, its ``checkpoints/`` folder, or a tag directory itself.

    The directory must carry our COMPLETE marker and match its hashes (trainer.checkpoint.verify) before
    anything in it is unpickled: DeepSpeed's files are loaded with ``torch.load(weights_only=False)``.
    """
    if RunDir.of(path).checkpoints.is_dir():
        path = RunDir.of(path).checkpoints
    pointed = latest_tag_text(path)
    if pointed is not None:
        if not is_tag(pointed):  # the trainer refuses the same pointer (checkpoint.latest_complete)
            raise ConfigError(
                f"--checkpoint {path / LATEST_FILE}: names {pointed[:80]!r}, not a checkpoint tag (a plain step_N "
                "directory inside checkpoints/); pass --checkpoint with the tag directory to export"
            )
        path = path / pointed
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"--checkpoint {path}: not a complete checkpoint (no {COMPLETE} marker); pick another tag")
    try:
        verify(path)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint {path}: refused, {exc}") from exc
    return path


def load_checkpoint_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 module state from one DeepSpeed checkpoint tag directory, verified by resolve_checkpoint.

    Both branches unpickle DeepSpeed's files with ``weights_only=False`` (they hold Python objects besides
    tensors); only ever call this on a directory ``resolve_checkpoint`` returned.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(tag_dir.glob("zero_pp_rank_*optim_states.pt")):
        state: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return state
    # Without ZeRO the whole module is in the model-states file.
    model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        raise ConfigError(f"--checkpoint {tag_dir}: no DeepSpeed model states there")
    module: dict[str, torch.Tensor] = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    return module


def export_checkpoint(checkpoint_dir: Path, cfg: RunConfig, out_dir: Path) -> Path:
    """Rebuild the run's model in one process, load a checkpoint's weights into it, and export it."""
    loaded = load_model(cfg, ds_config={})
    model = loaded.model
    state = load_checkpoint_state(checkpoint_dir)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(trainable - state.keys())
    if missing:
        raise ConfigError(
            f"--checkpoint {checkpoint_dir}: {len(missing)} trained parameters missing (e.g. {missing[0]}); "
            "is --config the run's own resolved config?"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name in params and params[name].requires_grad:
                params[name].copy_(value.to(params[name].dtype))
    return export_model(model, loaded, cfg, out_dir)
