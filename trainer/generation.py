"""Decoding from a loaded model: decoding presets, prompt files, prompt fitting, and batched generation.

The library under ``python -m sft_stack.cli.generate``, ``python -m sft_stack.cli.evaluate`` and the training loop's sample
generations. Prompts are rendered by the chat template the model was trained with, decoding is transformers'
``generate`` with a ``GenerationConfig`` built from a preset plus explicit overrides, generation stops at the
template's end-of-turn tokens, and only the new tokens are decoded. Prompts are batched with left padding. A
prompt longer than the context minus ``max_new_tokens`` is cut from the left (its oldest tokens go) with a
warning. Loading the model, adapter and template is trainer/inference.py. See docs/generation.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sft_stack.chat.conversation import Message, tool_schemas

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

    from sft_stack.chat.templates import ChatTemplate

log = logging.getLogger(__name__)

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
