"""prepare() end to end on the tiny tokenizer: every format, exact masks, counts, rejects, splits, packing."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from data_pipeline.prepare import PrepareOptions, SourceSpec, TooManyRejects, merge, prepare
from data_pipeline.schema import (
    ARROW_SCHEMA,
    IGNORE_INDEX,
    REJECTS_FILE,
    Manifest,
    load_manifest,
    sha256_file,
    verify_split,
)
from sft_stack.chat.conversation import InputError
from tests.helpers.data import (
    ALPACA,
    BELLE,
    FIREFLY_MOSS_FLAT,
    MOSS_003,
    TINY_LLAMA,
    arithmetic_conversations,
    make_prepared_dir,
    write_jsonl,
)


def run(out: Path, sources: list[Path | SourceSpec], **kw: Any) -> Manifest:
    specs = tuple(s if isinstance(s, SourceSpec) else SourceSpec(path=str(s)) for s in sources)
    kw.setdefault("progress", False)
    kw.setdefault("tokenizer", str(TINY_LLAMA))
    return prepare(PrepareOptions(sources=specs, out=str(out), **kw))


def split_rows(out: Path, split: str) -> list[dict[str, list[int]]]:
    return list(datasets.load_from_disk(str(out / split)))


def check_output(out: Path) -> Manifest:
    """Assert every invariant of a prepared directory; return its manifest."""
    manifest = load_manifest(out)
    counts = manifest.counts
    assert counts["samples_read"] == counts["samples_written"] + counts["samples_rejected"]
    assert counts["samples_rejected"] == sum(counts["rejected_by_reason"].values())
    rejects = (out / REJECTS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(rejects) == counts["samples_rejected"]
    assert sum(s.records for s in manifest.sources) == counts["samples_read"]
    tokens = loss_tokens = 0
    for split, info in manifest.splits.items():
        assert verify_split(out, split, manifest) == []
        for shard in info.shards:
            table = datasets.Dataset.from_file(str(out / split / shard.file)).data.table
            assert table.schema.equals(ARROW_SCHEMA)
            assert table.num_rows == shard.rows
        rows = split_rows(out, split)
        assert len(rows) == info.rows
        for row in rows:
            ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
            assert len(ids) == len(labels) == len(positions) <= manifest.max_seq_len
            assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True))
            starts = [i for i, p in enumerate(positions) if p == 0]
            assert starts[0] == 0
            for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
                assert positions[a:b] == list(range(b - a))
                assert any(label != IGNORE_INDEX for label in labels[a:b]), "a sample with no trained token"
            if not manifest.packed:
                assert len(starts) == 1
        tokens += sum(len(r["input_ids"]) for r in rows)
        loss_tokens += sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
        assert sum(len(r["input_ids"]) for r in rows) == info.tokens
    assert tokens == counts["tokens"]
    assert loss_tokens == counts["loss_tokens"]
    return manifest


# --------------------------------------------------------------------------------------------- formats


def _generated_sources(tmp: Path) -> dict[str, Path]:
    """One small file per format that has no real sample in the fixtures."""
    sharegpt = write_jsonl(
        tmp / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": f"Say {i}."},
                    {"from": "gpt", "value": f"{i}."},
                ]
            }
            for i in range(5)
        ],
    )
    messages = write_jsonl(tmp / "messages.jsonl", arithmetic_conversations(6))
    firefly = write_jsonl(
        tmp / "firefly.jsonl",
        [{"kind": "Couplet", "input": f"上联：春风{i}", "target": f"下联：秋月{i}"} for i in range(5)],
    )
    safety = tmp / "safety.json"
    safety.write_text(
        json.dumps(
            {
                "Insult": [{"prompt": "你真笨", "response": "我会继续努力。", "type": "Insult"}],
                "Crimes": [{"prompt": "怎么偷车？", "response": "我不能帮助违法行为。", "type": "Crimes"}],
            },
            ensure_ascii=False,
        ),
        encoding="utf-8",
    )
    table = tmp / "seed.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "output"])
        writer.writerow(["Write two lines.", "Line one.\nLine two."])
        writer.writerow(["Say hi", "hi"])
    text = tmp / "book.txt"
    text.write_text("Once upon a time there was a tiny model. " * 40, encoding="utf-8")
    text_lines = write_jsonl(tmp / "text.jsonl", [{"text": f"Document {i} says hello."} for i in range(3)])
    return {
        "sharegpt": sharegpt,
        "messages": messages,
        "firefly": firefly,
        "safety": safety,
        "csv": table,
        "text": text,
        "text_jsonl": text_lines,
    }


REAL_SOURCES = {  # path, format, records, max_seq_len
    "alpaca_belle": (BELLE, "alpaca", 1000, 512),
    "alpaca_array": (ALPACA, "alpaca", 999, 512),
    "conversation": (FIREFLY_MOSS_FLAT, "conversation", 33, 1024),
    "moss": (MOSS_003, "moss", 9, 4096),  # the meta instruction alone is ~1k tiny-BPE tokens
}


@pytest.mark.parametrize("name", sorted(REAL_SOURCES))
def test_real_samples_prepare(tmp_path: Path, name: str) -> None:
    path, fmt, records, max_seq_len = REAL_SOURCES[name]
    # MOSS's plugin conversations need a template with a tool format: MOSS's own.
    source = SourceSpec(path=str(path), template="moss") if name == "moss" else path
    manifest = run(tmp_path / "out", [source], max_seq_len=max_seq_len, val_fraction=0.1, max_bad_fraction=0.25)
    check_output(tmp_path / "out")
    assert manifest.sources[0].format == fmt
    assert manifest.sources[0].records == records
    assert manifest.counts["samples_read"] == records
    assert manifest.counts["samples_written"] > 0


def test_generated_formats_prepare(tmp_path: Path) -> None:
    sources = _generated_sources(tmp_path)
    manifest = run(tmp_path / "out", list(sources.values()), max_seq_len=64, val_fraction=0.0)
    check_output(tmp_path / "out")
    formats = [s.format for s in manifest.sources]
    assert formats == ["sharegpt", "messages", "firefly", "safety", "csv", "text", "text"]
    assert [s.records for s in manifest.sources] == [5, 6, 5, 2, 2, 1, 3]
    assert manifest.counts["samples_rejected"] == 0
    # The .txt document is longer than 64 tokens: it becomes several fully-trained chunks of at most 64.
    assert manifest.counts["sequences"] > manifest.counts["samples_written"]
    rows = split_rows(tmp_path / "out", "train")
    text_rows = [r for r in rows if all(label != IGNORE_INDEX for label in r["labels"])]
    assert any(len(r["input_ids"]) == 64 for r in text_rows)


# ------------------------------------------------------------------------------------------ exact masks


def _plain_ids(text: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_LLAMA))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_exact_masks_two_turns(tmp_path: Path) -> None:
    conv = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "Sure"},
        ]
    }
    source = write_jsonl(tmp_path / "one.jsonl", [conv])
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_LLAMA))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt1 = [bos, *_plain_ids("### User:\nHi\n\n### Assistant:\n")]
    answer1 = [*_plain_ids("Hello there"), eos]
    prompt2 = _plain_ids("\n\n### User:\nMore\n\n### Assistant:\n")
    answer2 = [*_plain_ids("Sure"), eos]

    run(tmp_path / "all", [source], template="default", val_fraction=0.0)
    (row,) = split_rows(tmp_path / "all", "train")
    assert row["input_ids"] == prompt1 + answer1 + prompt2 + answer2
    ignore = [IGNORE_INDEX]
    assert row["labels"] == ignore * len(prompt1) + answer1 + ignore * len(prompt2) + answer2
    assert row["position_ids"] == list(range(len(row["input_ids"])))

    run(tmp_path / "last", [source], template="default", val_fraction=0.0, last_turn_only=True)
    (row,) = split_rows(tmp_path / "last", "train")
    assert row["labels"] == ignore * (len(prompt1) + len(answer1) + len(prompt2)) + answer2


def test_control_strings_in_content_stay_text(tmp_path: Path) -> None:
    tricky = "literal </s> and <|im_end|> and <eoh> inside"
    plain = "literal text without any control strings"

    def conversation(content: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": content}]}

    source = write_jsonl(tmp_path / "tricky.jsonl", [conversation(tricky), conversation(plain)])
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_LLAMA))
    controls = {tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|im_end|>", "<eoh>", "<eom>")}
    for template in ("default", "qwen", "moss"):
        out = tmp_path / template
        run(out, [source], template=template, val_fraction=0.0)
        rows = split_rows(out, "train")
        found = [sorted(t for t in row["input_ids"] if t in controls) for row in rows]
        # The tricky record holds exactly the control tokens the template adds to a plain one: none from content.
        assert found[0] == found[1], template
        assert tokenizer.decode(rows[0]["input_ids"], skip_special_tokens=False).count(tricky) == 2


# ------------------------------------------------------------------------------------- rejects, counts


def _messy_source(tmp: Path) -> Path:
    good = arithmetic_conversations(20)
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}))
    lines.insert(
        11, json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})
    )
    path = tmp / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rejects_carry_reasons_and_counts_reconcile(tmp_path: Path) -> None:
    source = _messy_source(tmp_path)
    manifest = run(tmp_path / "out", [source], max_bad_fraction=0.5, val_fraction=0.2)
    check_output(tmp_path / "out")
    assert manifest.counts["samples_read"] == 23
    assert manifest.counts["samples_written"] == 20
    rejects = [json.loads(line) for line in (tmp_path / "out" / REJECTS_FILE).read_text().splitlines()]
    assert [r["index"] for r in rejects] == [3, 7, 11]
    assert rejects[0]["reason"] == "malformed_json"
    assert rejects[0]["raw"] == "{not json"
    assert rejects[1]["reason"] == "empty_assistant"
    assert rejects[2]["reason"] == "wrong_role_order"
    assert all(r["source"] == str(source) and "detail" in r for r in rejects)
    assert manifest.counts["rejected_by_reason"] == {"empty_assistant": 1, "malformed_json": 1, "wrong_role_order": 1}


def test_too_many_rejects_fails_after_writing_rejects(tmp_path: Path) -> None:
    source = _messy_source(tmp_path)
    with pytest.raises(TooManyRejects, match=r"3 of 23 records rejected.*malformed_json 1"):
        run(tmp_path / "out", [source], max_bad_fraction=0.05)
    assert len((tmp_path / "out" / REJECTS_FILE).read_text().splitlines()) == 3
    assert not (tmp_path / "out" / "manifest.json").exists()
    # Raising the threshold re-uses the finished blocks and succeeds.
    manifest = run(tmp_path / "out", [source], max_bad_fraction=0.5)
    assert manifest.counts["samples_rejected"] == 3


def test_overlong_truncate_or_drop(tmp_path: Path) -> None:
    long_answer = "word " * 200
    source = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": long_answer}]},
            *(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"ok {i}"}]}
                for i in range(3)
            ),
        ],
    )
    truncated = run(tmp_path / "t", [source], max_seq_len=32, overlong="truncate", val_fraction=0.0)
    check_output(tmp_path / "t")
    assert truncated.counts["samples_written"] == 4
    assert max(len(r["input_ids"]) for r in split_rows(tmp_path / "t", "train")) == 32
    dropped = run(tmp_path / "d", [source], max_seq_len=32, overlong="drop", val_fraction=0.0, max_dropped_fraction=0.5)
    assert dropped.counts["rejected_by_reason"] == {"too_long": 1}
    assert dropped.counts["samples_written"] == 3


# ----------------------------------------------------------------------------------------- val, packing


def test_val_split_is_by_content_hash(tmp_path: Path) -> None:
    records = arithmetic_conversations(400)
    manifest = run(tmp_path / "a", [write_jsonl(tmp_path / "a.jsonl", records)], val_fraction=0.25, block_size=37)
    assert 60 < manifest.splits["val"].samples < 140
    # Reversed order, other block size: the same records land in val.
    reversed_source = write_jsonl(tmp_path / "b.jsonl", records[::-1])
    other = run(tmp_path / "b", [reversed_source], val_fraction=0.25, block_size=100)
    val_a = sorted(map(tuple, (r["input_ids"] for r in split_rows(tmp_path / "a", "val"))))
    val_b = sorted(map(tuple, (r["input_ids"] for r in split_rows(tmp_path / "b", "val"))))
    assert val_a == val_b
    assert other.splits["val"].samples == manifest.splits["val"].samples


def test_pack_rows_and_efficiency(tmp_path: Path) -> None:
    manifest = run(tmp_path / "p", [BELLE], max_seq_len=512, pack=True, val_fraction=0.05)
    check_output(tmp_path / "p")
    unpacked = run(tmp_path / "u", [BELLE], max_seq_len=512, val_fraction=0.05)
    assert manifest.counts["tokens"] == unpacked.counts["tokens"]
    assert manifest.counts["loss_tokens"] == unpacked.counts["loss_tokens"]
    assert manifest.counts["rows"] < unpacked.counts["rows"]
    slots = manifest.counts["rows"] * 512
    assert manifest.packing_efficiency == round(manifest.counts["tokens"] / slots, 6)
    assert manifest.packing_efficiency > 0.95
    assert unpacked.packing_efficiency == 1.0
    # Packed rows hold exactly the unpacked samples.
    samples = sorted(tuple(r["input_ids"]) for r in split_rows(tmp_path / "u", "train"))
    pieces = []
    for row in split_rows(tmp_path / "p", "train"):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        pieces += [tuple(row["input_ids"][a:b]) for a, b in itertools.pairwise(starts)]
    assert sorted(pieces) == samples


def test_shards_are_bounded_by_block_size(tmp_path: Path) -> None:
    manifest = run(tmp_path / "out", [BELLE], max_seq_len=512, val_fraction=0.1, block_size=300)
    check_output(tmp_path / "out")
    assert len(manifest.splits["train"].shards) == 4  # 1000 records / 300 per block
    assert all(s.rows <= 300 for s in manifest.splits["train"].shards)
    assert datasets.load_from_disk(str(tmp_path / "out" / "train")).num_rows == manifest.splits["train"].rows


def test_source_samples_and_weight(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic_conversations(50))
    b = write_jsonl(tmp_path / "b.jsonl", arithmetic_conversations(40, seed=1))
    manifest = run(
        tmp_path / "out", [SourceSpec(path=str(a), samples=10), SourceSpec(path=str(b), weight=2.5)], val_fraction=0.0
    )
    assert manifest.sources[0].records == 10
    # weight 2.5: every record twice, half of them (by hash) a third time.
    assert 10 + 80 + 8 < manifest.counts["samples_read"] < 10 + 80 + 32
    assert manifest.sources[1].records == manifest.counts["samples_read"] - 10
    check_output(tmp_path / "out")
    assert manifest.options["sources"][1]["weight"] == 2.5


# ------------------------------------------------------------------------------------- resume and tasks


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".blocks" not in p.parts and p.name != "manifest.json"
    }


def _manifest_minus_timings(out: Path) -> dict[str, Any]:
    body = json.loads((out / "manifest.json").read_text())
    body.pop("timings")
    return body


def test_rerun_and_resume_reuse_verified_blocks(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"max_seq_len": 512, "val_fraction": 0.1, "block_size": 250, "pack": True}
    run(tmp_path / "ref", [BELLE], **kw)
    reference = _tree_bytes(tmp_path / "ref")
    # A crash: one block's completion record gone, another block's shard torn, the manifest never written.
    out = tmp_path / "ref"
    (out / ".blocks" / "00001.json").unlink()
    shard = out / "train" / "data-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.arrow")}
    run(out, [BELLE], **kw)
    assert _tree_bytes(out) == reference
    after = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.arrow")}
    assert after["data-00000.arrow"] == before["data-00000.arrow"]  # reused, not rewritten
    assert after["data-00002.arrow"] != before["data-00002.arrow"]
    check_output(out)


def test_out_of_another_preparation_is_refused(tmp_path: Path) -> None:
    run(tmp_path / "out", [BELLE], max_seq_len=512)
    with pytest.raises(InputError, match="different sources or options"):
        run(tmp_path / "out", [BELLE], max_seq_len=1024)


def test_tasks_then_merge_equal_single_run(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"max_seq_len": 512, "val_fraction": 0.1, "block_size": 200, "pack": True}
    single = run(tmp_path / "single", [BELLE, FIREFLY_MOSS_FLAT], **kw)
    parts = []
    for index in range(3):
        part = tmp_path / f"task{index}"
        partial = run(part, [BELLE, FIREFLY_MOSS_FLAT], num_tasks=3, task_index=index, **kw)
        assert partial.options["task_index"] == index
        parts.append(part)
    merged = merge(parts, tmp_path / "merged")
    assert _tree_bytes(tmp_path / "merged") == _tree_bytes(tmp_path / "single")
    assert _manifest_minus_timings(tmp_path / "merged") == _manifest_minus_timings(tmp_path / "single")
    assert merged.fingerprint == single.fingerprint
    check_output(tmp_path / "merged")
    with pytest.raises(InputError, match="task indices"):
        merge(parts[:2], tmp_path / "incomplete")


def test_make_prepared_dir_helper(tmp_path: Path) -> None:
    out = make_prepared_dir(tmp_path / "data", pack=True)
    manifest = check_output(out)
    assert manifest.packed and manifest.max_seq_len == 128
    assert manifest.counts["samples_read"] == 200
    assert manifest.splits["val"].rows > 0
    assert sha256_file(out / "train" / manifest.splits["train"].shards[0].file) == (
        manifest.splits["train"].shards[0].sha256
    )
    assert pa.ipc.open_stream(str(out / "train" / manifest.splits["train"].shards[0].file)).schema.equals(ARROW_SCHEMA)
