"""``sft convert SRC DST [--check]``: convert an original (remote-code) checkpoint once into a native one.

    sft convert /models/chatglm3-6b /models/chatglm3-6b-native --check
    sft convert /models/chatglm-6b /models/chatglm-6b-native --weights-only

The command only; the conversion is trainer/convert/ (checkpoint.py writes DST, one module per family).
``python -m trainer.convert`` still runs this command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_stack.common.errors import user_error
from trainer.convert import ConvertError
from trainer.convert.checkpoint import check_forward, convert_checkpoint


def build_parser(prog: str = "python -m sft_stack.cli.convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert an original ChatGLM2/3, Baichuan-7B/Baichuan2-7B or MOSS checkpoint into a native "
        "transformers model directory, or a Baichuan-13B/Baichuan2-13B or ChatGLM-6B (v1) one into our own classes "
        "(trainer/models; no vendor code is run).",
    )
    parser.add_argument(
        "src", type=Path, help="The original checkpoint directory (config.json, weight shards, tokenizer files)."
    )
    parser.add_argument("dst", type=Path, help="The new output directory; it must not exist.")
    parser.add_argument(
        "--chat-template",
        default=None,
        help="The template name to record in the output. Default: the family's, read from config.json.",
    )
    parser.add_argument(
        "--check", action="store_true", help="Reload the output with plain transformers and run one forward pass."
    )
    parser.add_argument(
        "--weights-only",
        action="store_true",
        help="Convert weights and configs without the tokenizer (ChatGLM-6B v1, whose tokenizer is not converted).",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.convert") -> int:
    args = build_parser(prog).parse_args(argv)
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
        return user_error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
