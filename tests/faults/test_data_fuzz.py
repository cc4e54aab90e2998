"""Data fuzzing: random and malformed records in every format go through the real ``prepare``.

Properties, for every format: prepare never raises anything but a clean InputError about the whole file;
every record read is either written or listed in rejects.jsonl with a known reason; the counts reconcile
(read = written + rejected = records in the file, rejects.jsonl has one line per rejected record).
Hypothesis, derandomized, a modest number of small files per format.

The records carry what used to crash prepare: lone UTF-16 surrogates (as JSON escapes, and as raw bytes that are
no UTF-8), strings over max_record_bytes, lines of 100,000 nested brackets, random bytes; the JSON formats are
also written as a JSON array behind a UTF-8 byte-order mark. Peak memory on a huge record is measured in
tests/faults/test_prepare_faults.py.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.formats import FORMATS, REJECT_REASONS
from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from sft_stack.chat.conversation import InputError

pytestmark = pytest.mark.faults

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny_llama"
FUZZ = settings(derandomize=True, max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
MAX_RECORD_BYTES = 4096
"""max_record_bytes of the fuzzed prepares: the HUGE strings are over it."""
KNOWN_REASONS = {*REJECT_REASONS, "too_long", "no_supervised_tokens", "unrenderable", "no_tool_format"}
"""The readers' reasons (formats.REJECT_REASONS) and the template/length policy's."""

HUGE = st.integers(MAX_RECORD_BYTES + 1, 3 * MAX_RECORD_BYTES).map("y".__mul__)
text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "<|im_end|>", "</s>", "<eoh>", "<|Human|>: hi<eoh>", "答案：42", "\x00", "\ufeff"]),
    st.sampled_from(["x\ud800y", "\udfff", "a\ud83d"]),  # lone surrogates: valid JSON escapes, no UTF-8 text
    HUGE,
)
anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
value = st.one_of(text, text, text, anything)
"""Mostly strings (what the formats expect), sometimes any JSON value."""


def fields(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A record with a random subset of ``keys`` (usually all) holding random values."""
    return st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)).flatmap(
        lambda chosen: st.fixed_dictionaries({k: value for k in (chosen if len(chosen) > 1 else keys)})
    )


def turns(key: str, item: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({key: st.one_of(st.lists(item, max_size=4), anything)})


ROLES = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bogus", ""])
RECORDS: dict[str, st.SearchStrategy[Any]] = {
    "alpaca": fields(["instruction", "input", "output", "system", "history"]),
    "firefly": fields(["input", "target", "kind"]),
    "moss": st.fixed_dictionaries(
        {
            "conversation_id": st.integers(0, 9),
            "meta_instruction": value,
            "num_turns": st.integers(0, 3),
            "chat": st.dictionaries(
                st.sampled_from(["turn_1", "turn_2", "turn_x"]),
                fields(["Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS"]),
                max_size=2,
            ),
        }
    ),
    "conversation": turns("conversation", fields(["human", "assistant", "system"])),
    "sharegpt": turns("conversations", st.fixed_dictionaries({"from": ROLES, "value": value})),
    "messages": turns("messages", st.fixed_dictionaries({"role": ROLES, "content": value})),
    "safety": fields(["prompt", "response", "type"]),
    "csv": st.tuples(text, text),
    "text": fields(["text", "meta"]),
}
words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30).filter(str.strip)
"""Content a valid record can carry: any text with something besides white space."""
VALID: dict[str, st.SearchStrategy[Any]] = {
    "alpaca": st.fixed_dictionaries({"instruction": words, "input": text, "output": words}),
    "firefly": st.fixed_dictionaries({"input": words, "target": words}),
    "moss": st.tuples(words, words).map(
        lambda t: {
            "conversation_id": 1,
            "meta_instruction": "You are MOSS.",
            "num_turns": 1,
            "chat": {
                "turn_1": {
                    "Human": f"<|Human|>: {t[0]}<eoh>\n",
                    "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                    "Commands": "<|Commands|>: None<eoc>\n",
                    "Tool Responses": "<|Results|>: None<eor>\n",
                    "MOSS": f"<|MOSS|>: {t[1]}<eom>\n",
                }
            },
        }
    ),
    "conversation": st.tuples(words, words).map(lambda t: {"conversation": [{"human": t[0], "assistant": t[1]}]}),
    "sharegpt": st.tuples(words, words).map(
        lambda t: {"conversations": [{"from": "human", "value": t[0]}, {"from": "gpt", "value": t[1]}]}
    ),
    "messages": st.tuples(words, words).map(
        lambda t: {"messages": [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]}
    ),
    "safety": st.fixed_dictionaries({"prompt": words, "response": words, "type": st.just("Ethics")}),
    "csv": st.tuples(words, words),
    "text": st.fixed_dictionaries({"text": words}),
}
assert set(RECORDS) == set(VALID) == set(FORMATS), "a format without a fuzz strategy"


DEEP = b"[" * 100_000 + b"]" * 100_000
"""100,000 nested arrays: RecursionError in the standard library's parser, the square of it in ijson's prefixes."""
GARBAGE_KINDS = ("broken", "not_json", "deep_unclosed", "deep_value", "bytes")
garbage_lines = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from(GARBAGE_KINDS), st.binary(max_size=40)), max_size=3
)


def garbage_line(kind: str, payload: bytes) -> bytes:
    match kind:
        case "broken":
            return b'{"broken": [1, 2,'
        case "not_json":
            return b"not json at all"
        case "deep_unclosed":
            return b"[" * 100_000
        case "deep_value":
            return b'{"messages": ' + DEEP + b', "text": "t", "instruction": "i", "output": "o"}'
        case _:
            return b"\x01" + payload.replace(b"\n", b"\x01")  # random bytes, never a blank line


def write_source(
    directory: Path, fmt: str, records: list[Any], garbage: list[tuple[int, str, bytes]], as_array: bool
) -> tuple[Path, int]:
    """The file prepare reads, and how many records it holds. ``garbage``: (position, kind, random bytes) of lines
    that are not records (broken JSON, deep nesting, random bytes); ``as_array``: a JSON array after a BOM."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["prompt", "output"])
        writer.writerows(records)
        path = directory / "data.csv"
        # A lone surrogate has no UTF-8 form: written as "?", as any text editor would.
        path.write_bytes(buffer.getvalue().encode("utf-8", errors="replace"))
        return path, len(records)
    if fmt == "safety":
        path = directory / "safety.json"
        path.write_text(json.dumps({"Scenario_A": records[::2], "Scenario_B": records[1::2]}), encoding="utf-8")
        return path, len(records)
    if as_array:
        items = [json.dumps(r).encode() for r in records]
        for position, kind, _ in garbage:
            if kind.startswith("deep"):
                items.insert(min(position, len(items)), DEEP)  # valid JSON, too deep: a reject
        path = directory / "data.json"
        path.write_bytes(b"\xef\xbb\xbf[" + b",\n".join(items) + b"]")
        return path, len(items)
    # Even lines escape non-ASCII (a surrogate as \\ud800), odd ones write it raw (a surrogate: bytes no UTF-8 reads).
    lines = [
        json.dumps(r, ensure_ascii=n % 2 == 0).encode("utf-8", errors="surrogatepass") for n, r in enumerate(records)
    ]
    for position, kind, payload in garbage:
        # A file opening with "[" is read as one JSON array: keep those lines off the first line.
        at = position if kind in ("broken", "not_json") else max(position, 1)
        lines.insert(min(at, len(lines)), garbage_line(kind, payload))
    path = directory / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_never_crashes_and_counts_reconcile(fmt: str) -> None:
    seen = Counter[str]()

    @FUZZ
    @given(
        records=st.lists(st.one_of(VALID[fmt], RECORDS[fmt]), min_size=1, max_size=12),
        garbage=garbage_lines,
        as_array=st.booleans() if fmt not in ("csv", "safety") else st.just(False),
    )
    def check(records: list[Any], garbage: list[tuple[int, str, bytes]], as_array: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source, n_records = write_source(Path(tmp), fmt, records, garbage, as_array)
            out = Path(tmp) / "out"
            options = PrepareOptions(
                sources=(SourceSpec(path=str(source), format=fmt),),
                tokenizer=str(TINY),
                out=str(out),
                template="qwen",
                max_seq_len=64,
                val_fraction=0.2,
                max_bad_fraction=1.0,
                max_dropped_fraction=1.0,
                max_record_bytes=MAX_RECORD_BYTES,
                block_size=8,
                progress=False,
            )
            try:
                manifest = prepare(options)
            except InputError as exc:  # a problem with the whole file, reported cleanly
                assert str(source) in str(exc) and "\n" not in str(exc), exc
                seen["refused"] += 1
                return
            counts = manifest.counts
            seen["written"] += counts["samples_written"]
            seen["rejected"] += counts["samples_rejected"]
            seen.update({f"reason:{reason}": n for reason, n in counts["rejected_by_reason"].items()})
            assert counts["samples_read"] == n_records
            assert counts["samples_read"] == counts["samples_written"] + counts["samples_rejected"]
            rejects = [
                json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").split("\n") if line
            ]
            assert len(rejects) == counts["samples_rejected"]
            assert all(r["reason"] in KNOWN_REASONS and r["source"] == str(source) for r in rejects), rejects
            assert sum(counts["rejected_by_reason"].values()) == counts["samples_rejected"]
            assert sum(split.samples for split in manifest.splits.values()) == counts["samples_written"]

    check()
    # Not vacuous: for every format some generated records were written and some rejected.
    assert seen["written"] > 0 and seen["rejected"] > 0, seen
    print(fmt, dict(seen))
