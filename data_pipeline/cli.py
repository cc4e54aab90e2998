"""``sft prepare|inspect|verify|merge`` (also ``python -m data_pipeline ...`` and the ``sft-data`` console script).

Every error a user can cause ends the command with one line on stderr, ``sft: error: ...``, and exit status 2;
``verify`` exits 1 when the shards do not match their manifest (sft_stack/common/errors.py).
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
from data_pipeline.formats import FORMATS
from data_pipeline.inspect import rejects_summary
from data_pipeline.options import OPTION_KEYS, SECTION_OF, SECTIONS, PrepareOptions, build_options, read_config
from data_pipeline.prepare import LIMIT_OPTIONS, TooManyRejects, merge, prepare
from data_pipeline.schema import SPLITS, DataError, load_manifest, verify_split
from data_pipeline.space import OutOfSpace
from sft_stack.chat.conversation import InputError
from sft_stack.chat.registry import TEMPLATE_NAMES
from sft_stack.common.errors import FAILURE, PREFIX, user_error
from sft_stack.common.strict_config import field_docs

_CONFIG_KEYS = OPTION_KEYS
"""The keys of a prepare YAML: every PrepareOptions field."""
_FLAGLESS = ("sources",)
"""Options without a flag of their own: sources come from --source (repeatable) and --config."""


_SECTIONS_TEXT = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in SECTIONS.items())
_CHOICES_HELP = {"template": f"Templates: {', '.join(TEMPLATE_NAMES)}."}
"""What a field's docstring cannot list itself (the names live in another module)."""


def _flag_help(name: str, doc: str, default: Any) -> str:
    """A field's whole docstring, its choices, its default and its override key; % escaped for argparse."""
    parts = [" ".join(doc.split()), _CHOICES_HELP.get(name, "")]
    if default is not dataclasses.MISSING:
        parts.append(f"Default: {default}.")
    parts.append(f"Override: {SECTION_OF[name]}.{name}=VALUE.")
    return " ".join(part for part in parts if part).replace("%", "%%")


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
        help_text = _flag_help(spec.name, docs[spec.name], default_text or spec.default)
        kw: dict[str, Any] = {"default": None, "help": help_text}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kw["choices"] = typing.get_args(hint)
        elif hint in (int, float, str):
            kw["type"] = hint
        else:
            raise TypeError(f"PrepareOptions.{spec.name}: no flag for type {hint!r}; add it to _FLAGLESS")
        parser.add_argument(flag, **kw)


def _parser(prog: str = "python -m data_pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenize corpora into verified Arrow shards + manifest")
    p.add_argument(
        "--config",
        type=Path,
        help="A prepare YAML whose keys are the options below, flat or under the sections "
        f"{', '.join(SECTIONS)} (see configs/data/).",
    )
    p.add_argument(
        "--source", action="append", default=[], help="A corpus file or MOSS directory; repeat the flag for several."
    )
    p.add_argument(
        "--format",
        help=f"Read every source as this format ({', '.join(FORMATS)}; docs/formats.md) instead of detecting it "
        "from the first records. Default: auto (detect).",
    )
    p.add_argument(
        "--columns",
        help="A column mapping for every source, as field=column pairs: the format's field is read from that "
        "column, e.g. instruction=question,output=answer (docs/formats.md, Column mapping).",
    )
    add_option_flags(p)
    p.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Record the run in MLflow (data_pipeline/tracking.py). Default: on, unless SFT_TRACKING=0.",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="Option overrides, the value parsed as YAML (data.max_seq_len=1024; sections: "
        f"{_SECTIONS_TEXT}); applied after --config and "
        "before the flags. The old flat form (max_seq_len=1024) still works, with a note.",
    )

    i = commands.add_parser("inspect", help="print the manifest summary and one decoded sample")
    i.add_argument("--split", default="train", choices=SPLITS, help="The split to show a row of. Default: train.")
    i.add_argument("out", type=Path, help="A prepared data directory (prepare's --out).")
    i.add_argument("--index", type=int, default=0, help="The row of the split to decode and show. Default: 0.")

    v = commands.add_parser("verify", help="recompute shard hashes and row counts against the manifest")
    v.add_argument("out", type=Path, help="A prepared data directory (prepare's --out).")

    m = commands.add_parser("merge", help="assemble the partial outputs of --num-tasks runs")
    m.add_argument("partials", type=Path, nargs="+", help="The tasks' output directories.")
    m.add_argument("--out", type=Path, required=True, help="The merged output directory.")
    add_option_flags(m, only=LIMIT_OPTIONS, default_text="the tasks' value")
    m.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Record the run in MLflow (data_pipeline/tracking.py). Default: on, unless SFT_TRACKING=0.",
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
        return FAILURE
    shards = sum(len(s.shards) for s in manifest.splits.values())
    rows = sum(s.rows for s in manifest.splits.values())
    print(f"verify: {out}: {shards} shards, {rows} rows match the manifest")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m data_pipeline") -> int:
    args = _parser(prog).parse_args(argv)
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
    except (InputError, DataError, TooManyRejects) as exc:
        return user_error(str(exc))
    except OutOfSpace as exc:
        # Not the user's input: the run failed for want of space (FAILURE); still one line, and nothing is lost.
        print(PREFIX + str(exc), file=sys.stderr)
        return FAILURE
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
