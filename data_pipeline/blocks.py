"""A block's completion record: ``BlockResult``, its on-disk form ``OUT/.blocks/NNNNN.json``, and the check that a
finished block's files still verify.

prepare (data_pipeline/prepare.py) writes a block's shards, then its rejects, then this record last; resume reuses
a block whose record parses and whose shards match their sha256, and ``merge`` assembles the records of all
tasks. The JSON keys are the dataclass fields, unchanged since the records were plain dicts, so outputs written
before the type existed resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.schema import SPLITS, ShardInfo, sha256_file

BLOCKS_DIR = ".blocks"
"""Per-block completion records, rejects and the plan, inside OUT. What resume and merge read."""


@dataclass(frozen=True, kw_only=True)
class SplitOutput:
    """One split's share of one block's output."""

    shard: ShardInfo | None
    """The block's shard of this split; None when none of the block's samples landed in it."""
    samples: int
    """Records that landed in this split."""
    sequences: int
    """Sequences written: one per conversation, one per max_seq_len chunk of a text record."""
    tokens: int
    """Real tokens of those sequences."""
    loss_tokens: int
    """Tokens whose label is not IGNORE_INDEX."""
    slots: int
    """Token slots of the rows: rows x max_seq_len when packed, else tokens (packing efficiency = tokens / slots)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SplitOutput:
        shard = raw["shard"]
        counts = {key: int(raw[key]) for key in ("samples", "sequences", "tokens", "loss_tokens", "slots")}
        return cls(shard=None if shard is None else ShardInfo(**shard), **counts)


@dataclass(frozen=True, kw_only=True)
class BlockResult:
    """What one block produced. On disk it is the block's completion record, OUT/.blocks/NNNNN.json, written after
    its shards and rejects: what resume reuses and merge assembles."""

    block: int
    """The block's index in the whole input (all tasks)."""
    plan: str
    """Fingerprint of the plan it was made under; a record of another plan is never reused."""
    read: int
    """Samples of the block (records after samples/weight, rejects included)."""
    written: int
    """Samples written to a split (read minus rejected)."""
    rejected_by_reason: dict[str, int]
    """Rejected samples by reason, sorted by reason."""
    unanswered_turns_dropped: int = 0
    """Trailing user turns nobody answered, dropped without rejecting their record. Absent (0) in completion
    records written before it was counted; those are still reused."""
    source_records: tuple[int, ...]
    """Samples of the block per source, in source order."""
    histogram: dict[str, int]
    """Sequence lengths by power of two ("<=64": n, ...)."""
    splits: dict[str, SplitOutput]
    """Output per split (train, val)."""

    @property
    def tokens(self) -> int:
        return sum(part.tokens for part in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["source_records"] = list(self.source_records)
        return body

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BlockResult:
        """Read a completion record back; KeyError/TypeError/ValueError when it is not one."""
        return cls(
            block=int(raw["block"]),
            plan=str(raw["plan"]),
            read=int(raw["read"]),
            written=int(raw["written"]),
            rejected_by_reason={str(k): int(n) for k, n in raw["rejected_by_reason"].items()},
            unanswered_turns_dropped=int(raw.get("unanswered_turns_dropped", 0)),
            source_records=tuple(int(n) for n in raw["source_records"]),
            histogram={str(k): int(n) for k, n in raw["histogram"].items()},
            splits={split: SplitOutput.from_dict(raw["splits"][split]) for split in SPLITS},
        )


def block_file(out: Path, block: int, suffix: str = ".json") -> Path:
    """A block's file under OUT/.blocks: its completion record (.json) or its rejects (.rejects.jsonl)."""
    return out / BLOCKS_DIR / f"{block:05d}{suffix}"


def completed_block(out: Path, block: int, fingerprint: str) -> BlockResult | None:
    """The completion record of a finished block of the plan ``fingerprint`` whose files all verify, else None
    (the block is redone)."""
    path = block_file(out, block)
    if not path.is_file() or not block_file(out, block, ".rejects.jsonl").is_file():
        return None
    try:
        result = BlockResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # torn or foreign: redo the block rather than trust it
    if result.plan != fingerprint:
        return None
    for split, info in result.splits.items():
        if info.shard is not None:
            file = out / split / info.shard.file
            if not file.is_file() or sha256_file(file) != info.shard.sha256:
                return None
    return result
