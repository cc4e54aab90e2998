"""prepare on tool-calling data and the rejects policy: malformed vs length drops, trailing turns, rerun messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.cli import main
from data_pipeline.inspect import TRAINED_END, TRAINED_START, inspect_output
from data_pipeline.prepare import BLOCKS_DIR, PrepareOptions, SourceSpec, TooManyRejects, prepare
from data_pipeline.schema import Manifest, load_manifest
from tests.helpers.data import REAL, TINY_LLAMA, arithmetic_conversations, write_jsonl

GLAIVE = REAL / "toolcall" / "glaive_toolcall_zh_demo.json"
MEDIA = REAL / "multimodal" / "mllm_audio_demo.json"


def run(out: Path, sources: list[Path], **kw: Any) -> Manifest:
    kw.setdefault("progress", False)
    kw.setdefault("tokenizer", str(TINY_LLAMA))
    return prepare(PrepareOptions(sources=tuple(SourceSpec(path=str(s)) for s in sources), out=str(out), **kw))


@pytest.fixture(scope="module")
def glaive_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "glaive"
    run(out, [GLAIVE], template="qwen", max_seq_len=8192, val_fraction=0.0, block_size=128)
    return out


def test_glaive_is_written_whole_with_qwen(glaive_qwen: Path) -> None:
    manifest = load_manifest(glaive_qwen)
    counts = manifest.counts
    assert (counts["samples_read"], counts["samples_written"], counts["samples_rejected"]) == (300, 300, 0)
    assert (counts["samples_malformed"], counts["samples_dropped_by_length"]) == (0, 0)


def test_inspect_shows_a_tool_call_with_its_trained_spans(glaive_qwen: Path) -> None:
    text = inspect_output(glaive_qwen, split="train", index=0)  # record 0: human, function_call, observation, gpt
    original = json.loads(GLAIVE.read_text(encoding="utf-8"))[0]["conversations"]
    call = json.loads(original[1]["value"])
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    assert (
        f'{TRAINED_START}<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call><|im_end|>'
        f"{TRAINED_END}" in text
    )
    observation = original[2]["value"]
    assert f"<tool_response>\n{observation}\n</tool_response>" in text  # the result: shown, not trained
    assert f"{TRAINED_START}{original[3]['value']}<|im_end|>{TRAINED_END}" in text
    assert "malformed (limit --max-bad-fraction): 0 records" in text


def test_media_records_are_counted_as_malformed(tmp_path: Path) -> None:
    with pytest.raises(TooManyRejects, match=r"3 of 3 records rejected as malformed.*multimodal 3"):
        run(tmp_path / "out", [MEDIA])


def _policy_source(tmp: Path) -> Path:
    """100 good records; 2 malformed; 3 whose last user turn has no answer; 5 too long for max_seq_len 128."""
    records: list[Any] = [*arithmetic_conversations(100)]
    for n in range(3):
        messages = [*records[n]["messages"], {"role": "user", "content": f"unanswered {n}"}]
        records.append({"messages": messages})
    for _ in range(5):
        records.append(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long " * 200}]}
        )
    path = write_jsonl(tmp / "policy.jsonl", records)
    with path.open("a", encoding="utf-8") as f:
        f.write("{broken\n[1, 2]\n")
    return path


def _block_records(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / BLOCKS_DIR).glob("0*.json"))}


def test_rejects_policy_limits_and_rerun(tmp_path: Path) -> None:
    source = _policy_source(tmp_path)
    out = tmp_path / "out"
    options: dict[str, Any] = {"max_seq_len": 128, "overlong": "drop", "block_size": 40, "val_fraction": 0.0}
    # 2 malformed of 110 = 1.8% > the default 1%: the message names the flag and says the rerun reuses the work.
    with pytest.raises(TooManyRejects) as failed:
        run(out, [source], **options)
    message = str(failed.value)
    assert "2 of 110 records rejected as malformed (1.8% > --max-bad-fraction 0.01)" in message
    assert "malformed_json 2" in message and "too_long" not in message
    assert "rerun the same command with --max-bad-fraction 0.02" in message and "reuses the finished work" in message
    finished = _block_records(out)
    assert len(finished) == 3

    manifest = run(out, [source], **options, max_bad_fraction=0.02)
    assert _block_records(out) == finished  # the rerun redid no block
    counts = manifest.counts
    assert counts["samples_read"] == 110
    assert counts["samples_written"] == 103  # the 3 records with an unanswered last turn are written
    assert counts["unanswered_turns_dropped"] == 3
    assert (counts["samples_malformed"], counts["samples_dropped_by_length"]) == (2, 5)
    assert counts["rejected_by_reason"] == {"malformed_json": 2, "too_long": 5}

    # The length drops have their own limit (5 of 110 = 4.5%).
    with pytest.raises(TooManyRejects) as dropped:
        run(out, [source], **options, max_bad_fraction=0.02, max_dropped_fraction=0.04)
    message = str(dropped.value)
    assert "5 of 110 records dropped by the length policy (4.5% > --max-dropped-fraction 0.04)" in message
    assert "too_long 5" in message and "--max-dropped-fraction 0.05" in message and "--max-seq-len" in message
    assert _block_records(out) == finished


def test_cli_reports_malformed_and_length_drops_on_their_own_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _policy_source(tmp_path)
    args = ["prepare", "--source", str(source), "--tokenizer", str(TINY_LLAMA), "--out", str(tmp_path / "out")]
    args += ["--no-progress", "--no-track", "--max-seq-len", "128", "--overlong", "drop", "--val-fraction", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-bad-fraction" in err
    assert main([*args, "--max-bad-fraction", "0.02", "--max-dropped-fraction", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "prepare: malformed (limit --max-bad-fraction): 2 records, 1.82% of those read" in lines
    assert (
        "prepare: dropped by the length policy (limit --max-dropped-fraction): 5 records, 4.55% of those read" in lines
    )
    assert "prepare: unanswered user turns dropped at the end of a record (the record kept): 3" in lines


def test_tool_records_cross_to_worker_processes_intact(glaive_qwen: Path, tmp_path: Path) -> None:
    """Records reach workers as tuples (prepare's wire format): tools and calls must survive the trip."""
    weighted = PrepareOptions(
        sources=(SourceSpec(path=str(GLAIVE), weight=1.0),),  # weighted: parsed here, sent as Conversations
        tokenizer=str(TINY_LLAMA),
        out=str(tmp_path / "out"),
        template="qwen",
        max_seq_len=8192,
        val_fraction=0.0,
        block_size=128,
        workers=2,
        progress=False,
    )
    manifest = prepare(weighted)
    reference = load_manifest(glaive_qwen)
    assert [s.sha256 for s in manifest.splits["train"].shards] == [s.sha256 for s in reference.splits["train"].shards]
