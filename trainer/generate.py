"""Generation from a trained model: the seed's decoding strategies, batch files, and an interactive chat.

    python -m trainer.generate --model OUT/final --prompt "1+1=?" --preset greedy
    python -m trainer.generate --model BASE --adapter OUT/final --prompts-file prompts.jsonl --out gen.jsonl
    python -m trainer.generate --model OUT/final --chat --preset seed

Prompts are rendered by the chat template the model was trained with (``resolve_run_template`` says where it
was found, on one stderr line), decoding is transformers' ``generate`` with a ``GenerationConfig`` built from a
preset plus explicit overrides, generation stops at the template's end-of-turn tokens, and only the new tokens
are decoded. Prompts are batched with left padding. A prompt longer than the context minus ``max_new_tokens`` is
cut from the left (its oldest tokens go) with a warning. See docs/generation.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from data_pipeline.conversation import Message, tool_schemas

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

    from data_pipeline.templates import ChatTemplate

log = logging.getLogger(__name__)

EXPORT_FILE = "sft_export.json"
"""Written by trainer/export.py next to the exported model or adapter: template, method, base_model_path."""
RUN_CONFIG_FILE = "run_config.yaml"
"""The resolved run config the training loop writes into its output directory (the export's parent)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken")
"""Any one of these marks a directory that holds a tokenizer."""

Preset = Literal["greedy", "beam", "top_k", "top_p", "seed"]


class GenerateError(Exception):
    """Input the user must fix (missing model, no tokenizer, mismatched adapter, bad prompts file); one line."""


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """Decoding options handed to ``GenerationConfig``; every field is set so a model's own
    generation_config.json cannot silently change a preset."""

    do_sample: bool
    """Sample from the (processed) distribution; False: greedy (num_beams=1) or beam search."""
    num_beams: int = 1
    """Beams kept per prompt; >1 with do_sample=False is beam search."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Sample only among the smallest set of tokens whose probability sums to top_p (1.0: off)."""
    temperature: float = 1.0
    """Logits are divided by this before top-k/top-p; <1 sharpens."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the sequence (prompt included); 1.0: off."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size (0: off)."""
    length_penalty: float = 1.0
    """Beam search only: hypotheses are ranked by sum log-prob / length**length_penalty."""
    max_new_tokens: int = 256
    """Upper bound on generated tokens per prompt; generation ends earlier at the template's end of turn."""


PRESETS: dict[str, Decoding] = {
    "greedy": Decoding(do_sample=False),
    "beam": Decoding(do_sample=False, num_beams=4),
    "top_k": Decoding(do_sample=True, top_k=50),
    "top_p": Decoding(do_sample=True, top_p=0.9),
    # The seed README's configuration; it left top_k unset, so transformers' default of 50 applied.
    "seed": Decoding(do_sample=True, temperature=0.6, top_p=0.8, top_k=50, repetition_penalty=2.0, max_new_tokens=512),
}


def decoding_for(preset: str, **overrides: Any) -> Decoding:
    """The preset's options with every non-None override applied (e.g. ``top_k=5``)."""
    if preset not in PRESETS:
        raise GenerateError(f"--preset {preset}: unknown; valid: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def generation_config(decoding: Decoding, *, stop_token_ids: Sequence[int], pad_token_id: int) -> GenerationConfig:
    """A complete GenerationConfig: the template's stop tokens as eos, so generation ends at end of turn."""
    from transformers import GenerationConfig

    fields: dict[str, Any] = {
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.do_sample,
        "num_beams": decoding.num_beams,
        "repetition_penalty": decoding.repetition_penalty,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
        "eos_token_id": list(stop_token_ids),
        "pad_token_id": pad_token_id,
    }
    # Only the knobs the strategy uses, so transformers does not warn about ignored flags.
    if decoding.do_sample:
        fields |= {"top_k": decoding.top_k, "top_p": decoding.top_p, "temperature": decoding.temperature}
    if decoding.num_beams > 1:
        fields |= {"length_penalty": decoding.length_penalty, "early_stopping": True}
    return GenerationConfig(**fields)


# ---------------------------------------------------------------------------------------------------- prompts


def read_prompts(path: str | Path) -> list[dict[str, str]]:
    """Rows ``{prompt, system?, tools?, reference?}`` (tools: a list of function schemas) from JSON lines or the seed's CSV (``prompt,output``; output is the
    reference). Raises GenerateError naming the file and line of the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        return _read_prompts_csv(path, text)
    rows = [_prompt_row(record, where) for where, record in json_lines(path, text)]
    if not rows:
        raise GenerateError(f"{path}: no prompts")
    return rows


def json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """``("file:line", record)`` for every non-blank line; GenerateError naming the line that is not JSON."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerateError(f"{path}:{number}: not JSON ({exc.msg}); expected one object per line") from None


def _read_prompts_csv(path: Path, text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise GenerateError(f"{path}:1: CSV header {reader.fieldnames} has no 'prompt' column (expected prompt,output)")
    rows = []
    for number, record in enumerate(reader, start=2):
        if record.get("output") is not None:
            record = {**record, "reference": record["output"]}
        rows.append(_prompt_row({k: v for k, v in record.items() if k != "output"}, f"{path}:{number}"))
    if not rows:
        raise GenerateError(f"{path}: no prompts")
    return rows


def _prompt_row(record: Any, where: str) -> dict[str, str]:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
        raise GenerateError(f"{where}: expected an object with a non-empty string 'prompt'")
    row = {"prompt": record["prompt"]}
    if record.get("tools") is not None:
        # The tools offered to the model, rendered as the template's family was trained to see them.
        try:
            row["tools"] = json.dumps([json.loads(t) for t in tool_schemas(record["tools"])], ensure_ascii=False)
        except ValueError as exc:
            raise GenerateError(f"{where}: {exc}") from None
    for key in ("system", "reference"):
        value = record.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise GenerateError(f"{where}: {key!r} must be a string")
            row[key] = value
    return row


def prompt_messages(prompt: str, system: str | None = None, history: Sequence[Message] = ()) -> list[Message]:
    """System (if any), earlier turns, then the new user turn: what the template renders before the reply."""
    messages = [Message(role="system", content=system)] if system else []
    return [*messages, *history, Message(role="user", content=prompt)]


def encode_row(template: ChatTemplate, row: dict[str, str], index: int) -> list[int]:
    """Prompt ids of one ``{prompt, system?, tools?}`` row, rendered exactly as training rendered the same turns."""
    try:
        tools = tool_schemas(row.get("tools"))
        return template.encode_prompt(prompt_messages(row["prompt"], row.get("system")), tools)
    except ValueError as exc:
        raise GenerateError(f"prompt {index}: {exc}") from None


def context_length(model: PreTrainedModel) -> int | None:
    """Positions the model can attend over (config.max_position_embeddings or equivalent); None: unknown."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_budget(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Most prompt tokens that still leave room for ``max_new_tokens`` in the context; None: no limit known."""
    context = context_length(model)
    if context is None:
        return None
    if max_new_tokens >= context:
        raise GenerateError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    return context - max_new_tokens


def fit_prompt(ids: list[int], budget: int | None, where: str) -> list[int]:
    """Left-truncate ``ids`` to ``budget`` tokens (the oldest text goes, the assistant prefix stays), warning."""
    if budget is None or len(ids) <= budget:
        return ids
    log.warning("%s: prompt is %d tokens; kept its last %d (context minus max_new_tokens)", where, len(ids), budget)
    return ids[len(ids) - budget :]


# ---------------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True, kw_only=True)
class Completion:
    token_ids: list[int]
    """New tokens only, up to (not including) the first stop token."""
    text: str
    """``token_ids`` decoded, special tokens skipped."""
    finish_reason: Literal["stop", "length"]
    """stop: the template's end of turn was generated; length: max_new_tokens ran out first."""


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    config: GenerationConfig,
    *,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
) -> list[Completion]:
    """One left-padded batch through ``model.generate``; returns only what follows each prompt."""
    pad_id = config.pad_token_id
    stop_ids = set(config.eos_token_id or [])
    width = max(len(ids) for ids in prompt_ids)
    # Left padding: every prompt ends at the same column, so the new tokens of all rows start together.
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], dtype=torch.long)
    device = model_device(model)
    output = model.generate(  # type: ignore[operator]  # PreTrainedModel.generate is typed as a tensor attribute
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        synced_gpus=synced_gpus,
        streamer=streamer,
    )
    completions = []
    for row in output[:, width:].tolist():
        stop_at = next((i for i, token in enumerate(row) if token in stop_ids), None)
        new = row if stop_at is None else row[:stop_at]
        completions.append(
            Completion(
                token_ids=new,
                text=str(tokenizer.decode(new, skip_special_tokens=True)),
                finish_reason="length" if stop_at is None else "stop",
            )
        )
    return completions


def pad_token_id(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> int:
    """The tokenizer's pad token, else the first stop token (left padding is masked, so any id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else template.stop_token_ids[0]


def generate_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    rows: Sequence[dict[str, str]],
    decoding: Decoding,
    *,
    seed: int,
    batch_size: int = 8,
    synced_gpus: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate for every ``{prompt, system?, reference?}`` row; returns the rows with ``output``,
    ``finish_reason``, ``prompt_tokens`` and ``new_tokens`` added.

    The seed is set once, before the first batch: the same rows, batch size and seed give the same outputs.
    """
    from transformers import set_seed

    config = generation_config(
        decoding, stop_token_ids=template.stop_token_ids, pad_token_id=pad_token_id(tokenizer, template)
    )
    budget = prompt_budget(model, decoding.max_new_tokens)
    prompt_ids = [fit_prompt(encode_row(template, row, i), budget, f"prompt {i}") for i, row in enumerate(rows)]
    set_seed(seed)
    results: list[dict[str, Any]] = []
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="generate", unit="batch", file=sys.stderr)
    for start in starts:
        batch = prompt_ids[start : start + batch_size]
        for row, ids, done in zip(
            rows[start : start + batch_size],
            batch,
            generate_ids(model, tokenizer, batch, config, synced_gpus=synced_gpus),
            strict=True,
        ):
            results.append(
                {
                    **row,
                    "output": done.text,
                    "finish_reason": done.finish_reason,
                    "prompt_tokens": len(ids),
                    "new_tokens": len(done.token_ids),
                }
            )
    return results


def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    prompts: list[dict],
    *,
    max_new_tokens: int,
    seed: int,
    synced_gpus: bool = False,
    preset: str = "greedy",
    batch_size: int = 8,
) -> list[dict]:
    """Samples for the training loop's periodic evaluation: rows ``{prompt, output, reference?, ...}``.

    Every rank must call it with the same prompts under ZeRO-3 (``synced_gpus=True``), because each forward
    gathers sharded weights collectively. The model is put in eval mode and restored afterwards; the
    caller's RNG state is saved and restored, so sampling here does not change the training run.
    """
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        return generate_rows(
            model,
            tokenizer,
            template,
            prompts,
            decoding_for(preset, max_new_tokens=max_new_tokens),
            seed=seed,
            batch_size=batch_size,
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# ---------------------------------------------------------------------------------------------------- loading


def read_export_info(directory: str | Path) -> dict[str, Any] | None:
    """``sft_export.json`` of an exported model or adapter directory, or None when there is none."""
    path = Path(directory) / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GenerateError(f"{path}: not valid JSON ({exc.msg}); re-run the export") from None
    if not isinstance(info, dict):
        raise GenerateError(f"{path}: expected a JSON object; re-run the export")
    return info


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


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
    ``run_config.yaml`` (``data.path``) in the run directory that holds the export (OUT/final -> OUT);
    5. ``auto``: the tokenizer's own chat_template when it has one, else the neutral ``default``.
    """
    from data_pipeline.conversation import InputError
    from data_pipeline.schema import MANIFEST_FILE, DataError, load_manifest
    from data_pipeline.templates import resolve_template

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
            return choose(info["template"], str(directory / EXPORT_FILE))
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
    """``data.path`` of the run that wrote ``export_dir`` (its parent's run_config.yaml), if there is one."""
    import yaml

    run_config = export_dir.resolve().parent / RUN_CONFIG_FILE
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


def load_tokenizer(model_dir: Path, adapter_dir: Path | None, *, trust_remote_code: bool = False) -> Any:
    """The adapter's tokenizer when it ships one (the export writes it), else the model's."""
    from transformers import AutoTokenizer

    source = adapter_dir if adapter_dir is not None and has_tokenizer(adapter_dir) else model_dir
    if not has_tokenizer(source):
        raise GenerateError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer there")
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise GenerateError(f"{source}: tokenizer does not load ({str(exc).splitlines()[0]})") from None


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

    import trainer.models  # noqa: F401  registers our own model types (Baichuan-13B/2-13B, ChatGLM-6B v1)

    base_dir, adapter_path = resolve_dirs(model_dir, adapter_dir)
    tokenizer = load_tokenizer(base_dir, adapter_path, trust_remote_code=trust_remote_code)
    target = pick_device(device)
    if load_in_4bit and merge:
        raise GenerateError("--merge with --load-in-4bit: merge into the unquantized base (drop --load-in-4bit)")
    method = (read_export_info(adapter_path) or {}).get("method") if adapter_path is not None else None
    if method == "qlora" and not load_in_4bit:
        log.info("%s is a QLoRA adapter: pass --load-in-4bit to run it on the NF4 base it was trained on", adapter_path)
    kwargs: dict[str, Any] = {"dtype": pick_dtype(dtype, target)}
    if load_in_4bit:
        from trainer.model import quantization_config

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


# ---------------------------------------------------------------------------------------------------- chat


def fit_history(
    template: ChatTemplate, system: str | None, history: list[Message], prompt: str, budget: int | None
) -> tuple[list[int], int]:
    """Prompt ids for the next reply, dropping the oldest user/assistant pairs until they fit ``budget``;
    returns (ids, pairs dropped). A single turn that is still too long is left-truncated."""
    dropped = 0
    while True:
        ids = template.encode_prompt(prompt_messages(prompt, system, history[2 * dropped :]))
        if budget is None or len(ids) <= budget or 2 * dropped >= len(history):
            return fit_prompt(ids, budget, "chat turn"), dropped
        dropped += 1


def chat(
    loaded: Loaded,
    template: ChatTemplate,
    decoding: Decoding,
    *,
    system: str | None,
    seed: int,
    lines: Iterable[str],
) -> list[Message]:
    """Interactive multi-turn chat: each line of ``lines`` is a user turn, the reply streams to stdout as it
    is generated. ``/reset`` clears the history, ``/exit`` (or end of input) stops. Returns the history."""
    from transformers import TextStreamer, set_seed

    tokenizer, model = loaded.tokenizer, loaded.model
    config = generation_config(
        decoding, stop_token_ids=template.stop_token_ids, pad_token_id=pad_token_id(tokenizer, template)
    )
    budget = prompt_budget(model, decoding.max_new_tokens)
    history: list[Message] = []
    set_seed(seed)
    for line in lines:
        prompt = line.strip()
        if prompt in ("/exit", "/quit"):
            break
        if prompt == "/reset":
            history = []
            continue
        if not prompt:
            continue
        ids, dropped = fit_history(template, system, history, prompt, budget)
        if dropped:
            log.warning("history over the context: dropped the oldest %d turn pair(s)", dropped)
            history = history[2 * dropped :]
        # Beam search cannot stream (transformers refuses a streamer with num_beams > 1): print at the end.
        streamer = (
            TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if decoding.num_beams == 1 else None
        )
        (done,) = generate_ids(model, tokenizer, [ids], config, streamer=streamer)
        if streamer is None:
            print(done.text, flush=True)
        history += [Message(role="user", content=prompt), Message(role="assistant", content=done.text)]
    return history


def stdin_turns() -> Iterator[str]:
    """Lines of stdin, with a "> " prompt on stderr when a person is typing."""
    print("chat: one line per turn; /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory, or an exported adapter directory")
    parser.add_argument("--adapter", help="PEFT adapter directory to load on top of --model")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the weights after loading")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user prompt")
    source.add_argument("--prompts-file", help="JSON lines {prompt, system?, reference?} or CSV prompt,output")
    source.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin, streamed")
    parser.add_argument("--system", help="system prompt (a file's own 'system' field wins)")
    parser.add_argument("--template", help="chat template name; overrides what the export/manifest recorded")
    parser.add_argument("--data", help="prepared data directory whose manifest names the template")
    parser.add_argument("--preset", default="greedy", choices=list(PRESETS))
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--no-repeat-ngram-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="write rows as JSON lines here (default: stdout)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4 as QLoRA training did")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code")
    return parser


def load_from_args(args: argparse.Namespace) -> Loaded:
    """The model (and adapter) named by the shared --model/--adapter/--merge/--device/--dtype/... options."""
    return load_for_inference(
        args.model,
        args.adapter,
        merge=args.merge,
        device=args.device,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        trust_remote_code=args.trust_remote_code,
    )


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    return decoding_for(
        args.preset,
        num_beams=args.num_beams,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_new_tokens=args.max_new_tokens,
    )


def setup_logging() -> None:
    """CLI stderr: our own info/warning lines; transformers only for errors, without loading progress bars."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        decoding = decoding_from_args(args)
        rows = read_prompts(args.prompts_file) if args.prompts_file else None
        loaded = load_from_args(args)
        choice = resolve_run_template(
            loaded.tokenizer,
            model_dir=loaded.model_dir,
            adapter_dir=loaded.adapter_dir,
            data_dir=args.data,
            name=args.template,
        )
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"template: {choice.template.name} (from {choice.source})", file=sys.stderr)
    if args.chat:
        chat(loaded, choice.template, decoding, system=args.system, seed=args.seed, lines=stdin_turns())
        return 0
    if rows is None:
        rows = [{"prompt": args.prompt}]
    if args.system:
        rows = [{"system": args.system, **row} for row in rows]
    results = generate_rows(
        loaded.model,
        loaded.tokenizer,
        choice.template,
        rows,
        decoding,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=len(rows) > args.batch_size,
    )
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} rows to {args.out}", file=sys.stderr)
    elif args.prompt is not None:
        print(results[0]["output"])
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
