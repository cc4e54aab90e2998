"""Tool use and media in the format readers: glaive/LLaMA-Factory, OpenAI, ChatGLM3; media refused; trailing turns."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.formats import detect_format, read_records
from sft_stack.chat.conversation import Conversation, Message, Record, Reject, ToolCall, uses_tools

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
GLAIVE = REAL / "toolcall" / "glaive_toolcall_zh_demo.json"
MEDIA = sorted((REAL / "multimodal").glob("*.json"))


def read(path: Path) -> list[Record]:
    return list(read_records(path, detect_format(path)))


def write_lines(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_glaive_every_record_is_a_conversation_with_its_calls_and_tools() -> None:
    original = json.loads(GLAIVE.read_text(encoding="utf-8"))
    records = read(GLAIVE)
    assert detect_format(GLAIVE) == "sharegpt"
    assert len(records) == len(original) == 300
    assert all(isinstance(r, Conversation) for r in records)
    roles = Counter(m["from"] for r in original for m in r["conversations"])
    convs = [r for r in records if isinstance(r, Conversation)]
    calls = [c for conv in convs for m in conv.messages for c in m.tool_calls]
    assert len(calls) == roles["function_call"] > 0
    assert sum(m.role == "tool" for conv in convs for m in conv.messages) == roles["observation"]
    offered = sum(bool(json.loads(r["tools"] or "[]")) for r in original)
    assert sum(bool(conv.tools) for conv in convs) == offered == 200  # 100 records offer no tool ("" or "[]")
    assert sum(uses_tools(conv) for conv in convs) == 200
    for raw, conv in zip(original, convs, strict=True):
        assert [json.loads(t)["function"] for t in conv.tools] == json.loads(raw["tools"])
        for turn, message in zip(raw["conversations"], conv.messages, strict=True):
            if turn["from"] == "function_call":
                (call,) = message.tool_calls
                value = json.loads(turn["value"])
                assert (call.name, json.loads(call.arguments)) == (value["name"], value["arguments"])
                assert message.role == "assistant" and message.content == ""
            else:
                assert message.content == turn["value"]


def test_openai_messages_with_parallel_calls(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    record = {
        "messages": [
            {"role": "user", "content": "Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "18C"},
            {"role": "tool", "tool_call_id": "b", "content": "25C"},
            {"role": "assistant", "content": "Paris 18C, Rome 25C."},
        ],
        "tools": tools,
    }
    (conv,) = read(write_lines(tmp_path / "openai.jsonl", [record]))
    assert isinstance(conv, Conversation)
    assert conv.tools == (json.dumps(tools[0]),)
    assert conv.messages == (
        Message(role="user", content="Paris and Rome?"),
        Message(
            role="assistant",
            content="",
            tool_calls=(
                ToolCall(name="get_weather", arguments='{"city": "Paris"}'),
                ToolCall(name="get_weather", arguments='{"city": "Rome"}'),
            ),
        ),
        Message(role="tool", content="18C", name="get_weather"),
        Message(role="tool", content="25C"),
        Message(role="assistant", content="Paris 18C, Rome 25C."),
    )


def test_chatglm3_tool_and_observation_records(tmp_path: Path) -> None:
    record = {
        "tools": [{"name": "track", "description": "Track a stock", "parameters": {"type": "object"}}],
        "conversations": [
            {"role": "system", "content": "Answer well."},
            {"role": "user", "content": "10111 price?"},
            {"role": "tool", "name": "track", "parameters": {"symbol": "10111"}, "observation": {"price": 12}},
            {"role": "assistant", "content": "It is 12."},
            {"role": "user", "content": "And 10112?"},
            {"role": "assistant", "content": "Checking."},
        ],
    }
    other = {
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "function_call", "content": '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{}"}]'},
            {"role": "observation", "content": "ra"},
            {"role": "observation", "content": "rb"},
            {"role": "assistant", "content": "done"},
        ]
    }
    first, second = read(write_lines(tmp_path / "glm3.jsonl", [record, other]))
    assert isinstance(first, Conversation) and isinstance(second, Conversation)
    assert first.tools == ('{"type": "function", "function": {"name": "track", "description": "Track a stock", '
                           '"parameters": {"type": "object"}}}',)  # fmt: skip
    assert first.messages[2:4] == (
        Message(role="assistant", content="", tool_calls=(ToolCall(name="track", arguments='{"symbol": "10111"}'),)),
        Message(role="tool", content='{"price": 12}', name="track"),
    )
    assert [c.name for c in second.messages[1].tool_calls] == ["a", "b"]
    assert [m.role for m in second.messages] == ["user", "assistant", "tool", "tool", "assistant"]


def test_a_trailing_unanswered_user_turn_is_dropped_not_the_record(tmp_path: Path) -> None:
    answered = [
        {"from": "human", "value": f"q{n}"} if n % 2 == 0 else {"from": "gpt", "value": f"a{n}"} for n in range(40)
    ]
    records = [
        {"conversations": [*answered, {"from": "human", "value": "nobody answers this"}]},
        {"conversations": [*answered, {"from": "human", "value": "  "}]},  # an empty trailing turn is dropped too
        {"conversations": answered},
        {"conversations": [{"from": "human", "value": "alone"}]},  # nothing answered: still a reject
    ]
    first, second, third, fourth = read(write_lines(tmp_path / "s.jsonl", records))
    for conv in (first, second):
        assert isinstance(conv, Conversation) and conv.dropped_turns == 1
        assert [m.content for m in conv.messages] == [t["value"] for t in answered]
    assert isinstance(third, Conversation) and third.dropped_turns == 0
    assert isinstance(fourth, Reject) and fourth.reason == "wrong_role_order"


@pytest.mark.parametrize("path", MEDIA, ids=[p.name for p in MEDIA])
def test_media_records_are_refused_as_multimodal(path: Path) -> None:
    original = json.loads(path.read_text(encoding="utf-8"))
    records = read(path)
    assert len(records) == len(original) > 0
    assert all(isinstance(r, Reject) and r.reason == "multimodal" for r in records)
    assert all("media" in r.detail for r in records if isinstance(r, Reject))


def test_a_placeholder_alone_is_enough_and_plain_mentions_are_not(tmp_path: Path) -> None:
    records = [
        {"messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "What does <img> do?"}, {"role": "assistant", "content": "Shows."}]},
        {"instruction": "q", "output": "a", "images": []},
    ]
    first, second = read(write_lines(tmp_path / "m.jsonl", records[:2]))
    assert isinstance(first, Reject) and first.reason == "multimodal"
    assert isinstance(second, Conversation)
    (third,) = read(write_lines(tmp_path / "a.jsonl", records[2:]))
    assert isinstance(third, Conversation)  # an empty media list lists no media
