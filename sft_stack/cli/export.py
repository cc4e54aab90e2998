"""Export a run's checkpoint, or merge an exported adapter, into plain Hugging Face directories.

    python -m sft_stack.cli.export --adapter OUT/final --merge --out OUT/merged
    python -m sft_stack.cli.export --run OUT --out DIR [--merge]          # OUT's latest complete checkpoint
    python -m sft_stack.cli.export --checkpoint OUT/checkpoints/step_00000010 --out DIR [--merge]

The command only; what an export contains and how it is written is trainer/export.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.export import export_checkpoint, merge_adapter, resolve_checkpoint
from trainer.run_dir import RUN_CONFIG_FILE
from trainer.write_errors import WriteFailedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_stack.cli.export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", type=Path, help="an exported adapter directory (OUT/final of a lora run)")
    source.add_argument(
        "--checkpoint", "--run", type=Path, help="a run directory (its latest complete checkpoint) or a tag directory"
    )
    parser.add_argument("--config", type=Path, help="the run's resolved config (default: TAG/run_config.yaml)")
    parser.add_argument("--merge", action="store_true", help="lora/qlora: also write a merged full model")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WriteFailedError:  # a full disk: its one line is printed already (trainer/write_errors.py)
        return 1


if __name__ == "__main__":
    sys.exit(main())
