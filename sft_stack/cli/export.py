"""Export a run's checkpoint, or merge an exported adapter, into plain Hugging Face directories.

    sft export --adapter OUT/final --merge --out OUT/merged
    sft export --run OUT --out DIR [--merge]          # OUT's latest complete checkpoint
    sft export --checkpoint OUT/checkpoints/step_00000010 --out DIR [--merge]

The command only; what an export contains and how it is written is trainer/export.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sft_stack.common.errors import FAILURE, user_error
from trainer.config import ConfigError, load_config
from trainer.export import export_checkpoint, merge_adapter, resolve_checkpoint
from trainer.run_dir import RUN_CONFIG_FILE
from trainer.write_errors import WriteFailedError


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="An exported adapter directory (OUT/final of a LoRA run).")
    source.add_argument(
        "--checkpoint",
        "--run",
        type=Path,
        help="A run directory (its latest complete checkpoint is exported) or one checkpoint's tag directory.",
    )
    parser.add_argument(
        "--config", type=Path, help="The run's resolved config. Default: the checkpoint's own run_config.yaml."
    )
    parser.add_argument(
        "--merge", action="store_true", help="LoRA and QLoRA runs: also write the adapter merged into a full model."
    )
    parser.add_argument("--out", type=Path, required=True, help="The output directory.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.adapter is not None:
            if not args.merge:
                raise ConfigError("--adapter without --merge has nothing to do; add --merge")
            merge_adapter(args.adapter, args.out)
            print(f"merged {args.adapter} -> {args.out}")
            return 0
        tag_dir = resolve_checkpoint(args.checkpoint)
        cfg = load_config(args.config if args.config is not None else tag_dir / RUN_CONFIG_FILE)
        adapter_out = args.out / "adapter" if args.merge and cfg.model.method != "full" else args.out
        export_checkpoint(tag_dir, cfg, adapter_out)
        if args.merge and cfg.model.method != "full":
            merge_adapter(adapter_out, args.out / "merged")
        print(f"exported {tag_dir} -> {args.out}")
        return 0
    except ConfigError as exc:
        return user_error(str(exc))
    except WriteFailedError:  # a full disk: its one line is printed already (trainer/write_errors.py)
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())
