"""The flags the command-line tools share, defined once: which model to load, which template, how to decode.

``python -m sft_stack.cli.generate`` and ``python -m sft_stack.cli.evaluate`` add these groups to their parsers and turn the parsed
namespace into the library's objects with ``load_from_args`` and ``decoding_from_args``, so a flag means the
same and has the same default in every tool. ``--max-new-tokens`` defaults to the preset's own value (256;
512 for ``seed_readme``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sft_stack.chat.registry import TEMPLATE_NAMES
from trainer.generation import PRESET_ALIASES, PRESETS, Decoding, decoding_for
from trainer.inference import Loaded, TemplateChoice, load_for_inference, resolve_run_template


def add_model_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--model/--adapter/--merge and where and how to load them."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", required=required, help="A Hugging Face model directory, or an exported adapter directory."
    )
    group.add_argument("--adapter", help="A PEFT adapter directory to load on top of --model.")
    group.add_argument("--merge", action="store_true", help="Merge the adapter into the weights after loading.")
    group.add_argument(
        "--device",
        default="auto",
        help="Where to run: cpu, cuda, cuda:1, ... or auto (the first GPU when there is one, else cpu). Default: auto.",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="Weights' dtype: auto is bf16 on a GPU that supports it, else fp32. Default: auto.",
    )
    group.add_argument("--load-in-4bit", action="store_true", help="Load the base model in NF4, as QLoRA training did.")
    group.add_argument(
        "--trust-remote-code", action="store_true", help="Allow the model directory's own modeling code to run."
    )
    group.add_argument(
        "--template",
        choices=[*TEMPLATE_NAMES, "auto"],
        metavar="TEMPLATE",
        help=f"The chat template to render prompts with: {', '.join(TEMPLATE_NAMES)}. Default: the one the run "
        "trained with (recorded in the export, else in the data's manifest), else auto (see `sft prepare --help`).",
    )


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """--preset plus explicit overrides of its fields, and the sampling seed."""
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--preset",
        default="greedy",
        choices=[*PRESETS, *PRESET_ALIASES],
        metavar="{" + ",".join(PRESETS) + "}",
        help="Decoding preset (docs/generation.md lists each one's settings); the flags below change single "
        "settings of it. seed_readme is the seed notes' sampling (temperature 0.6, top_p 0.8, repetition "
        "penalty 2.0, 512 new tokens). Default: greedy.",
    )
    group.add_argument("--num-beams", type=int, help="Beams kept per prompt (>1: beam search).")
    group.add_argument("--top-k", type=int, help="Sample only among the k most likely tokens (0: off).")
    group.add_argument(
        "--top-p", type=float, help="Sample only among the smallest set of tokens whose probability sums to p."
    )
    group.add_argument("--temperature", type=float, help="Divide the logits by this before sampling (<1 sharpens).")
    group.add_argument("--repetition-penalty", type=float, help="Penalty on tokens already in the sequence (1.0: off).")
    group.add_argument("--no-repeat-ngram-size", type=int, help="Forbid repeating any n-gram of this size (0: off).")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        help="Upper bound on generated tokens per prompt. Default: the preset's (256; seed_readme: 512).",
    )
    group.add_argument(
        "--seed", type=int, default=42, help="Random seed, set once before the first prompt. Default: 42."
    )


def load_from_args(args: argparse.Namespace) -> Loaded:
    """The model (and adapter) named by the model flags."""
    return load_for_inference(
        args.model,
        args.adapter,
        merge=args.merge,
        device=args.device,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        trust_remote_code=args.trust_remote_code,
    )


def template_from_args(loaded: Loaded, args: argparse.Namespace) -> TemplateChoice:
    """The chat template to render prompts with: --template, else what the run trained with (export, data)."""
    return resolve_run_template(
        loaded.tokenizer,
        model_dir=loaded.model_dir,
        adapter_dir=loaded.adapter_dir,
        data_dir=args.data,
        name=args.template,
    )


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    """The preset with every decoding flag that was given applied over it."""
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
