"""``python -m trainer.convert SRC DST [--check]``: write DST, the native form of the original checkpoint SRC.

DST is written as DST.partial and renamed at the end, so a failed conversion never leaves a directory that
looks complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from sft_stack.chat.templates import CHAT_FORMAT_KEY, resolve_template
from trainer.convert import CONVERSION_FILE, ConvertError
from trainer.convert.registry import detect_source
from trainer.convert.weights import convert_weights


def read_source_config(src: Path) -> dict[str, Any]:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{src}: no config.json; point SRC at the original checkpoint directory")
    raw: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    return raw


def convert_checkpoint(
    src: Path, dst: Path, *, chat_template: str | None = None, with_tokenizer: bool = True
) -> dict[str, Any]:
    """Convert ``src`` into a new directory ``dst``; returns what conversion.json records.

    with_tokenizer=False converts the weights and configs only (the tiny test checkpoints ship no vocabulary).
    """
    from transformers import CONFIG_MAPPING

    raw = read_source_config(src)
    source, family = detect_source(raw, src / "config.json")
    if dst.exists():
        raise ConvertError(f"{dst}: already exists; pass a new output directory")
    native = source.native_config(raw)
    template = chat_template or source.chat_template(src, raw)
    # The tokenizer first: a missing vocabulary file fails before minutes of weight conversion.
    tokenizer = source.build_tokenizer(src, raw, template) if with_tokenizer else None
    if tokenizer is not None:
        _check_vocab_fits(tokenizer, native, src)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    report = convert_weights(src, partial, source, raw)
    model_type = native.pop("model_type")
    config = CONFIG_MAPPING[model_type](**native)
    config.save_pretrained(partial)
    generation = source.generation_config(raw)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
        _record_chat_format(partial, template)
        generation["eos_token_id"] = list(_stop_token_ids(template, tokenizer))
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    record = {
        "source": str(src.resolve()),
        "source_family": source.name,
        "native_family": family.name,
        "architecture": (config.architectures or [model_type])[0],
        "chat_template": template,
        "tokenizer": tokenizer is not None,
        "source_tensors": report.source_tensors,
        "native_tensors": report.native_tensors,
        "shards": report.shards,
        "total_bytes": report.total_bytes,
    }
    (partial / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    partial.rename(dst)
    return record


def _check_vocab_fits(tokenizer: Any, native: dict[str, Any], src: Path) -> None:
    rows = int(native.get("vocab_size", 0))
    size = len(tokenizer)
    if size > rows:
        raise ConvertError(
            f"{src}: the tokenizer has {size} ids but config.json's vocabulary has {rows} rows; "
            "the tokenizer files belong to another model"
        )


def _record_chat_format(directory: Path, template: str) -> None:
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config[CHAT_FORMAT_KEY] = template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _stop_token_ids(template: str, tokenizer: Any) -> tuple[int, ...]:
    return resolve_template(template, tokenizer).stop_token_ids


def check_forward(dst: Path) -> float:
    """Reload ``dst`` with plain transformers and run one forward pass; the largest |logit| (finite) or raises."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    model.eval()
    ids = torch.arange(3, 19).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise ConvertError(f"{dst}: the converted model's logits are not finite; the conversion is wrong")
    return float(logits.abs().max())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.convert",
        description="Convert an original ChatGLM2/3, Baichuan-7B/Baichuan2-7B or MOSS checkpoint into a native "
        "transformers model directory, or a Baichuan-13B/Baichuan2-13B or ChatGLM-6B (v1) one into our own classes "
        "(trainer/models; no vendor code is run).",
    )
    parser.add_argument("src", type=Path, help="original checkpoint directory (config.json, shards, tokenizer files)")
    parser.add_argument("dst", type=Path, help="new output directory")
    parser.add_argument(
        "--chat-template", default=None, help="template name to record (default: the family's, from config.json)"
    )
    parser.add_argument("--check", action="store_true", help="reload the output and run one forward pass")
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="convert weights and configs, no tokenizer (ChatGLM-6B v1, whose tokenizer is not converted)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = convert_checkpoint(
            args.src, args.dst, chat_template=args.chat_template, with_tokenizer=not args.weights_only
        )
        print(
            f"converted {record['source_family']} -> {record['architecture']} in {args.dst} "
            f"({record['native_tensors']} tensors, {record['shards']} shards, template {record['chat_template']})"
        )
        if args.check:
            print(f"check: forward pass finite, max |logit| {check_forward(args.dst):.4f}")
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
