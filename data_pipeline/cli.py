"""``python -m data_pipeline prepare|inspect|verify|merge`` (also the ``sft-data`` console script).

Every error a user can cause ends the command with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from data_pipeline import tracking
from data_pipeline.conversation import InputError
from data_pipeline.inspect import rejects_summary
from data_pipeline.prepare import PrepareOptions, SourceSpec, TooManyRejects, merge, prepare
from data_pipeline.schema import SPLITS, DataError, load_manifest, verify_split

# Flags whose value, when given, overrides the same key of the --config YAML.
_OPTION_FLAGS = {
    "tokenizer": str,
    "out": str,
    "template": str,
    "max_seq_len": int,
    "overlong": str,
    "val_fraction": float,
    "max_bad_fraction": float,
    "max_dropped_fraction": float,
    "seed": int,
    "block_size": int,
    "workers": int,
    "num_tasks": int,
    "task_index": int,
}
_SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(SourceSpec))
_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(PrepareOptions))


def _check_type(value: Any, annotation: Any, key: str, where: str) -> None:
    """Refuse a YAML value of the wrong type for a PrepareOptions/SourceSpec field, naming the key.

    YAML gives strings for quoted numbers and booleans ("5", "false"); those are refused rather than coerced,
    so `pack: "false"` cannot silently mean true.
    """
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return
        annotation = next(o for o in options if o is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(map(str, typing.get_args(annotation)))
            raise InputError(f"{where}: {key}={value!r} must be one of {choices}")
        return
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[annotation]
    if not ok:
        raise InputError(f"{where}: {key}={value!r} must be {expected}")


def _check_types(values: dict[str, Any], cls: type, where: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key != "sources":
            _check_type(value, hints[key], key, where)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="tokenize corpora into verified Arrow shards + manifest")
    p.add_argument("--config", type=Path, help="YAML with the same options (and per-source format/template/...)")
    p.add_argument("--source", action="append", default=[], help="corpus file or MOSS directory (repeatable)")
    p.add_argument("--format", help="force this format for every --source (default: detect)")
    p.add_argument("--tokenizer", help="tokenizer directory")
    p.add_argument("--out", help="output directory (re-running into it resumes)")
    p.add_argument("--template", help="chat template name, or auto")
    p.add_argument("--max-seq-len", type=int, help="max tokens per row (default 2048)")
    p.add_argument("--overlong", choices=("truncate", "drop"), help="what to do with longer samples")
    p.add_argument("--last-turn-only", action="store_true", default=None, help="train only the last turn")
    p.add_argument("--pack", action="store_true", default=None, help="pack samples into rows of --max-seq-len")
    p.add_argument("--workers", type=int, help="tokenizing processes (default 1)")
    p.add_argument("--val-fraction", type=float, help="fraction of records for val/ (default 0.01)")
    p.add_argument(
        "--max-bad-fraction", type=float, help="fail above this fraction of malformed records (default 0.01)"
    )
    p.add_argument(
        "--max-dropped-fraction",
        type=float,
        help="fail above this fraction of records dropped by the length policy (default 0.1)",
    )
    p.add_argument("--seed", type=int, help="seed of the val split and weights (default 0)")
    p.add_argument("--block-size", type=int, help="samples per block/shard/packing window (default 8192)")
    p.add_argument("--num-tasks", type=int, help="split the work into this many tasks (then `merge`)")
    p.add_argument("--task-index", type=int, help="this task's index, 0..num-tasks-1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record the run in MLflow (default: on unless SFT_TRACKING=0; see data_pipeline/tracking.py)",
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
    m.add_argument("--max-bad-fraction", type=float, help="override the tasks' threshold")
    m.add_argument("--max-dropped-fraction", type=float, help="override the tasks' threshold")
    m.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="record the run in MLflow (default: on unless SFT_TRACKING=0; see data_pipeline/tracking.py)",
    )
    return parser


def _load_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"--config {path}: the top level must be a mapping of option: value")
    unknown = sorted(set(raw) - set(_CONFIG_KEYS))
    if unknown:
        raise InputError(f"--config {path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_CONFIG_KEYS)}")
    _check_types(raw, PrepareOptions, f"--config {path}")
    if not isinstance(raw.get("sources", []), (list, type(None))):
        raise InputError(f"--config {path}: sources must be a list of paths or mappings")
    return raw


def _source_spec(entry: Any, where: str) -> SourceSpec:
    if isinstance(entry, str):
        return SourceSpec(path=entry)
    if not isinstance(entry, dict) or "path" not in entry:
        raise InputError(
            f"{where}: sources: each source is a path or a mapping with path: (and {', '.join(_SOURCE_KEYS[1:])})"
        )
    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown source key(s) {', '.join(unknown)}; valid: {', '.join(_SOURCE_KEYS)}")
    _check_types(entry, SourceSpec, f"{where}: source {entry['path']!r}")
    return SourceSpec(**entry)


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """PrepareOptions from the YAML (if any) overridden by the flags given on the command line."""
    values: dict[str, Any] = _load_config(args.config) if args.config else {}
    where = f"--config {args.config}" if args.config else "--source"
    sources = [_source_spec(s, where) for s in values.pop("sources", []) or []]
    sources += [SourceSpec(path=p) for p in args.source]
    if args.format:
        sources = [dataclasses.replace(s, format=args.format) for s in sources]
    for key, kind in _OPTION_FLAGS.items():
        if getattr(args, key) is not None:
            values[key] = kind(getattr(args, key))
    for key in ("last_turn_only", "pack"):
        if getattr(args, key):
            values[key] = True
    if args.no_progress:
        values["progress"] = False
    for key in ("tokenizer", "out"):
        if key not in values:
            raise InputError(f"prepare: --{key} is required (or `{key}:` in the --config YAML)")
    try:
        return PrepareOptions(sources=tuple(sources), **values)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from exc


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
    except (InputError, DataError, TooManyRejects) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
