"""``inspect OUT``: the manifest summary and one row decoded, trained spans marked, packed samples separated."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from data_pipeline.schema import IGNORE_INDEX, REJECTS_FILE, DataError, Manifest, load_manifest, load_split

TRAINED_START, TRAINED_END = "[[", "]]"
"""Marks around trained (loss-carrying) spans when the output is not a terminal."""
ANSI_TRAINED, ANSI_RESET, ANSI_DIM = "\x1b[1;32m", "\x1b[0m", "\x1b[2m"


def summary(manifest: Manifest, out: Path) -> list[str]:
    counts = manifest.counts
    lines = [
        f"{out}  (schema {manifest.schema_version}, template {manifest.template}, max_seq_len {manifest.max_seq_len}, "
        f"packed {manifest.packed}, packing efficiency {manifest.packing_efficiency:.4f})",
        f"tokenizer {manifest.tokenizer_path}  fingerprint {manifest.tokenizer_fingerprint[:16]}",
        "sources:",
        *(
            f"  {s.path}  [{s.format}]  {s.records} records  {s.size} bytes  sha256 {s.sha256[:16]}"
            for s in manifest.sources
        ),
        f"samples: read {counts['samples_read']}, written {counts['samples_written']}, "
        f"rejected {counts['samples_rejected']}; tokens {counts['tokens']}, loss tokens {counts['loss_tokens']}",
    ]
    if counts["rejected_by_reason"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
        lines.append(f"rejected by reason: {reasons}  (see {out / REJECTS_FILE})")
    lines.extend(rejects_summary(counts))
    lines.append("lengths: " + ", ".join(f"{k}: {v}" for k, v in manifest.length_histogram.items()))
    for name, split in manifest.splits.items():
        lines.append(
            f"{name}: {split.rows} rows in {len(split.shards)} shards, {split.samples} samples, "
            f"{split.tokens} tokens, {split.loss_tokens} loss tokens"
        )
    return lines


def rejects_summary(counts: dict[str, Any]) -> list[str]:
    """The malformed records, the length policy's drops and the dropped unanswered turns: one line each, with
    count and share of the records read (manifests written before these counts existed show none)."""
    read = max(int(counts["samples_read"]), 1)
    lines = []
    for key, what in (
        ("samples_malformed", "malformed (limit --max-bad-fraction)"),
        ("samples_dropped_by_length", "dropped by the length policy (limit --max-dropped-fraction)"),
    ):
        if key in counts:
            lines.append(f"{what}: {counts[key]} records, {counts[key] / read:.2%} of those read")
    if counts.get("unanswered_turns_dropped"):
        lines.append(
            f"unanswered user turns dropped at the end of a record (the record kept): {counts['unanswered_turns_dropped']}"
        )
    return lines


def _spans(labels: list[int], start: int, stop: int) -> list[tuple[int, int, bool]]:
    """Maximal runs [a, b) of tokens in [start, stop) that are all trained or all untrained."""
    spans: list[tuple[int, int, bool]] = []
    a = start
    for b in range(start + 1, stop + 1):
        if b == stop or (labels[b] != IGNORE_INDEX) != (labels[a] != IGNORE_INDEX):
            spans.append((a, b, labels[a] != IGNORE_INDEX))
            a = b
    return spans


def render_row(input_ids: list[int], labels: list[int], position_ids: list[int], decode: object, color: bool) -> str:
    """One row as text: each packed sample on its own, trained spans in green (tty) or [[brackets]]."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    bounds = [*starts, len(input_ids)]
    parts: list[str] = []
    for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
        trained = sum(1 for label in labels[start:stop] if label != IGNORE_INDEX)
        header = f"--- sample {number} of {len(starts)}: tokens {start}..{stop - 1} ({stop - start} tokens, {trained} trained) ---"
        parts.append(f"{ANSI_DIM}{header}{ANSI_RESET}" if color else header)
        text = []
        for a, b, is_trained in _spans(labels, start, stop):
            piece = decode(input_ids[a:b])  # type: ignore[operator]
            if is_trained:
                piece = f"{ANSI_TRAINED}{piece}{ANSI_RESET}" if color else f"{TRAINED_START}{piece}{TRAINED_END}"
            text.append(piece)
        parts.append("".join(text))
    return "\n".join(parts)


def inspect_output(out: Path, *, split: str = "train", index: int = 0, color: bool = False) -> str:
    """The text `inspect` prints: summary, then row ``index`` of ``split`` decoded."""
    manifest = load_manifest(out)
    lines = summary(manifest, out)
    rows = manifest.splits[split].rows
    if rows == 0:
        return "\n".join([*lines, f"{split} is empty: no row to show"])
    if not 0 <= index < rows:
        raise DataError(f"inspect: --index {index} is out of range; {out / split} has rows 0..{rows - 1}")
    row = load_split(out, split, manifest)[index]
    from data_pipeline.prepare import load_tokenizer

    tokenizer = load_tokenizer(manifest.tokenizer_path)

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=False))

    lines.append(f"{split} row {index} ({len(row['input_ids'])} tokens; trained spans marked):")
    lines.append(render_row(row["input_ids"], row["labels"], row["position_ids"], decode, color))
    return "\n".join(lines)
