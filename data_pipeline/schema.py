"""The contract between data preparation and training.

This is the one module of ``data_pipeline`` that ``trainer`` imports: what a prepared row holds, what
the manifest says, how a tokenizer is fingerprinted, and how a prepared split is opened and verified.
Keep it free of heavy imports at module level other than pyarrow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sft_stack.common.labels import IGNORE_INDEX as IGNORE_INDEX  # the trainer and the shards read it here

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

SCHEMA_VERSION = 1
"""Bumped whenever the columns or the manifest change meaning; the trainer refuses other versions."""

COLUMNS = ("input_ids", "labels", "position_ids")
"""Columns of every shard, each a list of int32 per row. ``position_ids`` restart at 0 at every packed sample."""

ARROW_SCHEMA = pa.schema([pa.field(name, pa.list_(pa.int32())) for name in COLUMNS])

MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
SPLITS = ("train", "val")


class DataError(Exception):
    """A prepared data directory that cannot be used; the message names the file and what to do."""


def is_plain_file_name(name: object) -> bool:
    """True for a name that stays inside its folder when joined to it: no separator, not "", "." or "..".

    Names read from disk (a manifest's shards, a block record's) are checked with it before any path is built:
    a crafted ``"../../x.arrow"`` would otherwise be read, hashed or written outside the output."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    file: str
    """File name inside the split directory; a plain name (is_plain_file_name), checked when read."""
    rows: int
    """Number of rows (packed rows when packing is on)."""
    sha256: str
    """Hex sha256 of the file's bytes."""

    def __post_init__(self) -> None:
        if not is_plain_file_name(self.file):
            raise ValueError(f"shard file {self.file!r} is not a plain file name inside its split folder")
        if not isinstance(self.rows, int) or isinstance(self.rows, bool) or self.rows < 0:
            raise ValueError(f"shard {self.file}: rows {self.rows!r} is not a count")


@dataclass(frozen=True, kw_only=True)
class SourceInfo:
    path: str
    """Path of the source file as given to ``prepare``."""
    size: int
    """Size in bytes."""
    sha256: str
    """Hex sha256 of the file's bytes."""
    format: str
    """Format the file was read as (detected or forced)."""
    records: int
    """Records read from this source (after any per-source sample limit)."""


@dataclass(frozen=True, kw_only=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]
    """Shards of this split, in order."""
    rows: int
    """Sum of the shards' rows."""
    samples: int
    """Samples in this split (before packing)."""
    tokens: int
    """Real (non-padding) tokens in this split."""
    loss_tokens: int
    """Tokens whose label is not IGNORE_INDEX."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    schema_version: int
    """SCHEMA_VERSION of the writer."""
    sources: tuple[SourceInfo, ...]
    """Every input file, with its hash."""
    tokenizer_fingerprint: str
    """``tokenizer_fingerprint()`` of the tokenizer used; the trainer checks it against the model's."""
    tokenizer_path: str
    """Tokenizer directory as given to ``prepare`` (informational)."""
    template: str
    """Name of the chat template used to render conversations."""
    packed: bool
    """True when rows hold several samples separated by position_ids restarts."""
    max_seq_len: int
    """Upper bound on row length in tokens."""
    options: dict[str, Any]
    """Every prepare option, as resolved."""
    counts: dict[str, Any]
    """samples_read, samples_written, samples_rejected, rejected_by_reason, tokens, loss_tokens."""
    length_histogram: dict[str, int]
    """Sample lengths in tokens, bucketed by power of two ("<=64", "<=128", ...)."""
    packing_efficiency: float
    """Real tokens / row slots (1.0 when not packed)."""
    splits: dict[str, SplitInfo]
    """Per split ("train", "val") shard list and counts."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall-clock measurements; the only part of the manifest that differs between identical runs."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """The manifest of a parsed manifest.json; ValueError/TypeError/KeyError naming what is wrong otherwise."""
        if not isinstance(raw, dict):
            raise ValueError("the top level is not an object")
        if not isinstance(raw.get("splits"), dict):
            raise ValueError(f"'splits' is {type(raw.get('splits')).__name__}, not an object of split -> shards")
        if not isinstance(raw.get("sources"), list):
            raise ValueError(f"'sources' is {type(raw.get('sources')).__name__}, not a list")
        splits = {
            name: SplitInfo(
                shards=tuple(ShardInfo(**s) for s in split["shards"]),
                **{k: v for k, v in split.items() if k != "shards"},
            )
            for name, split in raw["splits"].items()
        }
        sources = tuple(SourceInfo(**s) for s in raw["sources"])
        rest = {k: v for k, v in raw.items() if k not in ("splits", "sources")}
        return cls(splits=splits, sources=sources, **rest)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines the shards' content (not timings)."""
        body = dataclasses.asdict(self)
        body.pop("timings")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_manifest(data_dir: str | Path) -> Manifest:
    """Read ``data_dir/manifest.json``; raise DataError with the path and a remedy when unusable."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `python -m data_pipeline prepare --out {data_dir} ...` first")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
        manifest = Manifest.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # ValueError: bad JSON, not UTF-8, bad names
        raise DataError(f"{path}: unreadable manifest ({exc}); re-run prepare into a fresh directory") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema version {manifest.schema_version}, this code reads {SCHEMA_VERSION}; re-run prepare"
        )
    return manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def count_arrow_rows(path: str | Path) -> int:
    """Rows of an Arrow IPC stream file as written by ``datasets`` (memory-mapped, no copy)."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        return sum(batch.num_rows for batch in reader)


def verify_split(data_dir: str | Path, split: str, manifest: Manifest) -> list[str]:
    """Return one problem line per shard whose bytes or row count differ from the manifest, and for a split without
    shards or whose rows are not the sum of its shards' (empty: all good)."""
    problems: list[str] = []
    split_dir = Path(data_dir) / split
    info = manifest.splits[split]
    manifest_path = Path(data_dir) / MANIFEST_FILE
    if not info.shards:
        # prepare writes an empty split as one shard of zero rows; none at all is a damaged manifest.
        problems.append(f"{manifest_path}: split {split!r} lists no shards; re-run prepare into a fresh directory")
    total = sum(shard.rows for shard in info.shards)
    if info.rows != total:
        problems.append(
            f"{manifest_path}: split {split!r} claims {info.rows} rows, its shards hold {total}; the manifest was "
            "modified: re-run prepare into a fresh directory"
        )
    for shard in info.shards:
        path = split_dir / shard.file
        if not path.is_file():
            problems.append(f"{path}: missing (manifest lists it); re-run prepare into this directory")
            continue
        digest = sha256_file(path)
        if digest != shard.sha256:
            problems.append(f"{path}: sha256 {digest[:12]}… != manifest {shard.sha256[:12]}…; the shard was modified")
            continue
        rows = count_arrow_rows(path)
        if rows != shard.rows:
            problems.append(f"{path}: {rows} rows != manifest {shard.rows}")
    return problems


def load_split(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> datasets.Dataset:
    """Open a prepared split as one memory-mapped ``datasets.Dataset``, shards in manifest order."""
    import datasets

    manifest = manifest or load_manifest(data_dir)
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise DataError(f"{Path(data_dir) / split}: split {split!r} is empty in {MANIFEST_FILE}")
    parts = [datasets.Dataset.from_file(str(Path(data_dir) / split / s.file)) for s in manifest.splits[split].shards]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def rejects_summary(data_dir: str | Path, manifest: Manifest | None, examples_per_reason: int = 3) -> dict[str, Any]:
    """Rejected-record counts by reason (from the manifest) and the first few examples of each reason."""
    examples: dict[str, list[Any]] = {}
    path = Path(data_dir) / REJECTS_FILE
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle):
                if line_no >= 100_000:  # a summary, not a copy: stop reading a huge rejects file early
                    break
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                reason = str(row.get("reason", "unknown")) if isinstance(row, dict) else "unknown"
                bucket = examples.setdefault(reason, [])
                if len(bucket) < examples_per_reason:
                    bucket.append(row)
    counts = dict(manifest.counts.get("rejected_by_reason", {})) if manifest else {}
    total = manifest.counts.get("samples_rejected") if manifest else None
    return {"samples_rejected": total, "rejected_by_reason": counts, "examples": examples}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides token ids: the vocabulary (added tokens included) and the special tokens.

    It survives ``save_pretrained``/``from_pretrained`` round trips, so a model exported by the trainer
    still matches the data it was trained on.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    body = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()
