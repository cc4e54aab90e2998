"""The readers take any bytes: records over max_record_bytes, deep nesting, lone surrogates and a byte-order mark
each give a Reject (or a record), never an exception, and the records around them are read as before."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from data_pipeline.formats import MAX_DEPTH, Line, convert_line, detect_format, read_lines, read_records
from sft_stack.chat.conversation import Conversation, Reject, Text

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
SURROGATE = '{"messages": [{"role": "user", "content": "x\\ud800y"}, {"role": "assistant", "content": "a"}]}'
LIMIT = 1000


def huge(size: int) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * size}]}


def outcomes(records: Sequence[object]) -> list[str]:
    return [r.reason if isinstance(r, Reject) else "ok" for r in records]


def test_json_lines_huge_deep_and_surrogate_lines_are_rejects_with_their_line(tmp_path: Path) -> None:
    lines = [
        json.dumps(GOOD),
        json.dumps(huge(50 * LIMIT)),  # refused by size, before parsing
        "[" * 100_000,  # RecursionError in the standard library's parser before
        '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
        SURROGATE,  # TypeError in the tokenizer before
        json.dumps(huge(LIMIT - 200)),  # under the bound: read
        json.dumps(GOOD),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = list(read_records(path, "messages", LIMIT * 1000))  # the deep lines are 200 KB: over a tighter bound
    assert outcomes(records) == ["ok", "ok", "malformed_json", "malformed_json", "invalid_unicode", "ok", "ok"]
    records = list(read_records(path, "messages", LIMIT))
    assert outcomes(records) == ["ok", "too_large", "too_large", "too_large", "invalid_unicode", "ok", "ok"]
    assert [r.index + 1 for r in records] == [1, 2, 3, 4, 5, 6, 7]  # index = line number - 1
    assert isinstance(records[1], Reject) and "max_record_bytes" in records[1].detail
    # The unparsed path prepare takes gives the same records.
    lines_read = read_lines(path, "messages", LIMIT)
    assert lines_read is not None
    converted = [convert_line(r) if isinstance(r, Line) else r for r in lines_read]
    assert converted == records


def test_json_array_with_a_bom_huge_and_deep_elements(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000  # ijson's prefixed parsing cost the square of this depth before
    body = "[" + ",".join([json.dumps(GOOD), json.dumps(huge(50 * LIMIT)), deep, SURROGATE, json.dumps(GOOD)]) + "]"
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert detect_format(path) == "messages"  # a BOM: "none of its first 20 records is a JSON object" before
    records = list(read_records(path, "messages", LIMIT))
    # ijson's parser (yajl) reads a lone surrogate escape as "?": that element is text, and written.
    assert outcomes(records) == ["ok", "too_large", "malformed_json", "ok", "ok"]
    deep_reject = records[2]
    assert isinstance(deep_reject, Reject) and f"deeper than {MAX_DEPTH}" in deep_reject.detail
    assert [r.index for r in records] == [0, 1, 2, 3, 4]


def test_array_nested_just_under_the_depth_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    nested = "[" * (MAX_DEPTH - 3) + "1" + "]" * (MAX_DEPTH - 3)
    path.write_text(f'[{{"messages": [], "meta": {nested}}}, {json.dumps(GOOD)}]', encoding="utf-8")
    assert outcomes(list(read_records(path, "messages"))) == ["missing_field", "ok"]


def test_safety_moss_csv_and_txt_refuse_records_over_the_bound(tmp_path: Path) -> None:
    safety = tmp_path / "safety.json"
    item = {"prompt": "p", "response": "r", "type": "t"}
    big = {"prompt": "p" * 5 * LIMIT, "response": "r", "type": "t"}
    safety.write_text(json.dumps({"A": [item, big], "B": [item]}), encoding="utf-8")
    assert outcomes(list(read_records(safety, "safety", LIMIT))) == ["ok", "too_large", "ok"]

    moss = tmp_path / "moss"
    moss.mkdir()
    turn = {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>: yo<eom>\n"}
    for name, answer in (("a.json", "yo"), ("b.json", "y" * 5 * LIMIT)):
        record = {"meta_instruction": "", "chat": {"turn_1": {**turn, "MOSS": answer}}}
        (moss / name).write_text(json.dumps(record), encoding="utf-8")
    assert outcomes(list(read_records(moss, "moss", LIMIT))) == ["ok", "too_large"]

    table = tmp_path / "data.csv"
    with table.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["prompt", "output"], ["q", "a"], ["q", "a" * 5 * LIMIT], ["q", "a"]])
    assert outcomes(list(read_records(table, "csv", LIMIT))) == ["ok", "too_large", "ok"]

    text = tmp_path / "book.txt"
    text.write_text("word " * LIMIT, encoding="utf-8")
    assert outcomes(list(read_records(text, "text", LIMIT))) == ["too_large"]
    assert isinstance(next(read_records(text, "text", 10 * LIMIT)), Text)


def test_json_lines_whose_first_lines_are_too_long_to_sniff_are_still_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(huge(2 << 20)) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    assert detect_format(path) == "messages"
    records = list(read_records(path, "messages", 1 << 20))
    assert outcomes(records) == ["too_large", "ok"]
    assert isinstance(records[1], Conversation) and records[1].index == 1
