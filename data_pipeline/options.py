"""Prepare's options: their one typed definition (``PrepareOptions``, ``SourceSpec``) and how they are built.

A prepare config is YAML whose keys are the ``PrepareOptions`` fields (see configs/data/), flat or grouped under the
sections of ``SECTIONS`` (``data:``, ``limits:``, ``work:``); overrides are ``section.key=value`` like the run
config's (``data.max_seq_len=4096``; the old flat ``max_seq_len=4096`` still works, with a note). It is loaded by
the same strict machinery as the run config (sft_stack/common/strict_config.py): an unknown key, a value of the wrong type
(a quoted ``"512"`` is not an integer) or a contradiction fails in one line that names the key, before any work.
The command-line flags of ``python -m data_pipeline prepare`` are generated from these fields (data_pipeline/cli.py),
so a new option is a new field here and nothing else.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_pipeline.formats import COLUMN_FIELDS, MAX_RECORD_BYTES
from sft_stack.chat.conversation import InputError
from sft_stack.common import strict_config
from sft_stack.common.strict_config import ConfigError, WrongTypeError


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    path: str
    """A corpus file (JSON lines, a JSON array or object, CSV or text; see formats.FORMATS)."""
    format: str = "auto"
    """Format name, or "auto" to detect it from the first records."""
    template: str | None = None
    """Chat template for this source only (None: PrepareOptions.template)."""
    samples: int | None = None
    """Take only the first this many records of the source (None: all). Exclusive with weight."""
    weight: float | None = None
    """Up/down-sample: each record is used floor(weight) times plus once more with probability frac(weight),
    decided by a hash of (seed, source position, record index), so it is deterministic. Exclusive with samples."""
    columns: tuple[str, ...] = ()
    """Column mapping, ``field=column`` pairs: read the format's ``field`` from the record's ``column``, e.g.
    ``instruction=question,output=answer`` for GSM8K's JSON lines (in YAML also a mapping ``{instruction: question}``).
    The fields are formats.COLUMN_FIELDS (JSON-record formats only); a record without a mapped column is rejected
    (missing_field). Detection sees the mapped fields."""

    def __post_init__(self) -> None:
        if self.samples is not None and self.weight is not None:
            raise InputError(f"source {self.path}: give samples or weight, not both")
        if self.samples is not None and self.samples < 0:
            raise InputError(f"source {self.path}: samples must be >= 0")
        if self.weight is not None and self.weight < 0:
            raise InputError(f"source {self.path}: weight must be >= 0")
        self.column_map()  # checks the pairs

    def column_map(self) -> dict[str, str]:
        """``columns`` as field -> column; InputError (one line) for a pair that is no ``field=column`` or a field
        that no format (or not this source's format) reads."""
        fields = COLUMN_FIELDS.get(self.format) if self.format != "auto" else None
        known = fields or tuple(dict.fromkeys(f for names in COLUMN_FIELDS.values() for f in names))
        mapping: dict[str, str] = {}
        for pair in self.columns:
            field, sep, column = pair.partition("=")
            if not sep or not field or not column:
                raise InputError(
                    f"source {self.path}: columns: {pair!r} is not field=column, e.g. instruction=question"
                )
            if field not in known:
                reads = f"the {self.format} format reads" if fields else "the formats read"
                raise InputError(
                    f"source {self.path}: columns: {field!r} is no field {reads}; map one of {', '.join(known)}"
                )
            mapping[field] = column
        if mapping and self.format != "auto" and fields is None:
            raise InputError(f"source {self.path}: columns apply to JSON records; the {self.format} format has none")
        return mapping


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    sources: tuple[SourceSpec, ...]
    """Input corpora, read in this order."""
    tokenizer: str
    """A tokenizer directory (tokenizer.json, or a SentencePiece tokenizer.model converted to a fast tokenizer)."""
    out: str
    """Output directory: train/, val/, manifest.json, rejects.jsonl. Re-running into it resumes."""
    template: str = "auto"
    """Chat template name, or "auto": the template the tokenizer directory records (chat_format in its
    tokenizer_config.json, written by `sft convert`), else the tokenizer's own chat_template ("tokenizer"), else
    "default" (docs/templates.md)."""
    max_seq_len: int = 2048
    """Upper bound on tokens per row; longer samples are handled by `overlong`."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Samples over max_seq_len: truncate (keeping at least one trained token) or drop with reason too_long."""
    last_turn_only: bool = False
    """Train only the last assistant turn of each conversation (earlier turns become context)."""
    pack: bool = False
    """Bin samples into rows of max_seq_len (best-fit decreasing per block); position_ids restart per sample."""
    val_fraction: float = 0.01
    """Fraction of records sent to val/, decided by a hash of (seed, the record's token ids): identical records
    land in the same split and the choice does not depend on order, block size, workers or tasks."""
    max_bad_fraction: float = 0.01
    """Fail (after writing rejects.jsonl, without a manifest) when malformed / read exceeds this. Malformed: every
    reject except the length policy's (LENGTH_REASONS), e.g. malformed_json, empty_user, multimodal,
    no_tool_format. A trailing unanswered user turn is dropped without rejecting its record, and is not counted."""
    max_dropped_fraction: float = 0.1
    """Fail (like max_bad_fraction) when the records dropped by the length policy (too_long: over max_seq_len
    with overlong=drop; no_supervised_tokens: truncation left no assistant token) exceed this fraction of those
    read. They are not bad data but a max_seq_len too small for it: real corpora at usual lengths drop well under
    1%, so 10% stops a run whose max_seq_len is badly off without failing one that merely has a few long
    records."""
    max_record_bytes: int = MAX_RECORD_BYTES
    """Bound on one record's size in bytes (default 4 MiB): a record over it is rejected as too_large before it is
    parsed or tokenized (a JSON line or a file by its bytes, never read whole; a JSON array element by its
    characters as it streams). Tokenizing costs about 250x a record's size in memory, so this bounds what one record
    costs a worker (about 1 GB at the default; docs/data.md, "Memory"). Counted with the length policy's drops."""
    seed: int = 0
    """Seeds the val split and the weight sampling."""
    block_size: int = 8192
    """Samples per block: the unit of work, resume and tasks, the packing window, and at most one shard per
    split. A shard holds at most block_size x max_seq_len tokens per column."""
    workers: int = 1
    """Processes that tokenize blocks (1: in this process). Output is byte-identical for any value."""
    num_tasks: int = 1
    """Split the work into this many tasks (e.g. a SLURM array); each writes a partial OUT for `merge`."""
    task_index: int = 0
    """Which task this is, 0..num_tasks-1: it processes blocks whose index % num_tasks == task_index."""
    progress: bool = True
    """Show a progress bar (records/s, tokens/s) on stderr."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise InputError("prepare: no sources; pass --source PATH (or `sources:` in the --config YAML)")
        checks = [
            (self.max_seq_len >= 2, "max_seq_len", "must be >= 2"),
            (self.overlong in ("truncate", "drop"), "overlong", "must be truncate or drop"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)"),
            (0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction", "must be in [0, 1]"),
            (0.0 <= self.max_dropped_fraction <= 1.0, "max_dropped_fraction", "must be in [0, 1]"),
            (self.max_record_bytes >= 1, "max_record_bytes", "must be >= 1"),
            (self.block_size >= 1, "block_size", "must be >= 1"),
            (self.workers >= 1, "workers", "must be >= 1"),
            (self.num_tasks >= 1, "num_tasks", "must be >= 1"),
            (0 <= self.task_index < self.num_tasks, "task_index", "must be in 0..num_tasks-1"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise InputError(f"prepare option {key}={getattr(self, key)!r} {what}")


OPTION_KEYS = tuple(PrepareOptions.__dataclass_fields__)
"""The keys of a prepare config, in definition order."""
_SOURCE_KEYS = tuple(SourceSpec.__dataclass_fields__)

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": (
        "sources", "tokenizer", "out", "template", "max_seq_len", "overlong", "last_turn_only", "pack",
        "val_fraction", "seed",
    ),
    "limits": ("max_bad_fraction", "max_dropped_fraction", "max_record_bytes"),
    "work": ("block_size", "workers", "num_tasks", "task_index", "progress"),
}  # fmt: skip
"""The sections of prepare's options, for ``section.key=value`` overrides and a sectioned YAML: ``data`` is what
the shards hold (the run config's ``data`` section reads them), ``limits`` when prepare refuses its input,
``work`` how the work is split and shown."""
SECTION_OF = {key: section for section, keys in SECTIONS.items() for key in keys}
"""Option -> its section (tests/unit/test_prepare_options.py checks that every field has exactly one)."""


def _flatten_sections(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A prepare YAML's mapping with its ``data:``/``limits:``/``work:`` sections (if any) merged into one level."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            flat[key] = value
            continue
        if not isinstance(value, dict):
            raise InputError(f"{where}: section {key}: expected a mapping of key: value, got {value!r}")
        unknown = [k for k in value if k not in SECTIONS[key]]
        if unknown:
            raise InputError(
                f"{where}: unknown key {key}.{unknown[0]}; valid keys of {key}: {', '.join(SECTIONS[key])}"
            )
        flat.update(value)
    return flat


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` overrides (the old flat ``key=value`` with a note on stderr), the value parsed as YAML."""
    merged = dict(raw)
    for item in overrides:
        key_path, value = strict_config.parse_override(item)
        section, dot, key = key_path.rpartition(".")
        if not dot:
            if key in SECTION_OF:
                print(
                    f"prepare: note: `{item}` is the old flat form; write `{SECTION_OF[key]}.{item}`",
                    file=sys.stderr,
                )
        elif section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
        elif key not in SECTIONS[section]:
            raise ConfigError(f"unknown key {key_path}; valid keys of {section}: {', '.join(SECTIONS[section])}")
        merged[key] = value
    return merged


def read_config(path: Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The flat mapping of a prepare YAML (or {}) with ``section.key=value`` overrides applied; types are checked
    later, by ``build_options``. InputError in one line for a missing file, bad YAML, or a top level that is no
    mapping."""
    raw: Any = {}
    if path is not None:
        try:
            raw = strict_config.read_yaml(path) or {}
        except ConfigError as exc:
            raise InputError(f"--config {exc}") from None  # the message starts with the path
        if not isinstance(raw, dict):
            raise InputError(f"--config {path}: the top level must be a mapping of option: value")
        raw = _flatten_sections(raw, f"--config {path}")
    try:
        return _apply_overrides(raw, overrides)
    except ConfigError as exc:
        raise InputError(f"prepare: {exc}") from None


def _source_entries(sources: Any, where: str) -> list[Any]:
    """A config's ``sources``: a list whose items are paths (a path alone is a source with default options)."""
    if sources is None:
        return []
    if not isinstance(sources, list | tuple):
        raise InputError(f"{where}: sources must be a list of paths or mappings")
    entries: list[Any] = []
    for entry in sources:
        if isinstance(entry, str | Path):
            entries.append({"path": str(entry)})
        elif isinstance(entry, dict):
            columns = entry.get("columns")
            if isinstance(columns, dict):  # the YAML mapping form, {field: column}
                entry = {**entry, "columns": [f"{field}={column}" for field, column in columns.items()]}
            entries.append(entry)
        else:
            raise InputError(
                f"{where}: sources: each source is a path or a mapping with path: (and {', '.join(_SOURCE_KEYS[1:])})"
            )
    return entries


def build_options(raw: Mapping[str, Any], where: str) -> PrepareOptions:
    """PrepareOptions from a flat mapping (the YAML, overrides and flags merged), strictly: an unknown key or a
    wrong type is an InputError of one line naming the key, prefixed by ``where`` (e.g. ``--config prep.yaml``)."""
    body = {**raw, "sources": _source_entries(raw.get("sources"), where)}
    try:
        return strict_config.build_dataclass(PrepareOptions, body)
    except WrongTypeError as exc:
        # prepare's phrasing since before the shared loader: `key=value must be ...`
        raise InputError(f"{where}: {exc.key}={exc.value!r} must be {exc.expected}") from None
    except ConfigError as exc:
        raise InputError(f"{where}: {exc}") from None
