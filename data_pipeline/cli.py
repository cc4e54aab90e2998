"""``python -m data_pipeline prepare|inspect|verify|merge`` (also the ``sft-data`` console script).

Every error a user can cause ends the command with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipeline import tracking
from data_pipeline.inspect import rejects_summary
from data_pipeline.options import OPTION_KEYS, PrepareOptions, build_options, read_config
from data_pipeline.prepare import LIMIT_OPTIONS, TooManyRejects, merge, prepare
from data_pipeline.schema import SPLITS, DataError, load_manifest, verify_split
from data_pipeline.space import OutOfSpace
from sft_stack.chat.conversation import InputError
from sft_stack.common.strict_config import field_docs

_CONFIG_KEYS = OPTION_KEYS
"""The keys of a prepare YAML: every PrepareOptions field."""
_FLAGLESS = ("sources",)
"""Options without a flag of their own: sources come from --source (repeatable) and --config."""


def _flag_help(doc: str, default: Any) -> str:
    """The first sentence of a field's docstring, and its default; % escaped for argparse."""
    first = " ".join(doc.split()).split(". ")[0].rstrip(".")
    shown = "" if default is dataclasses.MISSING else f" (default {default})"
    return (first + shown).replace("%", "%%")


def add_option_flags(
    parser: argparse.ArgumentParser, only: Sequence[str] | None = None, default_text: str | None = None
) -> None:
    """One flag per PrepareOptions field (``max_seq_len`` -> ``--max-seq-len``; ``only``: these fields), typed by
    its annotation and documented by its docstring: the flags cannot drift from the options. Booleans get
    ``--x/--no-x``. Every default is None, so only the flags given override the --config YAML (``default_text``:
    what the help says instead of the field's default)."""
    docs = field_docs(PrepareOptions)
    hints = typing.get_type_hints(PrepareOptions)
    for spec in dataclasses.fields(PrepareOptions):
        if spec.name in _FLAGLESS or (only is not None and spec.name not in only):
            continue
        flag, hint = "--" + spec.name.replace("_", "-"), hints[spec.name]
        kw: dict[str, Any] = {"default": None, "help": _flag_help(docs[spec.name], default_text or spec.default)}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif hint in (int, float, str):
            kw["type"] = hint
        else:
            raise TypeError(f"PrepareOptions.{spec.name}: no flag for type {hint!r}; add it to _FLAGLESS")
        parser.add_argument(flag, **kw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenize corpora into verified Arrow shards + manifest")
    p.add_argument("--config", type=Path, help="prepare YAML: keys are the options below (see configs/data/)")
    p.add_argument("--source", action="append", default=[], help="corpus file or MOSS directory (repeatable)")
    p.add_argument("--format", help="force this format for every source (default: detect)")
    p.add_argument(
        "--columns",
        help="column mapping for every source, field=column pairs: read the format's field from that column, "
        "e.g. instruction=question,output=answer (docs/formats.md, Column mapping)",
    )
    add_option_flags(p)
    p.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record the run in MLflow (default: on unless SFT_TRACKING=0; see data_pipeline/tracking.py)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="option overrides, the value parsed as YAML (max_seq_len=1024); applied after --config, before flags",
    )

    i = commands.add_parser("inspect", help="print the manifest summary and one decoded sample")
    i.add_argument("out", type=Path)
    i.add_argument("--split", default="train", choices=SPLITS)
    i.add_argument("--index", type=int, default=0, help="row to show")

    v = commands.add_parser("verify", help="recompute shard hashes and row counts against the manifest")
    v.add_argument("out", type=Path)

    m = commands.add_parser("merge", help="assemble the partial outputs of --num-tasks runs")
    m.add_argument("partials", type=Path, nargs="+", help="the tasks' output directories")
    m.add_argument("--out", type=Path, required=True, help="the merged output directory")
    add_option_flags(m, only=LIMIT_OPTIONS, default_text="the tasks' value")
    m.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record the run in MLflow (default: on unless SFT_TRACKING=0; see data_pipeline/tracking.py)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """PrepareOptions from the --config YAML (if any), then KEY=VALUE overrides, then the flags given."""
    values = read_config(args.config, args.overrides)
    where = f"--config {args.config}" if args.config else "prepare"
    if args.source:
        listed = values.get("sources") or []
        values["sources"] = [*listed, *args.source] if isinstance(listed, list) else listed
    values.update({key: getattr(args, key) for key in OPTION_KEYS if getattr(args, key, None) is not None})
    for key in ("tokenizer", "out"):
        if key not in values:
            raise InputError(f"prepare: --{key} is required (or `{key}:` in the --config YAML)")
    options = build_options(values, where)
    if args.format:
        sources = tuple(dataclasses.replace(s, format=args.format) for s in options.sources)
        options = dataclasses.replace(options, sources=sources)
    if args.columns:
        pairs = tuple(pair for pair in args.columns.split(",") if pair)
        sources = tuple(dataclasses.replace(s, columns=pairs) for s in options.sources)
        options = dataclasses.replace(options, sources=sources)
    return options


def _verify(out: Path) -> int:
    manifest = load_manifest(out)
    problems = [line for split in manifest.splits for line in verify_split(out, split, manifest)]
    if problems:
        for line in problems:
            print(f"verify: {line}", file=sys.stderr)
        return 1
    shards = sum(len(s.shards) for s in manifest.splits.values())
    rows = sum(s.rows for s in manifest.splits.values())
    print(f"verify: {out}: {shards} shards, {rows} rows match the manifest")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        match args.command:
            case "prepare":
                options = options_from_args(args)
                manifest = prepare(options)
                counts = manifest.counts
                print(
                    f"prepare: {counts['samples_written']} of {counts['samples_read']} samples written "
                    f"({counts['samples_rejected']} rejected), {counts['tokens']} tokens, "
                    f"{manifest.splits['train'].rows} train / {manifest.splits['val'].rows} val rows, "
                    f"packing efficiency {manifest.packing_efficiency:.3f} -> {options.out}"
                )
                for line in rejects_summary(counts):
                    print(f"prepare: {line}")
                if options.num_tasks == 1 and tracking.is_enabled(args.track):
                    tracking.record_in_background(options.out, options)
                return 0
            case "inspect":
                from data_pipeline.inspect import inspect_output

                print(inspect_output(args.out, split=args.split, index=args.index, color=sys.stdout.isatty()))
                return 0
            case "verify":
                return _verify(args.out)
            case "merge":
                manifest = merge(
                    args.partials,
                    args.out,
                    max_bad_fraction=args.max_bad_fraction,
                    max_dropped_fraction=args.max_dropped_fraction,
                )
                print(
                    f"merge: {len(args.partials)} partial outputs -> {args.out} ({manifest.counts['samples_written']} samples)"
                )
                if tracking.is_enabled(args.track):
                    tracking.record_in_background(args.out)
                return 0
    except (InputError, DataError, TooManyRejects, OutOfSpace) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
