"""Orchestrate ``prepare``: sources -> records -> blocks -> (tokenize, mask, split, pack, shard) -> manifest.

The unit of work is a *block*: ``block_size`` consecutive samples of the input stream (all sources in order).
The main process reads records in order and cuts them into blocks; each block is processed independently,
in this process or in a worker, into at most one train shard and one val shard, a rejects file and a small
completion record (``OUT/.blocks/NNNNN.json``, a ``blocks.BlockResult``) written last. Because a block's output depends only on its
samples and the options:

- any worker count gives byte-identical shards (results are assembled in block order);
- a re-run after a crash keeps every block whose completion record and shards verify, and redoes the rest;
- ``num_tasks``/``task_index`` take every T-th block, and ``merge`` assembles partial outputs into exactly the
  directory a single run writes;
- packing runs per block and split, so memory is bounded by the block, not the corpus.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import sft_stack.common.tokenizer
from data_pipeline.blocks import BLOCKS_DIR as BLOCKS_DIR  # re-exported: tests and tools name it from here
from data_pipeline.blocks import BlockResult, SplitOutput, block_file, completed_block
from data_pipeline.formats import Line, convert_line, read_lines, read_records
from data_pipeline.options import PrepareOptions as PrepareOptions  # re-exported: the API takes it from here
from data_pipeline.options import SourceSpec as SourceSpec
from data_pipeline.pack import pack_bins
from data_pipeline.schema import (
    IGNORE_INDEX,
    MANIFEST_FILE,
    REJECTS_FILE,
    SCHEMA_VERSION,
    SPLITS,
    Manifest,
    ShardInfo,
    SourceInfo,
    SplitInfo,
    sha256_file,
    tokenizer_fingerprint,
)
from data_pipeline.shards import link_or_copy, write_shard, write_split_metadata
from data_pipeline.space import is_out_of_space, out_of_space
from sft_stack.chat.conversation import Conversation, InputError, Message, Record, Reject, Text, ToolCall
from sft_stack.common.atomic import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sft_stack.chat.templates import ChatTemplate

RAW_CHARS = 500
"""Raw record text kept per line of rejects.jsonl."""
# Options that change nothing in the output; they are not part of the manifest or the plan fingerprint.
EXECUTION_OPTIONS = ("out", "workers", "progress", "num_tasks", "task_index")
# Options that only decide pass/fail: in the manifest, not in the plan fingerprint (changing them keeps the blocks).
LIMIT_OPTIONS = ("max_bad_fraction", "max_dropped_fraction")
LENGTH_REASONS = ("too_long", "no_supervised_tokens", "too_large")
"""Reject reasons of the length policy (max_seq_len, overlong, max_record_bytes): records dropped whole, not malformed
ones."""


class TooManyRejects(Exception):
    """The malformed fraction exceeded ``max_bad_fraction``, or the fraction dropped by the length policy exceeded
    ``max_dropped_fraction``; rejects.jsonl is written, the manifest is not."""


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything resolved before any work; what decides the output bytes is hashed into `fingerprint`."""

    sources: tuple[SourceInfo, ...]
    """Sources with size, sha256 and resolved format; records is 0 here (counted per block)."""
    specs: tuple[SourceSpec, ...]
    templates: tuple[str, ...]
    """Resolved template name per source."""
    template: str
    """Resolved name of PrepareOptions.template."""
    tokenizer_path: str
    tokenizer_fingerprint: str
    options: dict[str, Any]
    """The manifest's options: every PrepareOptions field except EXECUTION_OPTIONS."""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        return cls(
            sources=tuple(SourceInfo(**s) for s in raw["sources"]),
            specs=tuple(SourceSpec(**s) for s in raw["specs"]),
            templates=tuple(raw["templates"]),
            template=raw["template"],
            tokenizer_path=raw["tokenizer_path"],
            tokenizer_fingerprint=raw["tokenizer_fingerprint"],
            options=raw["options"],
            fingerprint=raw["fingerprint"],
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The ``--tokenizer`` directory's tokenizer (common.tokenizer, the one loader); InputError (one line) when it
    does not load."""
    try:
        return sft_stack.common.tokenizer.load_tokenizer(path)
    except sft_stack.common.tokenizer.TokenizerError as exc:
        raise InputError(f"--tokenizer {exc}") from exc


def _digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a source file; of a directory source (MOSS), over its files' names and hashes."""
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return {"size": sum(p.stat().st_size for p in files), "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def make_plan(options: PrepareOptions, tokenizer: PreTrainedTokenizerBase) -> tuple[Plan, dict[str, ChatTemplate]]:
    """Check every input (files, formats, templates) and hash the sources; InputError on the first problem.

    Returns the plan and its templates by resolved name."""
    from data_pipeline.formats import COLUMN_FIELDS, FORMATS, detect_format
    from sft_stack.chat.templates import resolve_template

    formats: list[str] = []
    for spec in options.sources:
        path = Path(spec.path)
        if not path.exists():
            raise InputError(f"--source {spec.path}: no such file or directory; check the path")
        if spec.format == "auto":
            formats.append(detect_format(path, spec.column_map()))
        elif spec.format in FORMATS:
            formats.append(spec.format)
        else:
            raise InputError(f"--format {spec.format!r} for {spec.path}: unknown; choose one of {', '.join(FORMATS)}")
        if spec.columns and (formats[-1] not in COLUMN_FIELDS or path.suffix.lower() == ".txt"):
            raise InputError(f"source {spec.path}: columns apply to JSON records; a {formats[-1]} file has none")
    resolved: dict[str, ChatTemplate] = {}
    names: list[str] = []
    for requested in (options.template, *(spec.template or options.template for spec in options.sources)):
        template = resolve_template(requested, tokenizer) if requested not in resolved else resolved[requested]
        resolved[requested] = resolved[template.name] = template
        names.append(template.name)
    default_template, templates = names[0], tuple(names[1:])
    sources = tuple(
        SourceInfo(path=spec.path, **_digest(Path(spec.path)), format=fmt, records=0)
        for spec, fmt in zip(options.sources, formats, strict=True)
    )
    manifest_options = {k: v for k, v in dataclasses.asdict(options).items() if k not in EXECUTION_OPTIONS}
    plan = Plan(
        sources=sources,
        specs=options.sources,
        templates=templates,
        template=default_template,
        tokenizer_path=options.tokenizer,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        options=manifest_options,
    )
    body = plan.to_dict()
    # The limits only decide pass/fail, not the shards: changing them must not invalidate finished blocks.
    body["options"] = {k: v for k, v in body["options"].items() if k not in LIMIT_OPTIONS}
    body.pop("specs")  # already inside options
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    templates_by_name = {name: resolved[name] for name in sorted(set(templates))}
    return dataclasses.replace(plan, fingerprint=digest), templates_by_name


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


Sample = tuple[int, Record | Line]
"""(source position, record). A JSON line is left unparsed (a Line) until the block is processed: parsing in the
process that tokenizes keeps the reading process cheap, so it does not compete with the workers for cores."""


def iter_samples(plan: Plan) -> Iterator[Sample]:
    """Yield (source position, record) for every sample, sources in order, limits and weights applied."""
    seed = int(plan.options["seed"])
    for position, (spec, info) in enumerate(zip(plan.specs, plan.sources, strict=True)):
        path = Path(info.path)
        # A weighted source is parsed here: a Reject is never copied, so each record must be known to be one.
        columns, max_bytes = spec.column_map(), int(plan.options["max_record_bytes"])
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


# -------------------------------------------------------------------------------------- one block's work


@dataclass(frozen=True, kw_only=True)
class WorkerState:
    """What processing a block needs; built once per process."""

    plan: Plan
    templates: dict[str, ChatTemplate]
    out: Path


_STATE: WorkerState | None = None


def _init_worker(state: WorkerState) -> None:
    global _STATE
    # One tokenizer thread per worker process: workers are the unit of parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE = state


Wire = tuple[Any, ...]
"""A record as sent to a worker: plain tuples pickle about 4x faster than the frozen dataclasses."""


def _to_wire(records: list[Sample]) -> list[Wire]:
    wire: list[Wire] = []
    for position, r in records:
        if isinstance(r, Line):
            wire.append(("l", position, r.source, r.index, r.fmt, r.data))
        elif isinstance(r, Conversation):
            messages = tuple(
                (m.role, m.content, tuple((c.name, c.arguments) for c in m.tool_calls), m.name) for m in r.messages
            )
            wire.append(("c", position, r.source, r.index, messages, r.tools, r.dropped_turns))
        elif isinstance(r, Text):
            wire.append(("t", position, r.source, r.index, r.text))
        else:
            wire.append(("r", position, r.source, r.index, r.reason, r.raw, r.detail))
    return wire


def _from_wire(wire: list[Wire]) -> list[Sample]:
    records: list[Sample] = []
    for item in wire:
        kind, position, source, index = item[:4]
        record: Record | Line
        if kind == "l":
            record = Line(source=source, fmt=item[4], index=index, data=item[5])
        elif kind == "c":
            messages = tuple(
                Message(
                    role=role,
                    content=content,
                    tool_calls=tuple(ToolCall(name=n, arguments=a) for n, a in calls),
                    name=name,
                )
                for role, content, calls, name in item[4]
            )
            record = Conversation(messages=messages, source=source, index=index, tools=item[5], dropped_turns=item[6])
        elif kind == "t":
            record = Text(text=item[4], source=source, index=index)
        else:
            record = Reject(reason=item[4], source=source, index=index, raw=item[5], detail=item[6])
        records.append((position, record))
    return records


def _process_in_worker(job: tuple[int, list[Wire]]) -> BlockResult:
    assert _STATE is not None, "worker not initialized"
    return process_block(_STATE, job[0], _from_wire(job[1]))


def _raw_of(record: Conversation | Text) -> str:
    if isinstance(record, Text):
        return record.text[:RAW_CHARS]
    body = [
        {
            "role": m.role,
            "content": m.content,
            **({"tool_calls": [dataclasses.asdict(c) for c in m.tool_calls]} if m.tool_calls else {}),
        }
        for m in record.messages
    ]
    return json.dumps(body, ensure_ascii=False)[:RAW_CHARS]


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


def _encode(
    state: WorkerState, records: list[tuple[int, Record]]
) -> list[Reject | list[tuple[np.ndarray, np.ndarray]]]:
    """Tokenize and mask every record: a Reject, or the record's sequences as (input_ids, labels) arrays."""
    from sft_stack.chat.templates import fit_length_arrays

    options = state.plan.options
    max_len = int(options["max_seq_len"])
    results: list[Reject | list[tuple[np.ndarray, np.ndarray]]] = [
        record if isinstance(record, Reject) else [] for _, record in records
    ]
    # Records are grouped by (template, kind) so each template sees one batch call.
    groups: dict[tuple[str, bool], list[int]] = {}
    for slot, (position, record) in enumerate(records):
        if not isinstance(record, Reject):
            groups.setdefault((state.plan.templates[position], isinstance(record, Text)), []).append(slot)
    for (name, is_text), slots in sorted(groups.items()):
        template = state.templates[name]
        if is_text:
            texts = [records[s][1] for s in slots]
            token_lists = template.encode_text_batch([t.text for t in texts if isinstance(t, Text)])
            for slot, ids in zip(slots, token_lists, strict=True):
                if not ids:
                    text = records[slot][1]
                    assert isinstance(text, Text)
                    results[slot] = Reject(
                        reason="empty_text", source=text.source, index=text.index, raw=_raw_of(text), detail=""
                    )
                    continue
                array = np.asarray(ids, dtype=np.int32)
                results[slot] = [
                    (array[i : i + max_len], array[i : i + max_len]) for i in range(0, len(array), max_len)
                ]
            continue
        convs = [c for c in (records[s][1] for s in slots) if isinstance(c, Conversation)]
        encoded = template.encode_batch_arrays(convs, last_turn_only=bool(options["last_turn_only"]))
        for slot, conv, enc in zip(slots, convs, encoded, strict=True):
            if isinstance(enc, Reject):
                results[slot] = enc
                continue
            fitted = fit_length_arrays(enc, max_len, options["overlong"])
            if isinstance(fitted, str):
                detail = f"{len(enc[0])} tokens, max_seq_len {max_len}, overlong={options['overlong']}"
                results[slot] = Reject(
                    reason=fitted, source=conv.source, index=conv.index, raw=_raw_of(conv), detail=detail
                )
            else:
                results[slot] = [fitted]
    return results


def _write_split(
    path: Path, sequences: list[tuple[np.ndarray, np.ndarray]], pack: bool, max_len: int
) -> tuple[ShardInfo | None, int]:
    """Write one split's sequences of a block as one shard; return (shard or None when empty, row slots)."""
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


def process_block(state: WorkerState, block: int, read: list[Sample]) -> BlockResult:
    """Turn one block of records into shards, a rejects file and a completion record; return the record."""
    records = [(position, convert_line(r) if isinstance(r, Line) else r) for position, r in read]
    options = state.plan.options
    max_len = int(options["max_seq_len"])
    seed = int(options["seed"])
    val_fraction = float(options["val_fraction"])
    encoded = _encode(state, records)

    per_split: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLITS}
    samples = dict.fromkeys(SPLITS, 0)
    rejected: Counter[str] = Counter()
    histogram: Counter[str] = Counter()
    source_records = [0] * len(state.plan.sources)
    rejects_path = block_file(state.out, block, ".rejects.jsonl")
    # backslashreplace: a reject's raw text may hold a lone surrogate (the reason it was rejected), which has no UTF-8
    # form; inside a JSON string it becomes the escape it was read from (\udfff).
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    with open(rejects_tmp, "w", encoding="utf-8", errors="backslashreplace") as rejects:
        for (position, _record), outcome in zip(records, encoded, strict=True):
            source_records[position] += 1
            if isinstance(outcome, Reject):
                rejected[outcome.reason] += 1
                rejects.write(_reject_line(outcome))
                continue
            # The split hashes the record's tokens: identical records always land in the same split, whatever
            # the order, block, worker or task (and no text needs hashing twice).
            tokens = outcome[0][0].tobytes() if len(outcome) == 1 else b"".join(ids.tobytes() for ids, _ in outcome)
            split = "val" if _split_hash(seed, tokens) < val_fraction else "train"
            samples[split] += 1
            per_split[split].extend(outcome)
            histogram.update(_length_bucket(len(ids)) for ids, _ in outcome)
    os.replace(rejects_tmp, rejects_path)

    splits: dict[str, SplitOutput] = {}
    for split, sequences in per_split.items():
        shard, slots = _write_split(
            state.out / split / f"data-{block:05d}.arrow", sequences, bool(options["pack"]), max_len
        )
        splits[split] = SplitOutput(
            shard=shard,
            samples=samples[split],
            sequences=len(sequences),
            tokens=sum(len(ids) for ids, _ in sequences),
            loss_tokens=sum(int(np.count_nonzero(labels != IGNORE_INDEX)) for _, labels in sequences),
            slots=slots,
        )
    result = BlockResult(
        block=block,
        plan=state.plan.fingerprint,
        read=len(records),
        written=sum(samples.values()),
        rejected_by_reason=dict(sorted(rejected.items())),
        unanswered_turns_dropped=sum(r.dropped_turns for _, r in records if isinstance(r, Conversation)),
        source_records=tuple(source_records),
        histogram=dict(sorted(histogram.items())),
        splits=splits,
    )
    write_json_atomic(block_file(state.out, block), result.to_dict())
    return result


def _check_limits(out: Path, plan: Plan, read: int, rejected_by_reason: dict[str, int]) -> None:
    """Raise TooManyRejects, naming the flag that accepts the rejects, when a limit is exceeded."""
    if not read:
        return
    length = {k: n for k, n in rejected_by_reason.items() if k in LENGTH_REASONS}
    malformed = {k: n for k, n in rejected_by_reason.items() if k not in LENGTH_REASONS}
    for what, counts, flag, hint in (
        ("rejected as malformed", malformed, "max_bad_fraction", "fix the records or"),
        ("dropped by the length policy", length, "max_dropped_fraction", "raise --max-seq-len, or"),
    ):
        total, limit = sum(counts.values()), float(plan.options[flag])
        if total / read > limit:
            top = ", ".join(f"{reason} {n}" for reason, n in Counter(counts).most_common(3))
            accept = math.ceil(total / read * 100) / 100
            option = "--" + flag.replace("_", "-")
            raise TooManyRejects(
                f"prepare: {total} of {read} records {what} ({total / read:.1%} > {option} {limit}); top reasons: "
                f"{top}; see {out / REJECTS_FILE}. To go on, {hint} rerun the same command with {option} {accept}: "
                "the rerun reuses the finished work (blocks already written are not redone)"
            )


# ------------------------------------------------------------------------------------------- the output


def _open_out(out: Path, plan: Plan) -> None:
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
        _check_limits(out, plan, sum(r.read for r in results), _sum_counters(r.rejected_by_reason for r in results))
    splits = _assemble_splits(out, results)
    counts = _counts(results, splits)
    slots = sum(p.slots for r in results for p in r.splits.values())
    source_records = [sum(r.source_records[i] for r in results) for i in range(len(plan.sources))]
    options = dict(plan.options)
    if partial is not None:
        options["num_tasks"], options["task_index"] = partial
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        sources=tuple(dataclasses.replace(s, records=n) for s, n in zip(plan.sources, source_records, strict=True)),
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        tokenizer_path=plan.tokenizer_path,
        template=plan.template,
        packed=bool(plan.options["pack"]),
        max_seq_len=int(plan.options["max_seq_len"]),
        options=options,
        counts=counts,
        length_histogram=_histogram_sorted(_sum_counters(r.histogram for r in results)),
        packing_efficiency=round(counts["tokens"] / slots, 6) if slots else 1.0,
        splits=splits,
        timings=timings,
    )
    write_text_atomic(out / MANIFEST_FILE, manifest.to_json())
    return manifest


# ------------------------------------------------------------------------------------------- the driver


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@dataclass
class _Progress:
    """Records and tokens done, shown as a tqdm bar on stderr."""

    enabled: bool
    records: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    bar: Any = None

    def __post_init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(unit="rec", unit_scale=True, file=sys.stderr, disable=not self.enabled, desc="prepare")

    def update(self, result: BlockResult) -> None:
        self.records += result.read
        self.tokens += result.tokens
        self.bar.update(result.read)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run_blocks(options: PrepareOptions, state: WorkerState, progress: _Progress) -> tuple[list[BlockResult], int]:
    """Process this task's blocks (reusing verified ones); return their results and the total block count."""
    results: list[BlockResult] = []
    seen = [0]  # blocks in the whole input, this task's or not: merge checks it has them all

    def own_blocks() -> Iterator[tuple[int, list[Sample]]]:
        for index, block in enumerate(_blocks(iter_samples(state.plan), options.block_size)):
            seen[0] = index + 1
            if index % options.num_tasks == options.task_index:
                yield index, block

    jobs = own_blocks()

    def reuse_or_none(index: int) -> BlockResult | None:
        done = completed_block(state.out, index, state.plan.fingerprint)
        if done is not None:
            progress.update(done)
        return done

    executor: concurrent.futures.Executor
    if options.workers == 1:
        # One process, two threads: the Rust tokenizer releases the GIL while it encodes, so one block's
        # tokenization overlaps the other block's Python work (template assembly, packing, writing) and the
        # reading of the next block. Each block writes only its own files, so threads share nothing else.
        # On a single core the threads would only take turns (and thrash the cache): then one thread.
        _init_worker(state)
        threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="prepare-block")

        def submit(index: int, block: list[Sample]) -> concurrent.futures.Future[BlockResult]:
            return executor.submit(process_block, state, index, block)

    else:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        executor = concurrent.futures.ProcessPoolExecutor(
            options.workers, mp_context=context, initializer=_init_worker, initargs=(state,)
        )

        def submit(index: int, block: list[Sample]) -> concurrent.futures.Future[BlockResult]:
            return executor.submit(_process_in_worker, (index, _to_wire(block)))

    pending: deque[concurrent.futures.Future[BlockResult]] = deque()
    with executor:
        try:
            for index, block in jobs:
                done = reuse_or_none(index)
                if done is not None:
                    results.append(done)
                    continue
                # At most two blocks per worker in flight: bounded memory, workers never idle.
                while len(pending) >= 2 * options.workers:
                    results.append(pending.popleft().result())
                    progress.update(results[-1])
                pending.append(submit(index, block))
            while pending:
                results.append(pending.popleft().result())
                progress.update(results[-1])
        except BaseException:
            # One block failed (a full disk, a Ctrl-C): start no other, and let the running ones end before the
            # caller cleans up, so no worker writes a temporary file after that.
            executor.shutdown(wait=True, cancel_futures=True)
            raise
    return results, seen[0]


def prepare(options: PrepareOptions) -> Manifest:
    """Run the whole preparation; return the manifest written to OUT/manifest.json.

    Raises InputError (before any work) for unusable input, TooManyRejects when the rejected fraction
    exceeds max_bad_fraction (rejects.jsonl written, no manifest), space.OutOfSpace when the output's file system
    is full (temporary files removed; the rerun reuses the finished blocks).
    """
    # One tokenizer thread per process, from the start: workers are the unit of parallelism, and a forked
    # worker must not inherit a tokenizer whose thread pool already ran.
    with _env("TOKENIZERS_PARALLELISM", "false"):
        try:
            return _prepare(options)
        except Exception as exc:
            if is_out_of_space(exc):
                raise out_of_space(Path(options.out), exc, "prepare") from exc
            raise


def _prepare(options: PrepareOptions) -> Manifest:
    start = time.perf_counter()
    tokenizer = load_tokenizer(options.tokenizer)
    plan, templates = make_plan(options, tokenizer)
    out = Path(options.out)
    _open_out(out, plan)
    state = WorkerState(plan=plan, templates=templates, out=out)
    progress = _Progress(options.progress)
    try:
        results, total = _run_blocks(options, state, progress)
    finally:
        progress.close()
    partial = (options.num_tasks, options.task_index) if options.num_tasks > 1 else None
    write_json_atomic(
        out / BLOCKS_DIR / "done.json",
        {"blocks": total, "num_tasks": options.num_tasks, "task_index": options.task_index},
    )
    elapsed = time.perf_counter() - start
    timings = {
        "total_s": round(elapsed, 3),
        "workers": float(options.workers),
        "records_per_s": round(progress.records / elapsed, 1),
        "tokens_per_s": round(progress.tokens / elapsed, 1),
    }
    return assemble(out, plan, results, partial=partial, timings=timings, check_rejects=partial is None)


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
        plans.append(Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8"))))
        dones.append(json.loads(done_path.read_text(encoding="utf-8")))
    plan = plans[0]
    for part, other in zip(partials, plans, strict=True):
        if other.fingerprint != plan.fingerprint:
            raise InputError(f"merge: {part} was prepared with different sources or options than {partials[0]}")
    num_tasks, blocks = dones[0]["num_tasks"], dones[0]["blocks"]
    tasks = sorted(d["task_index"] for d in dones)
    if tasks != list(range(num_tasks)) or any(d["num_tasks"] != num_tasks for d in dones):
        raise InputError(f"merge: need exactly one output per task 0..{num_tasks - 1}, got task indices {tasks}")
    for key, value in (("max_bad_fraction", max_bad_fraction), ("max_dropped_fraction", max_dropped_fraction)):
        if value is not None:
            plan = dataclasses.replace(plan, options={**plan.options, key: value})

    _open_out(out, plan)
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
