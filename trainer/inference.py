"""Loading a model for inference: base model, tokenizer and PEFT adapter, checked against each other, and the
chat template the model was trained with.

One home for what ``python -m sft_stack.cli.generate`` and ``python -m sft_stack.cli.evaluate`` load: ``--model`` may be a plain
Hugging Face directory, an export of a full run (OUT/final) or an exported adapter (its recorded base is then
the model). An adapter trained on another base is refused in one line before PEFT loads it. The template is
found where training recorded it (``resolve_run_template``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_pipeline.schema import MANIFEST_FILE, DataError, load_manifest
from sft_stack.chat.conversation import InputError
from sft_stack.chat.templates import ChatTemplate, resolve_template
from sft_stack.common.tokenizer import TokenizerError, has_tokenizer, load_tokenizer
from trainer.generation import GenerateError
from trainer.run_dir import EXPORT_INFO_FILE, RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def read_export_info(directory: str | Path) -> dict[str, Any] | None:
    """``sft_export.json`` of an exported model or adapter directory, or None when there is none."""
    path = Path(directory) / EXPORT_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GenerateError(f"{path}: not valid JSON ({exc.msg}); re-run the export") from None
    if not isinstance(info, dict):
        raise GenerateError(f"{path}: expected a JSON object; re-run the export")
    return info


@dataclass(frozen=True, kw_only=True)
class TemplateChoice:
    template: ChatTemplate
    source: str
    """Where the name came from, for the one line the CLI prints."""


def resolve_run_template(
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    name: str | None = None,
) -> TemplateChoice:
    """The chat template training used. First match wins:

    1. ``name`` (``--template``); 2. the adapter's, then the model's sft_export.json ``template``;
    3. the manifest of ``data_dir`` (``--data``); 4. the manifest of the data the run trained on, read from
    the run config (``data.path``) in the run directory that holds the export (OUT/final -> OUT, trainer/run_dir);
    5. ``auto``: the tokenizer's own chat_template when it has one, else the neutral ``default``.
    """

    def choose(template_name: str, source: str) -> TemplateChoice:
        try:
            return TemplateChoice(template=resolve_template(template_name, tokenizer), source=source)
        except InputError as exc:
            raise GenerateError(f"template {template_name!r} (from {source}): {exc}") from None

    if name is not None:
        return choose(name, "--template")
    exported = [Path(d) for d in (adapter_dir, model_dir) if d is not None]
    for directory in exported:
        info = read_export_info(directory) or {}
        if isinstance(info.get("template"), str):
            return choose(info["template"], str(directory / EXPORT_INFO_FILE))
    if data_dir is not None:
        try:
            return choose(load_manifest(data_dir).template, str(Path(data_dir) / MANIFEST_FILE))
        except DataError as exc:
            raise GenerateError(str(exc)) from None
    for directory in exported:
        recorded = recorded_data_path(directory)
        if recorded is not None and (Path(recorded) / MANIFEST_FILE).is_file():
            return choose(load_manifest(recorded).template, str(Path(recorded) / MANIFEST_FILE))
    return choose("auto", "no sft_export.json template or manifest; resolved from the tokenizer")


def recorded_data_path(export_dir: Path) -> str | None:
    """``data.path`` in the resolved run config of the run folder that holds ``export_dir``, if there is one.

    Only that key is read, and leniently (not through trainer.config's strict loader): a config written by an
    older version of the trainer still names its data.
    """
    import yaml

    run_config = RunDir.of_export(export_dir).run_config
    if not run_config.is_file():
        return None
    try:
        raw = yaml.safe_load(run_config.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    data = raw.get("data") if isinstance(raw, dict) else None
    path = data.get("path") if isinstance(data, dict) else None
    return path if isinstance(path, str) else None


def _config_shape(config: dict[str, Any]) -> dict[str, Any]:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "n_embd", "n_layer")
    return {k: config[k] for k in keys if k in config}


def check_adapter_base(model: torch.nn.Module, model_dir: Path, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another base, in one line.

    Two checks: the base recorded by the adapter (sft_export.json base_model_path, else adapter_config.json
    base_model_name_or_path), when it still exists, must have the same config shape as ``model_dir``; and
    every LoRA matrix must fit the module it wraps in ``model`` (this catches a moved or renamed base too).
    """
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise GenerateError(f"{adapter_dir}: no adapter_config.json; --adapter must be a PEFT adapter directory")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    info = read_export_info(adapter_dir) or {}
    recorded = info.get("base_model_path") or adapter_config.get("base_model_name_or_path")
    if isinstance(recorded, str) and (Path(recorded) / "config.json").is_file():
        theirs = _config_shape(json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8")))
        ours = _config_shape(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
        if theirs != ours:
            raise GenerateError(
                f"{adapter_dir}: adapter was trained on {recorded} ({theirs}) but --model {model_dir} is {ours}; "
                f"pass --model {recorded}"
            )
    modules = dict(model.named_modules())
    for key, shape in _adapter_shapes(adapter_dir).items():
        found = re.match(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
        if not found:
            continue
        target, side = found.groups()
        module = modules.get(target)
        if module is None:
            raise GenerateError(
                f"{adapter_dir}: adapter wraps {target}, which --model {model_dir} does not have; "
                f"it was trained on {recorded}"
            )
        expected = getattr(module, "in_features" if side == "A" else "out_features", None)
        actual = shape[1] if side == "A" else shape[0]
        if expected is not None and expected != actual:
            raise GenerateError(
                f"{adapter_dir}: adapter's {target} is {'in' if side == 'A' else 'out'}_features={actual}, "
                f"--model {model_dir} has {expected}; the adapter was trained on {recorded}"
            )


def _adapter_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    """Tensor shapes of the saved adapter, read from the safetensors header (no weights loaded)."""
    path = adapter_dir / "adapter_model.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return {key: list(value.shape) for key, value in state.items()}
    raise GenerateError(f"{adapter_dir}: no adapter_model.safetensors; the adapter export is incomplete")


@dataclass(frozen=True, kw_only=True)
class Loaded:
    model: Any
    """The model ready for ``generate`` (a PeftModel when an adapter is loaded unmerged)."""
    tokenizer: Any
    model_dir: Path
    adapter_dir: Path | None


def pick_device(device: str) -> torch.device:
    """auto: the first CUDA GPU when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 otherwise (CPU half precision is slow and lossy)."""
    match dtype:
        case "bf16":
            return torch.bfloat16
        case "fp16":
            return torch.float16
        case "fp32":
            return torch.float32
        case _:
            is_bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if is_bf16_gpu else torch.float32


def resolve_dirs(model_dir: str | Path, adapter_dir: str | Path | None) -> tuple[Path, Path | None]:
    """(base model dir, adapter dir). ``--model`` may name an exported adapter: its recorded base is the model."""
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise GenerateError(f"--model {model_path}: no such directory")
    if (
        adapter_dir is None
        and (model_path / "adapter_config.json").is_file()
        and not (model_path / "config.json").exists()
    ):
        info = read_export_info(model_path) or {}
        adapter_config = json.loads((model_path / "adapter_config.json").read_text(encoding="utf-8"))
        base = info.get("base_model_path") or adapter_config.get("base_model_name_or_path")
        if not isinstance(base, str) or not Path(base).is_dir():
            raise GenerateError(
                f"--model {model_path} is an adapter whose base {base!r} is not a local directory; pass --model BASE "
                f"--adapter {model_path}"
            )
        log.info("--model %s is an adapter; base model %s", model_path, base)
        return Path(base), model_path
    if not (model_path / "config.json").is_file():
        raise GenerateError(f"--model {model_path}: no config.json; expected a Hugging Face model directory")
    adapter_path = None if adapter_dir is None else Path(adapter_dir)
    if adapter_path is not None and not adapter_path.is_dir():
        raise GenerateError(f"--adapter {adapter_path}: no such directory")
    return model_path, adapter_path


def tokenizer_dir(model_dir: Path, adapter_dir: Path | None) -> Path:
    """Where the tokenizer is: the adapter's directory when it ships one (the export writes it), else the model's."""
    return adapter_dir if adapter_dir is not None and has_tokenizer(adapter_dir) else model_dir


def load_for_inference(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    merge: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> Loaded:
    """Tokenizer, model and (optionally) a PEFT adapter, checked against each other, in eval mode on ``device``.

    ``load_in_4bit`` loads the base as QLoRA training did (NF4, bf16 compute), so a QLoRA adapter runs on
    the very weights it was trained against; without it the base is loaded unquantized, which differs from
    the trained model by the base's quantization error.
    """
    from transformers import AutoModelForCausalLM

    # Here, not at the top: the family registry imports transformers' model code. Importing it registers every
    # family's own model class (Baichuan-13B/2-13B, ChatGLM-6B v1) with the Auto classes.
    import trainer.families  # noqa: F401

    base_dir, adapter_path = resolve_dirs(model_dir, adapter_dir)
    try:
        tokenizer = load_tokenizer(tokenizer_dir(base_dir, adapter_path), trust_remote_code=trust_remote_code)
    except TokenizerError as exc:
        raise GenerateError(str(exc)) from None
    target = pick_device(device)
    if load_in_4bit and merge:
        raise GenerateError("--merge with --load-in-4bit: merge into the unquantized base (drop --load-in-4bit)")
    method = (read_export_info(adapter_path) or {}).get("method") if adapter_path is not None else None
    if method == "qlora" and not load_in_4bit:
        log.info("%s is a QLoRA adapter: pass --load-in-4bit to run it on the NF4 base it was trained on", adapter_path)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype, target)}
    if load_in_4bit:
        from trainer.model import quantization_config  # here: trainer.model imports the family registry too

        kwargs = {"dtype": torch.bfloat16, "quantization_config": quantization_config(), "device_map": {"": target}}
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise GenerateError(f"--model {base_dir}: model does not load ({str(exc).splitlines()[0]})") from None
    if adapter_path is not None:
        from peft import PeftModel

        check_adapter_base(model, base_dir, adapter_path)
        model = PeftModel.from_pretrained(model, adapter_path)
        if merge:
            model = model.merge_and_unload()
    if not load_in_4bit:  # a quantized model is placed by device_map and cannot be moved
        model.to(target)
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, model_dir=base_dir, adapter_dir=adapter_path)
