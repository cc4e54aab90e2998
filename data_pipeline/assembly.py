"""Assembling an output from block results: the limits on rejects, rejects.jsonl, the split metadata and the
manifest; opening (or resuming into) an output directory; merging the partial outputs of ``num_tasks`` runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.blocks import BLOCKS_DIR, BlockResult, block_file, completed_block
from data_pipeline.plan import Plan
from data_pipeline.schema import MANIFEST_FILE, REJECTS_FILE, SCHEMA_VERSION, SPLITS, Manifest, SplitInfo
from data_pipeline.shards import link_or_copy, write_shard, write_split_metadata
from data_pipeline.space import is_out_of_space, out_of_space
from sft_stack.chat.conversation import InputError
from sft_stack.common.atomic import write_json_atomic, write_text_atomic

LENGTH_REASONS = ("too_long", "no_supervised_tokens", "too_large")
"""Reject reasons of the length policy (max_seq_len, overlong, max_record_bytes): records dropped whole, not malformed
ones."""


class TooManyRejects(Exception):
    """The malformed fraction exceeded ``max_bad_fraction``, or the fraction dropped by the length policy exceeded
    ``max_dropped_fraction``; rejects.jsonl is written, the manifest is not."""


def check_limits(out: Path, plan: Plan, read: int, rejected_by_reason: dict[str, int]) -> None:
    """Raise TooManyRejects, naming the flag that accepts the rejects, when a limit is exceeded."""
    if not read:
        return
    length = {k: n for k, n in rejected_by_reason.items() if k in LENGTH_REASONS}
    malformed = {k: n for k, n in rejected_by_reason.items() if k not in LENGTH_REASONS}
    for what, counts, flag, hint in (
        ("rejected as malformed", malformed, "max_bad_fraction", "fix the records or"),
        ("dropped by the length policy", length, "max_dropped_fraction", "raise --max-seq-len, or"),
    ):
        total, limit = sum(counts.values()), float(getattr(plan.options, flag))
        if total / read > limit:
            top = ", ".join(f"{reason} {n}" for reason, n in Counter(counts).most_common(3))
            accept = math.ceil(total / read * 100) / 100
            option = "--" + flag.replace("_", "-")
            raise TooManyRejects(
                f"prepare: {total} of {read} records {what} ({total / read:.1%} > {option} {limit}); top reasons: "
                f"{top}; see {out / REJECTS_FILE}. To go on, {hint} rerun the same command with {option} {accept}: "
                "the rerun reuses the finished work (blocks already written are not redone)"
            )


def open_out(out: Path, plan: Plan) -> None:
    """Create OUT, or check that an existing OUT was written by the same plan (then resume into it)."""
    plan_path = out / BLOCKS_DIR / "plan.json"
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") != plan.fingerprint:
            raise InputError(
                f"--out {out}: holds output of different sources or options; choose a new --out or delete it"
            )
    elif out.exists() and not _is_fresh(out):
        raise InputError(f"--out {out}: exists and is not a prepare output; choose a new or empty directory")
    for sub in (BLOCKS_DIR, *SPLITS):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    write_json_atomic(plan_path, plan.to_dict())


def _is_fresh(out: Path) -> bool:
    """True when ``out`` is empty, or holds only the empty folders a run that stopped before writing its plan (a
    full disk) leaves."""
    return all(sub.name in (BLOCKS_DIR, *SPLITS) and sub.is_dir() and not any(sub.iterdir()) for sub in out.iterdir())


def _sum_counters(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def _histogram_sorted(histogram: dict[str, int]) -> dict[str, int]:
    return dict(sorted(histogram.items(), key=lambda kv: int(kv[0][2:])))


def _join_rejects(out: Path, results: Sequence[BlockResult]) -> None:
    """OUT/rejects.jsonl: the blocks' rejects files, in block order."""
    with open(out / (REJECTS_FILE + ".tmp"), "wb") as rejects:
        for result in results:
            with open(block_file(out, result.block, ".rejects.jsonl"), "rb") as part:
                rejects.write(part.read())
    os.replace(out / (REJECTS_FILE + ".tmp"), out / REJECTS_FILE)


def _assemble_splits(out: Path, results: Sequence[BlockResult]) -> dict[str, SplitInfo]:
    """Each split's metadata and totals over the blocks' shards."""
    splits: dict[str, SplitInfo] = {}
    for split in SPLITS:
        parts = [r.splits[split] for r in results]
        shards = tuple(p.shard for p in parts if p.shard is not None)
        if not shards:
            # load_from_disk needs at least one file: an empty split is one shard of zero rows.
            empty = np.zeros(0, dtype=np.int32)
            shards = (write_shard(out / split / "data-empty.arrow", [], [empty, empty, empty]),)
        write_split_metadata(out / split, shards)
        splits[split] = SplitInfo(
            shards=shards,
            rows=sum(s.rows for s in shards),
            samples=sum(p.samples for p in parts),
            tokens=sum(p.tokens for p in parts),
            loss_tokens=sum(p.loss_tokens for p in parts),
        )
    return splits


def _counts(results: Sequence[BlockResult], splits: dict[str, SplitInfo]) -> dict[str, Any]:
    """The manifest's counts over all blocks."""
    rejected_by_reason = _sum_counters(r.rejected_by_reason for r in results)
    rejected = sum(rejected_by_reason.values())
    dropped = sum(n for reason, n in rejected_by_reason.items() if reason in LENGTH_REASONS)
    return {
        "samples_read": sum(r.read for r in results),
        "samples_written": sum(r.written for r in results),
        "samples_rejected": rejected,
        "rejected_by_reason": rejected_by_reason,
        "samples_malformed": rejected - dropped,
        "samples_dropped_by_length": dropped,
        "unanswered_turns_dropped": sum(r.unanswered_turns_dropped for r in results),
        "sequences": sum(p.sequences for r in results for p in r.splits.values()),
        "rows": sum(s.rows for s in splits.values()),
        "tokens": sum(s.tokens for s in splits.values()),
        "loss_tokens": sum(s.loss_tokens for s in splits.values()),
    }


def assemble(
    out: Path,
    plan: Plan,
    results: Sequence[BlockResult],
    *,
    partial: tuple[int, int] | None,
    timings: dict[str, float],
    check_rejects: bool,
) -> Manifest:
    """Write rejects.jsonl, the split metadata and manifest.json from block results (in block order)."""
    results = sorted(results, key=lambda r: r.block)
    _join_rejects(out, results)
    if check_rejects:
        check_limits(out, plan, sum(r.read for r in results), _sum_counters(r.rejected_by_reason for r in results))
    splits = _assemble_splits(out, results)
    counts = _counts(results, splits)
    slots = sum(p.slots for r in results for p in r.splits.values())
    source_records = [sum(r.source_records[i] for r in results) for i in range(len(plan.sources))]
    options = plan.manifest_options()
    if partial is not None:
        options["num_tasks"], options["task_index"] = partial
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        sources=tuple(dataclasses.replace(s, records=n) for s, n in zip(plan.sources, source_records, strict=True)),
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        tokenizer_path=plan.tokenizer_path,
        template=plan.template,
        packed=plan.options.pack,
        max_seq_len=plan.options.max_seq_len,
        options=options,
        counts=counts,
        length_histogram=_histogram_sorted(_sum_counters(r.histogram for r in results)),
        packing_efficiency=round(counts["tokens"] / slots, 6) if slots else 1.0,
        splits=splits,
        timings=timings,
    )
    write_text_atomic(out / MANIFEST_FILE, manifest.to_json())
    return manifest


def merge(
    partials: Sequence[Path],
    out: Path,
    *,
    max_bad_fraction: float | None = None,
    max_dropped_fraction: float | None = None,
) -> Manifest:
    """Assemble the partial outputs of all tasks into ``out``: the directory a single run would have written.

    space.OutOfSpace (temporary files removed) when ``out``'s file system is full."""
    try:
        return _merge(partials, out, max_bad_fraction=max_bad_fraction, max_dropped_fraction=max_dropped_fraction)
    except Exception as exc:
        if is_out_of_space(exc):
            raise out_of_space(out, exc, "merge") from exc
        raise


def _merge(
    partials: Sequence[Path],
    out: Path,
    *,
    max_bad_fraction: float | None,
    max_dropped_fraction: float | None,
) -> Manifest:
    start = time.perf_counter()
    if not partials:
        raise InputError("merge: no partial outputs given")
    plans: list[Plan] = []
    dones: list[dict[str, Any]] = []
    for part in partials:
        plan_path, done_path = part / BLOCKS_DIR / "plan.json", part / BLOCKS_DIR / "done.json"
        if not plan_path.is_file() or not done_path.is_file():
            raise InputError(f"merge: {part} is not a finished prepare output (no {BLOCKS_DIR}/done.json); run it")
        plans.append(Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")), part))
        dones.append(json.loads(done_path.read_text(encoding="utf-8")))
    plan = plans[0]
    for part, other in zip(partials, plans, strict=True):
        if other.fingerprint != plan.fingerprint:
            raise InputError(f"merge: {part} was prepared with different sources or options than {partials[0]}")
    num_tasks, blocks = dones[0]["num_tasks"], dones[0]["blocks"]
    tasks = sorted(d["task_index"] for d in dones)
    if tasks != list(range(num_tasks)) or any(d["num_tasks"] != num_tasks for d in dones):
        raise InputError(f"merge: need exactly one output per task 0..{num_tasks - 1}, got task indices {tasks}")
    options = dataclasses.replace(
        plan.options,
        out=str(out),
        max_bad_fraction=plan.options.max_bad_fraction if max_bad_fraction is None else max_bad_fraction,
        max_dropped_fraction=plan.options.max_dropped_fraction
        if max_dropped_fraction is None
        else max_dropped_fraction,
    )
    plan = dataclasses.replace(plan, options=options)

    open_out(out, plan)
    results = []
    for part, done in zip(partials, dones, strict=True):
        for block in range(done["task_index"], blocks, num_tasks):
            result = completed_block(part, block, plan.fingerprint)
            if result is None:
                raise InputError(
                    f"merge: {part}: block {block} is missing, fails verification or names a shard outside its "
                    "folder; re-run that task"
                )
            for split, info in result.splits.items():
                if info.shard is not None:
                    link_or_copy(part / split / info.shard.file, out / split / info.shard.file)
            for suffix in (".rejects.jsonl", ".json"):
                link_or_copy(block_file(part, block, suffix), block_file(out, block, suffix))
            results.append(result)
    write_json_atomic(out / BLOCKS_DIR / "done.json", {"blocks": blocks, "num_tasks": 1, "task_index": 0})
    timings = {"total_s": round(time.perf_counter() - start, 3)}
    return assemble(out, plan, results, partial=None, timings=timings, check_rejects=True)
