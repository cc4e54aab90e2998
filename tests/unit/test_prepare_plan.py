"""The prepare plan: typed options inside, the same fingerprint as before the typed engine.

Resumable blocks and byte-identical output across runs, tasks and merges depend on the plan fingerprint staying
the same for the same options, so it is pinned here for fixed option sets (values the dict-based plan gave)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.formats import Line
from data_pipeline.plan import Plan
from data_pipeline.prepare import PrepareOptions, SourceSpec, load_tokenizer, make_plan
from data_pipeline.wire import Sample, from_wire, to_wire
from sft_stack.chat.conversation import Conversation, Message, Reject, Text, ToolCall

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests/fixtures/tiny_llama"
RECORDS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
]

OPTION_SETS: dict[str, dict[str, object]] = {
    "defaults": {},
    "packed": {"pack": True, "max_seq_len": 64, "seed": 7, "val_fraction": 0.25, "overlong": "drop"},
    "limits_and_execution": {"max_bad_fraction": 0.5, "max_dropped_fraction": 0.9, "workers": 2, "block_size": 3},
    "source_options": {"last_turn_only": True, "max_record_bytes": 4096, "template": "qwen"},
}
FINGERPRINTS = {
    "defaults": "bd69e2367c8fef7fa9e89bc7a955d561fa99e19eed8164e6d82900f67472379d",
    "packed": "7af8378b04f951f03f1151125334da93741da283ead26093a929f4a03944cdb1",
    "limits_and_execution": "5c8ea59f0d33eaf458afafc3055bf355a9e19951343a80cbf480d30f3aaa1ba8",
    "source_options": "9c2204c184aeb82825846c3debb57701f340c6713961b90d675b9b834523afa2",
}
"""Computed by the dict-based plan (main at 1d8f54d) for the option sets above."""


def _options(name: str) -> PrepareOptions:
    sources: tuple[SourceSpec, ...] = (SourceSpec(path="corpus.jsonl"),)
    if name == "source_options":
        sources = (
            SourceSpec(path="corpus.jsonl", format="alpaca", samples=1),
            SourceSpec(path="mapped.jsonl", weight=1.5, columns=("instruction=q", "output=a"), template="llama3"),
        )
    return PrepareOptions(sources=sources, tokenizer="tok", out="out", **OPTION_SETS[name])  # type: ignore[arg-type]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sources and tokenizer at fixed relative paths: the plan holds the paths as given."""
    shutil.copytree(TOKENIZER, tmp_path / "tok")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    mapped = [{"q": r["instruction"], "a": r["output"]} for r in RECORDS]
    (tmp_path / "mapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mapped), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_the_fingerprint_of_fixed_options_is_pinned(workdir: Path, name: str) -> None:
    plan, _ = make_plan(_options(name), load_tokenizer("tok"))
    assert plan.fingerprint == FINGERPRINTS[name]


def test_execution_options_and_limits_leave_the_fingerprint_alone(workdir: Path) -> None:
    """Workers, progress, the task split and the pass/fail limits change no output byte, so no block is redone."""
    base = _options("defaults")
    other = dataclasses.replace(
        base, out="elsewhere", workers=3, progress=False, num_tasks=2, task_index=1, max_bad_fraction=0.9
    )
    tokenizer = load_tokenizer("tok")
    assert make_plan(other, tokenizer)[0].fingerprint == make_plan(base, tokenizer)[0].fingerprint


def test_the_plan_carries_typed_options_and_survives_its_json_form(workdir: Path) -> None:
    plan, _ = make_plan(_options("source_options"), load_tokenizer("tok"))
    assert isinstance(plan.options, PrepareOptions)
    assert plan.options.max_record_bytes == 4096 and plan.options.sources[1].weight == 1.5
    written = json.loads(json.dumps(plan.to_dict()))
    assert "out" not in written["options"] and "workers" not in written["options"]
    back = Plan.from_dict(written, workdir / "out")
    assert back.fingerprint == plan.fingerprint
    assert json.loads(json.dumps(back.to_dict())) == written
    assert back.options.sources == plan.options.sources and back.options.max_seq_len == plan.options.max_seq_len


def test_every_record_kind_crosses_the_process_pool_unchanged() -> None:
    """The wire form keeps every field, a JSON line's column mapping included (a worker parses the line with it)."""
    samples: list[Sample] = [
        (0, Line(source="a.jsonl", fmt="alpaca", index=3, data=b'{"q": "x"}', columns=(("instruction", "q"),))),
        (1, Text(text="plain", source="b.txt", index=0)),
        (
            0,
            Conversation(
                messages=(
                    Message(role="user", content="hi"),
                    Message(role="assistant", content="", tool_calls=(ToolCall(name="f", arguments="{}"),)),
                    Message(role="tool", content="1", name="f"),
                    Message(role="assistant", content="done"),
                ),
                source="c.jsonl",
                index=7,
                tools=('{"type": "function"}',),
                dropped_turns=1,
            ),
        ),
        (2, Reject(reason="malformed_json", source="d.jsonl", index=9, raw="{", detail="not JSON")),
    ]
    assert from_wire(to_wire(samples)) == samples
