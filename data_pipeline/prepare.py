"""Orchestrate ``prepare``: sources -> records -> blocks -> (tokenize, mask, split, pack, shard) -> manifest.

The unit of work is a *block*: ``block_size`` consecutive samples of the input stream (all sources in order).
The main process reads records in order and cuts them into blocks; each block is processed independently,
in this process or in a worker, into at most one train shard and one val shard, a rejects file and a small
completion record (``OUT/.blocks/NNNNN.json``, a ``blocks.BlockResult``) written last. Because a block's
output depends only on its samples and the options:

- any worker count gives byte-identical shards (results are assembled in block order);
- a re-run after a crash keeps every block whose completion record and shards verify, and redoes the rest;
- ``num_tasks``/``task_index`` take every T-th block, and ``merge`` assembles partial outputs into exactly the
  directory a single run writes;
- packing runs per block and split, so memory is bounded by the block, not the corpus.

This module is the pipeline, top to bottom: ``prepare``, then the records (``iter_samples``, weights, blocks),
then one block's work (``process_block``: parse, encode, split, pack, write). Around it: ``plan`` (the typed plan
and its fingerprint), ``encode`` (template, tokenize, mask, fit), ``pool`` and ``wire`` (threads or a process
pool, block reuse, progress), ``assembly`` (limits, rejects.jsonl, split metadata, manifest, merge).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.assembly import TooManyRejects as TooManyRejects  # re-exported: the API takes these from here
from data_pipeline.assembly import assemble, open_out
from data_pipeline.assembly import merge as merge
from data_pipeline.blocks import BLOCKS_DIR as BLOCKS_DIR
from data_pipeline.blocks import BlockResult, SplitOutput, block_file
from data_pipeline.encode import RAW_CHARS, Sequences, encode
from data_pipeline.formats import Line, convert_line, read_lines, read_records
from data_pipeline.options import PrepareOptions as PrepareOptions
from data_pipeline.options import SourceSpec as SourceSpec
from data_pipeline.pack import pack_bins
from data_pipeline.plan import LIMIT_OPTIONS as LIMIT_OPTIONS
from data_pipeline.plan import Plan, load_tokenizer, make_plan
from data_pipeline.pool import Progress, WorkerState, env, run_blocks
from data_pipeline.schema import IGNORE_INDEX, SPLITS, Manifest, ShardInfo
from data_pipeline.shards import write_shard
from data_pipeline.space import is_out_of_space, out_of_space
from data_pipeline.wire import Sample
from sft_stack.chat.conversation import Conversation, Record, Reject
from sft_stack.common.atomic import write_json_atomic

__all__ = ["BLOCKS_DIR", "LIMIT_OPTIONS", "PrepareOptions", "SourceSpec", "TooManyRejects", "load_tokenizer"]
__all__ += ["make_plan", "merge", "prepare", "process_block"]


def prepare(options: PrepareOptions) -> Manifest:
    """Run the whole preparation; return the manifest written to OUT/manifest.json.

    Raises InputError (before any work) for unusable input, TooManyRejects when the rejected fraction
    exceeds max_bad_fraction (rejects.jsonl written, no manifest), space.OutOfSpace when the output's file system
    is full (temporary files removed; the rerun reuses the finished blocks).
    """
    # One tokenizer thread per process, from the start: workers are the unit of parallelism, and a forked
    # worker must not inherit a tokenizer whose thread pool already ran.
    with env("TOKENIZERS_PARALLELISM", "false"):
        try:
            return _prepare(options)
        except Exception as exc:
            if is_out_of_space(exc):
                raise out_of_space(Path(options.out), exc, "prepare") from exc
            raise


def _prepare(options: PrepareOptions) -> Manifest:
    """The pipeline: plan, open OUT, this task's blocks (each: parse, encode, split, pack, write), assemble."""
    start = time.perf_counter()
    plan, templates = make_plan(options, load_tokenizer(options.tokenizer))
    out = Path(options.out)
    open_out(out, plan)
    state = WorkerState(plan=plan, templates=templates, out=out)
    blocks = _Numbered(_blocks(iter_samples(plan), options.block_size))
    own = ((index, block) for index, block in blocks if index % options.num_tasks == options.task_index)
    progress = Progress(options.progress)
    try:
        results = run_blocks(state, process_block, own, workers=options.workers, progress=progress)
    finally:
        progress.close()
    partial = (options.num_tasks, options.task_index) if options.num_tasks > 1 else None
    # Every block of the whole input, this task's or not: merge checks it has them all.
    write_json_atomic(
        out / BLOCKS_DIR / "done.json",
        {"blocks": blocks.count, "num_tasks": options.num_tasks, "task_index": options.task_index},
    )
    elapsed = time.perf_counter() - start
    timings = {
        "total_s": round(elapsed, 3),
        "workers": float(options.workers),
        "records_per_s": round(progress.records / elapsed, 1),
        "tokens_per_s": round(progress.tokens / elapsed, 1),
    }
    return assemble(out, plan, results, partial=partial, timings=timings, check_rejects=partial is None)


# ------------------------------------------------------------------------------------------ the records


def _unit_hash(*parts: str | int) -> float:
    """A deterministic number in [0, 1) from the parts (blake2b, 64 bits)."""
    body = "\x1f".join(str(p) for p in parts).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "big") / 2.0**64


def _split_hash(seed: int, tokens: bytes) -> float:
    digest = hashlib.blake2b(tokens, digest_size=8, key=seed.to_bytes(8, "big", signed=True)).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _copies(weight: float | None, seed: int, source: int, index: int) -> int:
    if weight is None:
        return 1
    whole = int(weight)
    return whole + (1 if _unit_hash("weight", seed, source, index) < weight - whole else 0)


def iter_samples(plan: Plan) -> Iterator[Sample]:
    """Yield (source position, record) for every sample, sources in order, limits and weights applied."""
    seed = plan.options.seed
    for position, (spec, info) in enumerate(zip(plan.options.sources, plan.sources, strict=True)):
        path = Path(info.path)
        # A weighted source is parsed here: a Reject is never copied, so each record must be known to be one.
        columns, max_bytes = spec.column_map(), plan.options.max_record_bytes
        lines = read_lines(path, info.format, max_bytes, columns) if spec.weight is None else None
        records: Iterator[Record | Line] = (
            lines if lines is not None else read_records(path, info.format, max_bytes, columns)
        )
        for taken, record in enumerate(records):
            if spec.samples is not None and taken >= spec.samples:
                break
            copies = 1 if isinstance(record, Reject) else _copies(spec.weight, seed, position, record.index)
            for _ in range(copies):
                yield position, record


def _blocks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    block: list[Sample] = []
    for sample in samples:
        block.append(sample)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


class _Numbered:
    """(index, block) for each block, counting them: ``count`` is the number seen so far."""

    def __init__(self, blocks: Iterable[list[Sample]]) -> None:
        self.count = 0
        self._blocks = blocks

    def __iter__(self) -> Iterator[tuple[int, list[Sample]]]:
        for index, block in enumerate(self._blocks):
            self.count = index + 1
            yield index, block


# -------------------------------------------------------------------------------------- one block's work


def process_block(state: WorkerState, block: int, read: list[Sample]) -> BlockResult:
    """Turn one block of records into shards, a rejects file and a completion record; return the record."""
    records = [(position, convert_line(r) if isinstance(r, Line) else r) for position, r in read]
    encoded = encode(state.plan, state.templates, records)
    routed = _route(state, block, [position for position, _ in records], encoded)
    splits = {
        split: _write_split(state, state.out / split / f"data-{block:05d}.arrow", sequences, routed.samples[split])
        for split, sequences in routed.per_split.items()
    }
    result = BlockResult(
        block=block,
        plan=state.plan.fingerprint,
        read=len(records),
        written=sum(routed.samples.values()),
        rejected_by_reason=dict(sorted(routed.rejected.items())),
        unanswered_turns_dropped=sum(r.dropped_turns for _, r in records if isinstance(r, Conversation)),
        source_records=tuple(routed.source_records),
        histogram=dict(sorted(routed.histogram.items())),
        splits=splits,
    )
    write_json_atomic(block_file(state.out, block), result.to_dict())
    return result


def _route(state: WorkerState, block: int, positions: list[int], encoded: list[Reject | Sequences]) -> _Routed:
    """Write the block's rejects file; send every other record's sequences to train or val."""
    options = state.plan.options
    routed = _Routed(
        per_split={split: [] for split in SPLITS},
        samples=dict.fromkeys(SPLITS, 0),
        source_records=[0] * len(state.plan.sources),
    )
    rejects_path = block_file(state.out, block, ".rejects.jsonl")
    # backslashreplace: a reject's raw text may hold a lone surrogate (the reason it was rejected), which has no UTF-8
    # form; inside a JSON string it becomes the escape it was read from (\udfff).
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    with open(rejects_tmp, "w", encoding="utf-8", errors="backslashreplace") as rejects:
        for position, outcome in zip(positions, encoded, strict=True):
            routed.source_records[position] += 1
            if isinstance(outcome, Reject):
                routed.rejected[outcome.reason] += 1
                rejects.write(_reject_line(outcome))
                continue
            # The split hashes the record's tokens: identical records always land in the same split, whatever
            # the order, block, worker or task (and no text needs hashing twice).
            tokens = outcome[0][0].tobytes() if len(outcome) == 1 else b"".join(ids.tobytes() for ids, _ in outcome)
            split = "val" if _split_hash(options.seed, tokens) < options.val_fraction else "train"
            routed.samples[split] += 1
            routed.per_split[split].extend(outcome)
            routed.histogram.update(_length_bucket(len(ids)) for ids, _ in outcome)
    os.replace(rejects_tmp, rejects_path)
    return routed


@dataclass(kw_only=True)
class _Routed:
    """A block's encoded records sorted out: sequences per split, and the counts its result reports."""

    per_split: dict[str, Sequences]
    samples: dict[str, int]
    rejected: Counter[str] = field(default_factory=Counter)
    histogram: Counter[str] = field(default_factory=Counter)
    source_records: list[int]


def _reject_line(reject: Reject) -> str:
    body = {
        "source": reject.source,
        "index": reject.index,
        "reason": reject.reason,
        "detail": reject.detail,
        "raw": reject.raw[:RAW_CHARS],
    }
    return json.dumps(body, ensure_ascii=False) + "\n"


def _length_bucket(length: int) -> str:
    bucket = 64
    while bucket < length:
        bucket *= 2
    return f"<={bucket}"


def _write_split(state: WorkerState, path: Path, sequences: Sequences, samples: int) -> SplitOutput:
    """Write one split's sequences of a block as one shard (packed when the options say so)."""
    shard, slots = _pack_and_write(path, sequences, state.plan.options.pack, state.plan.options.max_seq_len)
    return SplitOutput(
        shard=shard,
        samples=samples,
        sequences=len(sequences),
        tokens=sum(len(ids) for ids, _ in sequences),
        loss_tokens=sum(int(np.count_nonzero(labels != IGNORE_INDEX)) for _, labels in sequences),
        slots=slots,
    )


def _pack_and_write(path: Path, sequences: Sequences, pack: bool, max_len: int) -> tuple[ShardInfo | None, int]:
    """Write the sequences as one shard; return (shard or None when empty, row slots)."""
    if not sequences:
        return None, 0
    lengths = [len(ids) for ids, _ in sequences]
    rows = pack_bins(lengths, max_len) if pack else [[i] for i in range(len(sequences))]
    order = [i for row in rows for i in row]
    input_ids = np.concatenate([sequences[i][0] for i in order])
    labels = np.concatenate([sequences[i][1] for i in order])
    # position_ids: 0..len-1 for every sample, so they restart at each packed sample's first token.
    ordered_lengths = np.asarray([lengths[i] for i in order], dtype=np.int64)
    sample_starts = np.cumsum(ordered_lengths) - ordered_lengths
    position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(sample_starts, ordered_lengths)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    shard = write_shard(path, row_lengths, [input_ids, labels, position_ids.astype(np.int32)])
    slots = len(rows) * max_len if pack else sum(lengths)
    return shard, slots
