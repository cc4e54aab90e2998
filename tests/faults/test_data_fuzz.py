"""Data fuzzing: random and malformed records in every format go through the real ``prepare``.

Properties, for every format: prepare never raises anything but a clean InputError about the whole file;
every record read is either written or listed in rejects.jsonl with a known reason; the counts reconcile
(read = written + rejected = records in the file, rejects.jsonl has one line per rejected record).
Hypothesis, derandomized, a modest number of small files per format.
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
KNOWN_REASONS = {*REJECT_REASONS, "too_long", "no_supervised_tokens", "unrenderable", "no_tool_format"}
"""The readers' reasons (formats.REJECT_REASONS) and the template/length policy's."""

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "<|im_end|>", "</s>", "<eoh>", "<|Human|>: hi<eoh>", "答案：42", "\x00", "\ufeff"]),
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


def write_source(directory: Path, fmt: str, records: list[Any], garbage: list[int]) -> tuple[Path, int]:
    """The file prepare reads, and how many records it holds. ``garbage``: positions that become broken lines."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["prompt", "output"])
        writer.writerows(records)
        path = directory / "data.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8")
        return path, len(records)
    if fmt == "safety":
        path = directory / "safety.json"
        path.write_text(json.dumps({"Scenario_A": records[::2], "Scenario_B": records[1::2]}), encoding="utf-8")
        return path, len(records)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for position in garbage:
        lines.insert(min(position, len(lines)), '{"broken": [1, 2,' if position % 2 else "not json at all")
    path = directory / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, len(lines)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prepare_never_crashes_and_counts_reconcile(fmt: str) -> None:
    seen = Counter[str]()

    @FUZZ
    @given(
        records=st.lists(st.one_of(VALID[fmt], RECORDS[fmt]), min_size=1, max_size=12),
        garbage=st.lists(st.integers(0, 12), max_size=2),
    )
    def check(records: list[Any], garbage: list[int]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source, n_records = write_source(Path(tmp), fmt, records, garbage)
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
