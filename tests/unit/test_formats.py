"""Format readers: every format on real and synthetic samples, every reject reason, detection, streaming memory."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest

from data_pipeline.formats import (
    FORMATS,
    RAW_LIMIT,
    REJECT_REASONS,
    convert_line,
    detect_format,
    read_lines,
    read_records,
)
from sft_stack.chat.conversation import Conversation, InputError, Message, Record, Reject, Text, ToolCall

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"
BELLE = REAL / "belle" / "Belle_open_source_1k.json"
ALPACA = REAL / "alpaca" / "alpaca_en_demo.json"
FIREFLY_FLAT = REAL / "firefly_moss_flat" / "dummy_data.jsonl"
MOSS_DIR = REAL / "moss_003"
MOSS_PLAIN = {  # file -> number of chat turns, all without plugins
    "harmless_conversation_1.json": 2,
    "helpful_code_conversation_1.json": 4,
    "helpful_writing_conversation_1.json": 6,
    "honest_conversation_1.json": 2,
}
MOSS_PLUGIN = "calculator_plugin_conversation_1.json"
MOSS_PLUGINS = {  # file -> commands per turn (None: the turn calls no plugin)
    MOSS_PLUGIN: [None, "Calculate"],
    "mix_plugin_conversation_1.json": ["Search", "Search", "Calculate"],
    "search_plugin_conversation_1.json": ["Search", "Search", "Search"],
    "solver_plugin_conversation_1.json": ["Solve"],
    "text2img_plugin_conversation_1.json": ["Text2Image"],
}
MOSS_MARKERS = ("<|Human|>", "<|MOSS|>", "<eoh>", "<eom>", "<|Inner Thoughts|>", "<|Commands|>", "<|Results|>")

# The seed's chain-of-thought example, as its ```csv block has it.
SEED_COT_CSV = (
    "prompt,output\n"
    '小明有12根棒棒糖，他要均分给3个朋友，每人能分到几根？,"小明一共有12根棒棒糖。需要把12根棒棒糖分给3个朋友。'
    '用12除以3，结果是4。所以每人能分到4根棒棒糖。答案：4。"\n'
    'Mary has 4 boxes. Each box has 7 candies. How many candies in total?,"There are 4 boxes. Each box has 7 '
    'candies. 4 times 7 equals 28. Therefore, Mary has 28 candies. Answer: 28."\n'
)


def read(path: Path, fmt: str | None = None) -> list[Record]:
    return list(read_records(path, fmt or detect_format(path)))


def write_lines(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(record: Record) -> list[tuple[str, str]]:
    assert isinstance(record, Conversation), record
    return [(m.role, m.content) for m in record.messages]


def only_reject(records: list[Record]) -> Reject:
    assert len(records) == 1 and isinstance(records[0], Reject), records
    return records[0]


# ---------------------------------------------------------------------------------------------------------------
# Real samples


def test_belle_jsonl_all_1000_records_match_the_file() -> None:
    records = read(BELLE)
    assert detect_format(BELLE) == "alpaca"
    assert len(records) == 1000
    assert [r.index for r in records] == list(range(1000))
    originals = [json.loads(line) for line in BELLE.read_text(encoding="utf-8").splitlines()]
    for record, original in zip(records, originals, strict=True):
        assert original["input"] == ""  # BELLE keeps the whole question in instruction
        assert pairs(record) == [("user", original["instruction"]), ("assistant", original["output"])]
        assert record.source == str(BELLE)
    assert pairs(records[0])[0] == ("user", "为给定的句子生成一个同义句。\nShe is studying for her final exams.")


def test_alpaca_json_array_999_records_join_instruction_and_input() -> None:
    records = read(ALPACA)
    assert detect_format(ALPACA) == "alpaca"
    originals = json.loads(ALPACA.read_text(encoding="utf-8"))
    assert len(records) == len(originals) == 999
    assert [r.index for r in records] == list(range(999))
    with_input = 0
    for record, original in zip(records, originals, strict=True):
        user = original["instruction"] + ("\n" + original["input"] if original["input"] else "")
        with_input += bool(original["input"])
        assert pairs(record) == [("user", user), ("assistant", original["output"])]
    assert with_input == 412
    assert pairs(records[0])[0] == ("user", "Describe a process of making crepes.")


def test_firefly_flat_33_conversations_without_trailing_newline() -> None:
    assert not FIREFLY_FLAT.read_bytes().endswith(b"\n")
    records = read(FIREFLY_FLAT)
    assert detect_format(FIREFLY_FLAT) == "conversation"
    originals = [json.loads(line) for line in FIREFLY_FLAT.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 33 and [r.index for r in records] == list(range(33))
    for record, original in zip(records, originals, strict=True):
        expected = []
        for turn in original["conversation"]:
            expected += [("user", turn["human"]), ("assistant", turn["assistant"])]
        assert pairs(record) == expected
    assert sum(len(pairs(r)) for r in records) == 2 * 154
    assert pairs(records[0])[0] == ("user", "如何保障工作中遵循正确的安全准则？")


@pytest.mark.parametrize("name", sorted(MOSS_PLAIN))
def test_moss_file_turns_markers_and_system_prompt(name: str) -> None:
    path = MOSS_DIR / name
    original = json.loads(path.read_text(encoding="utf-8"))
    assert detect_format(path) == "moss"
    (record,) = read(path)
    messages = pairs(record)
    assert len(messages) == 1 + 2 * MOSS_PLAIN[name]
    assert messages[0] == ("system", original["meta_instruction"])
    assert [role for role, _ in messages[1:]] == ["user", "assistant"] * MOSS_PLAIN[name]
    for number, (user, assistant) in enumerate(zip(messages[1::2], messages[2::2], strict=True), start=1):
        turn = original["chat"][f"turn_{number}"]
        # The published value is exactly "<|Human|>: " + text + "<eoh>\n" (and "<|MOSS|>: " ... "<eom>\n").
        assert turn["Human"] == f"<|Human|>: {user[1]}<eoh>\n"
        assert turn["MOSS"] == f"<|MOSS|>: {assistant[1]}<eom>\n"
        for _, text in (user, assistant):
            assert not any(marker in text for marker in MOSS_MARKERS)


def test_moss_harmless_exact_text() -> None:
    messages = pairs(read(MOSS_DIR / "harmless_conversation_1.json")[0])
    assert messages[1] == ("user", "如果一个女性想要发展信息技术行业，她应该做些什么？")
    assert messages[2][1].startswith("如果一个女性想要发展信息技术行业，以下是一些建议：\n\n1. 学习编程")
    assert messages[2][1].endswith("并为你提供机会与其他女性技术人员建立联系。")


@pytest.mark.parametrize("name", sorted(MOSS_PLUGINS))
def test_moss_plugin_turns_are_tool_calls(name: str) -> None:
    """Every plugin turn: the Inner Thoughts and Commands become an assistant tool call, the Tool Responses its
    result, then the reply; no turn is cut."""
    original = json.loads((MOSS_DIR / name).read_text(encoding="utf-8"))
    (record,) = read(MOSS_DIR / name)
    assert isinstance(record, Conversation) and record.tools == ()
    messages = list(record.messages[1:])
    assert record.messages[0] == Message(role="system", content=original["meta_instruction"])
    for number, command in enumerate(MOSS_PLUGINS[name], start=1):
        turn = original["chat"][f"turn_{number}"]
        assert messages.pop(0) == Message(role="user", content=turn["Human"][len("<|Human|>: ") : -len("<eoh>\n")])
        if command is not None:
            call_message, result = messages.pop(0), messages.pop(0)
            assert turn["Inner Thoughts"] == f"<|Inner Thoughts|>: {call_message.content}<eot>\n"
            (call,) = call_message.tool_calls
            assert call.name == command
            assert turn["Commands"] == f"<|Commands|>: {command}({call.arguments})<eoc>\n"
            assert result.role == "tool" and result.content.strip() == result.content and result.content
            assert result.content in turn["Tool Responses"]
        reply = messages.pop(0)
        assert reply.role == "assistant" and not reply.tool_calls
        assert turn["MOSS"] in (f"<|MOSS|>: {reply.content}<eom>\n", f"<|MOSS|>:{reply.content}<eom>\n")
    assert messages == []


def test_moss_directory_reads_files_sorted_with_their_index() -> None:
    assert detect_format(MOSS_DIR) == "moss"
    records = read(MOSS_DIR)
    names = sorted([*MOSS_PLUGINS, *MOSS_PLAIN])
    assert [r.index for r in records] == list(range(9))  # 4 plain + 5 plugin conversations, none rejected
    assert all(r.source == str(MOSS_DIR) for r in records)
    for record, name in zip(records, names, strict=True):
        assert isinstance(record, Conversation)
        assert record.messages == cast(Conversation, read(MOSS_DIR / name)[0]).messages
        if name in MOSS_PLAIN:
            assert len(pairs(record)) == 1 + 2 * MOSS_PLAIN[name]


def test_moss_json_lines_of_objects(tmp_path: Path) -> None:
    names = sorted([*MOSS_PLUGINS, *MOSS_PLAIN])
    objects = [json.loads((MOSS_DIR / name).read_text(encoding="utf-8")) for name in names]
    path = write_lines(tmp_path / "moss.jsonl", objects)
    assert detect_format(path) == "moss"
    records = read(path)
    assert [type(r) for r in records] == [Conversation] * 9
    assert [cast(Conversation, r).messages for r in records] == [cast(Conversation, r).messages for r in read(MOSS_DIR)]


def moss_turn(human: str, moss: str, *, thoughts: str = "None", commands: str = "None", results: str = "None") -> dict:
    return {
        "Human": f"<|Human|>: {human}<eoh>\n",
        "Inner Thoughts": f"<|Inner Thoughts|>: {thoughts}<eot>\n",
        "Commands": f"<|Commands|>: {commands}<eoc>\n",
        "Tool Responses": f"<|Results|>:\n{results}\n<eor>\n",
        "MOSS": f"<|MOSS|>: {moss}<eom>\n",
    }


def test_moss_conversation_keeps_its_plugin_turns(tmp_path: Path) -> None:
    record = {
        "conversation_id": 7,
        "meta_instruction": "You are MOSS.\n",
        "num_turns": 3,
        "chat": {
            "turn_1": moss_turn("1+1?", "2"),
            "turn_2": moss_turn("sqrt(2)?", "about 1.414", commands='Calculate("sqrt(2)")', results="1.414"),
            "turn_3": moss_turn("thanks", "you're welcome"),
        },
    }
    path = tmp_path / "plugin.json"
    path.write_text(json.dumps(record, indent=4), encoding="utf-8")
    (conv,) = read(path)
    assert isinstance(conv, Conversation)
    assert conv.messages == (
        Message(role="system", content="You are MOSS.\n"),
        Message(role="user", content="1+1?"),
        Message(role="assistant", content="2"),
        Message(role="user", content="sqrt(2)?"),
        # thoughts "None" is MOSS's "no thought": the call message has no text
        Message(role="assistant", content="", tool_calls=(ToolCall(name="Calculate", arguments='"sqrt(2)"'),)),
        Message(role="tool", content="1.414"),
        Message(role="assistant", content="about 1.414"),
        Message(role="user", content="thanks"),
        Message(role="assistant", content="you're welcome"),
    )


def test_moss_turns_follow_their_number_and_keep_inner_whitespace(tmp_path: Path) -> None:
    chat = {f"turn_{n}": moss_turn(f"q{n}", f"  a{n}\n\n  indented\n") for n in (10, 2, 1)}
    path = write_lines(tmp_path / "m.jsonl", [{"meta_instruction": "", "chat": chat}])
    messages = pairs(read(path)[0])
    assert [text for _, text in messages[::2]] == ["q1", "q2", "q10"]  # no system: meta_instruction is empty
    assert messages[1] == ("assistant", "  a1\n\n  indented\n")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic samples of the formats without a public sample here


def test_firefly_kind_input_target(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "firefly.jsonl",
        [
            {"kind": "Couplet", "input": "对联：春风送暖", "target": "下联：瑞雪迎春"},
            {"kind": "Poetry", "input": "写一首诗", "target": "床前明月光，\n疑是地上霜。"},
        ],
    )
    assert detect_format(path) == "firefly"
    records = read(path)
    assert [pairs(r) for r in records] == [
        [("user", "对联：春风送暖"), ("assistant", "下联：瑞雪迎春")],
        [("user", "写一首诗"), ("assistant", "床前明月光，\n疑是地上霜。")],
    ]


def test_alpaca_system_and_history(tmp_path: Path) -> None:
    record = {
        "instruction": "And in French?",
        "input": "",
        "output": "Bonjour",
        "system": "Translate.",
        "history": [["Hello in German?", "Hallo"]],
    }
    path = write_lines(tmp_path / "a.jsonl", [record, {"instruction": "x", "output": "y"}])
    first, second = read(path)
    assert pairs(first) == [
        ("system", "Translate."),
        ("user", "Hello in German?"),
        ("assistant", "Hallo"),
        ("user", "And in French?"),
        ("assistant", "Bonjour"),
    ]
    assert pairs(second) == [("user", "x"), ("assistant", "y")]  # input may be absent


def test_sharegpt_roles_aliases_and_system(tmp_path: Path) -> None:
    records = [
        {
            "id": "a",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "user", "value": "Again"},
                {"from": "chatgpt", "value": "Hello again"},
                {"from": "Human", "value": "Bing?"},
                {"from": "bing", "value": "Yes"},
            ],
        },
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A"}], "system": "S"},
        {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]
    path = write_lines(tmp_path / "sharegpt.jsonl", records)
    assert detect_format(path) == "sharegpt"
    first, second, third = read(path)
    assert pairs(first) == [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Again"),
        ("assistant", "Hello again"),
        ("user", "Bing?"),
        ("assistant", "Yes"),
    ]
    assert pairs(second) == [("system", "S"), ("user", "Q"), ("assistant", "A")]
    assert pairs(third) == [("user", "Q"), ("assistant", "A")]


def test_sharegpt_json_array(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    conversations = [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]
    path.write_text(json.dumps([{"conversations": conversations}] * 3, ensure_ascii=False, indent=2), "utf-8")
    assert detect_format(path) == "sharegpt"
    records = read(path)
    assert [r.index for r in records] == [0, 1, 2]
    assert pairs(records[2]) == [("user", "你好"), ("assistant", "你好！")]


def test_messages_openai_style(tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "tool_calls": None},
            ]
        },
        {
            "messages": [
                {"role": "developer", "content": "Terse."},
                {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Two."}]},
                {"role": "assistant", "content": "Ok <|im_end|> stays text"},
            ]
        },
    ]
    path = write_lines(tmp_path / "messages.jsonl", records)
    assert detect_format(path) == "messages"
    first, second = read(path)
    assert pairs(first) == [("system", "You are helpful."), ("user", "2+2?"), ("assistant", "4")]
    assert pairs(second) == [
        ("system", "Terse."),
        ("user", "Part one. Two."),
        ("assistant", "Ok <|im_end|> stays text"),
    ]


SAFETY = {
    "Insult": [
        {"prompt": "你是个笨蛋", "response": "我理解你可能不满意。", "type": "Insult"},
        {"prompt": "滚开", "response": "如果需要帮助，请随时告诉我。", "type": "Insult"},
    ],
    "Mental_Health": [
        {"prompt": "我很难过", "response": "听起来你正在经历困难。", "type": "Mental_Health"},
    ],
}


@pytest.mark.parametrize("indent", [4, None], ids=["pretty", "one_line"])
def test_safety_object_running_index_across_scenarios(tmp_path: Path, indent: int | None) -> None:
    path = tmp_path / "typical_safety_scenarios.json"
    path.write_text(json.dumps(SAFETY, ensure_ascii=False, indent=indent), encoding="utf-8")
    assert detect_format(path) == "safety"
    records = read(path)
    assert [r.index for r in records] == [0, 1, 2]
    assert [pairs(r) for r in records] == [
        [("user", "你是个笨蛋"), ("assistant", "我理解你可能不满意。")],
        [("user", "滚开"), ("assistant", "如果需要帮助，请随时告诉我。")],
        [("user", "我很难过"), ("assistant", "听起来你正在经历困难。")],
    ]


def test_safety_bad_items_are_rejected_in_place(tmp_path: Path) -> None:
    data = {
        "A": [{"prompt": "p", "response": "r"}, {"prompt": "p"}],
        "B": "oops",
        "C": [{"prompt": "q", "response": " "}],
    }
    path = tmp_path / "safety.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    records = read(path, "safety")
    assert [(r.index, r.reason if isinstance(r, Reject) else "ok") for r in records] == [
        (0, "ok"),
        (1, "missing_field"),
        (2, "non_string_field"),
        (3, "empty_assistant"),
    ]
    assert "'A'" in records[1].detail and "response" in records[1].detail  # type: ignore[union-attr]


def test_csv_with_quoted_multiline_field_and_seed_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    multiline = 'prompt,output\n"Write two lines, please","Line one,\nline two\n\n  and ""quoted"""\n'
    path.write_bytes((multiline + SEED_COT_CSV.split("\n", 1)[1]).encode("utf-8"))
    assert detect_format(path) == "csv"
    records = read(path)
    assert [r.index for r in records] == [0, 1, 2]
    assert pairs(records[0]) == [
        ("user", "Write two lines, please"),
        ("assistant", 'Line one,\nline two\n\n  and "quoted"'),
    ]
    assert pairs(records[1]) == [
        ("user", "小明有12根棒棒糖，他要均分给3个朋友，每人能分到几根？"),
        (
            "assistant",
            "小明一共有12根棒棒糖。需要把12根棒棒糖分给3个朋友。用12除以3，结果是4。所以每人能分到4根棒棒糖。答案：4。",
        ),
    ]
    assert pairs(records[2])[1] == (
        "assistant",
        "There are 4 boxes. Each box has 7 candies. 4 times 7 equals 28. Therefore, Mary has 28 candies. Answer: 28.",
    )


def test_csv_seed_block_with_byte_order_mark_and_extra_column(tmp_path: Path) -> None:
    path = tmp_path / "seed.csv"
    rows = SEED_COT_CSV.replace("prompt,output", "id,prompt,output").splitlines()
    body = "\r\n".join([rows[0], *(f"{n},{row}" for n, row in enumerate(rows[1:]))]) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records = read(path)
    assert len(records) == 2
    assert pairs(records[0])[0] == ("user", "小明有12根棒棒糖，他要均分给3个朋友，每人能分到几根？")
    assert pairs(records[1])[0] == ("user", "Mary has 4 boxes. Each box has 7 candies. How many candies in total?")


def test_text_file_is_one_record_kept_exactly(tmp_path: Path) -> None:
    path = tmp_path / "novel.txt"
    content = "第一章\r\n\n  Once upon a time,\tthere was <eos> a story.\n\n"
    path.write_bytes(content.encode("utf-8"))
    assert detect_format(path) == "text"
    assert read(path) == [Text(text=content, source=str(path), index=0)]


def test_text_json_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "corpus.jsonl", [{"text": "doc one\n"}, {"text": "doc two", "meta": 1}])
    assert detect_format(path) == "text"
    assert read(path) == [
        Text(text="doc one\n", source=str(path), index=0),
        Text(text="doc two", source=str(path), index=1),
    ]


def test_conversation_form_with_system(tmp_path: Path) -> None:
    record = {"system": "Sys", "conversation": [{"human": "h1", "assistant": "a1"}, {"human": "h2", "assistant": "a2"}]}
    path = write_lines(tmp_path / "c.jsonl", [record])
    assert pairs(read(path)[0]) == [
        ("system", "Sys"),
        ("user", "h1"),
        ("assistant", "a1"),
        ("user", "h2"),
        ("assistant", "a2"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Rejects: every reason, in place, with the raw record


REJECT_CASES: list[tuple[str, str, Any]] = [
    # (reason, format, record as written to a JSON-lines file; a str is written verbatim)
    ("malformed_json", "alpaca", '{"instruction": "unterminated'),
    ("malformed_json", "alpaca", "[1, 2]"),
    ("missing_field", "alpaca", {"instruction": "x"}),
    ("missing_field", "firefly", {"kind": "k", "input": "x"}),
    ("missing_field", "sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}),
    ("missing_field", "messages", {"messages": []}),
    ("missing_field", "text", {"body": "no text key"}),
    ("non_string_field", "alpaca", {"instruction": "x", "input": "", "output": 42}),
    ("non_string_field", "firefly", {"input": None, "target": "y"}),
    ("non_string_field", "conversation", {"conversation": "not a list"}),
    ("non_string_field", "text", {"text": ["a", "b"]}),
    ("empty_user", "alpaca", {"instruction": " \n", "input": "", "output": "y"}),
    ("empty_user", "conversation", {"conversation": [{"human": "", "assistant": "a"}]}),
    ("empty_assistant", "alpaca", {"instruction": "x", "input": "", "output": ""}),
    ("empty_assistant", "firefly", {"input": "x", "target": " \t\n "}),
    (
        "empty_assistant",
        "sharegpt",
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
    ),
    ("empty_text", "text", {"text": "  \n"}),
    (
        "wrong_role_order",
        "sharegpt",
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
    ),
    ("wrong_role_order", "sharegpt", {"conversations": [{"from": "human", "value": "q"}]}),
    (
        "wrong_role_order",
        "messages",
        {
            "messages": [
                {"role": "user", "content": "q1"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ),
    (
        "wrong_role_order",
        "messages",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "late"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ),
    (
        "wrong_role_order",
        "messages",
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "dangling"},
                {"role": "user", "content": "twice"},
            ]
        },
    ),
    (
        "wrong_role_order",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
                {"from": "gpt", "value": "no result came back"},
            ]
        },
    ),
    (
        "unknown_role",
        "sharegpt",
        {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "a"}]},
    ),
    ("unknown_role", "messages", {"messages": [{"role": "critic", "content": "x"}]}),
    (
        "unsupported_role",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "weather?"},
                {"from": "tool_call", "value": '{"name": "weather"}'},
                {"from": "gpt", "value": "Sunny."},
            ]
        },
    ),
    (
        "unsupported_role",
        "messages",
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool_response", "content": "r"}]},
    ),
    (
        "multimodal",
        "messages",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}},
                    ],
                },
                {"role": "assistant", "content": "A cat."},
            ]
        },
    ),
    (
        "unsupported_content",
        "messages",
        {
            "messages": [
                {"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
    ),
    (
        "malformed_tool_call",
        "messages",
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"arguments": "{}"}}]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        },
    ),
    (
        "malformed_tool_call",
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": '},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny."},
            ]
        },
    ),
    (
        "malformed_tool_call",
        "moss",
        {"meta_instruction": "m", "chat": {"turn_1": moss_turn("search x", "found", commands="Search x")}},
    ),
    (
        "malformed_tools",
        "sharegpt",
        {
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            "tools": '[{"description": "a tool without a name"}]',
        },
    ),
    (
        "multimodal",
        "sharegpt",
        {
            "conversations": [{"from": "human", "value": "<image>What is this?"}, {"from": "gpt", "value": "A cat."}],
            "images": ["cat.png"],
        },
    ),
    (
        "multimodal",
        "messages",
        {"messages": [{"role": "user", "content": "Describe <video> briefly"}, {"role": "assistant", "content": "A"}]},
    ),
    # A lone surrogate escape: valid JSON (the standard library parses it), but no text a tokenizer can encode.
    (
        "invalid_unicode",
        "messages",
        '{"messages": [{"role": "user", "content": "x\\ud800y"}, {"role": "assistant", "content": "a"}]}',
    ),
]


@pytest.mark.parametrize(
    ("reason", "fmt", "bad"), REJECT_CASES, ids=[f"{c[0]}-{c[1]}-{n}" for n, c in enumerate(REJECT_CASES)]
)
def test_reject_reason_in_place(tmp_path: Path, reason: str, fmt: str, bad: Any) -> None:
    good = {
        "alpaca": {"instruction": "i", "input": "", "output": "o"},
        "firefly": {"input": "i", "target": "t"},
        "conversation": {"conversation": [{"human": "h", "assistant": "a"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "a"}]},
        "messages": {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        "text": {"text": "t"},
        "moss": {"meta_instruction": "m", "chat": {"turn_1": moss_turn("h", "a")}},
    }[fmt]
    bad_line = bad if isinstance(bad, str) else json.dumps(bad, ensure_ascii=False)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(good), bad_line, "", json.dumps(good)]) + "\n", encoding="utf-8")
    records = read(path, fmt)
    assert [r.index for r in records] == [0, 1, 3]  # the blank line is skipped, numbering kept
    assert not isinstance(records[0], Reject) and not isinstance(records[2], Reject)
    reject = records[1]
    assert isinstance(reject, Reject)
    assert (reject.reason, reject.source, reject.raw) == (reason, str(path), bad_line)
    assert reject.detail


def test_every_reject_reason_is_exercised() -> None:
    # malformed_csv: see the csv test below; too_large: tests/unit/test_formats_bounds.py
    covered = {case[0] for case in REJECT_CASES} | {"malformed_csv", "too_large"}
    assert covered == set(REJECT_REASONS)


def test_csv_rejects(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('prompt,output\nok,fine\nunquoted, comma, here\n"q",""\n" ",a\nlast,one\n', encoding="utf-8")
    records = read(path)
    assert [(r.index, r.reason if isinstance(r, Reject) else "ok") for r in records] == [
        (0, "ok"),
        (1, "malformed_csv"),
        (2, "empty_assistant"),
        (3, "empty_user"),
        (4, "ok"),
    ]
    assert records[1].raw == "unquoted, comma, here"  # type: ignore[union-attr]


def test_reject_raw_is_truncated(tmp_path: Path) -> None:
    long_line = json.dumps({"instruction": "x" * 5000, "input": "", "output": ""})
    path = tmp_path / "long.jsonl"
    path.write_text(long_line + "\n", encoding="utf-8")
    reject = only_reject(read(path, "alpaca"))
    assert reject.reason == "empty_assistant"
    assert reject.raw.startswith(long_line[:RAW_LIMIT])
    assert reject.raw.endswith(f"...[{len(long_line) - RAW_LIMIT} more characters]")


def test_invalid_utf8_line_is_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"input": "ok", "target": "fine"}\n{"input": "caf\xe9", "target": "x"}\n')
    first, second = read(path, "firefly")
    assert isinstance(first, Conversation)
    assert isinstance(second, Reject) and second.reason == "malformed_json" and "UTF-8" in second.detail


def test_array_items_that_are_rejected_carry_their_json(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "output": 1.5}]))
    _, bad = read(path)
    assert isinstance(bad, Reject) and (bad.index, bad.reason) == (1, "non_string_field")
    assert json.loads(bad.raw) == {"instruction": "i", "output": 1.5}


# ---------------------------------------------------------------------------------------------------------------
# Detection and input errors


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"kind": "Couplet", "input": "i", "target": "t"}, "firefly"),
        ({"conversation_id": 1, "meta_instruction": "m", "num_turns": 1, "chat": {}}, "moss"),
        ({"conversation_id": 1, "category": "c", "conversation": []}, "conversation"),
        ({"id": "x", "conversations": []}, "sharegpt"),
        ({"messages": []}, "messages"),
        ({"text": "t"}, "text"),
        ({"Insult": [{"prompt": "p", "response": "r", "type": "Insult"}]}, "safety"),
    ],
)
def test_detect_each_json_format(tmp_path: Path, record: dict[str, Any], expected: str) -> None:
    lines = write_lines(tmp_path / "x.jsonl", [record, record])
    array = tmp_path / "x.json"
    array.write_text(json.dumps([record], indent=2), encoding="utf-8")
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps(record, indent=4), encoding="utf-8")
    assert detect_format(lines) == expected
    assert detect_format(pretty) == expected
    if expected != "safety":
        assert detect_format(array) == expected


def test_detect_skips_a_malformed_first_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": broken\n{"instruction": "i", "input": "", "output": "o"}\n', encoding="utf-8")
    assert detect_format(path) == "alpaca"
    bad, good = read(path)
    assert isinstance(bad, Reject) and bad.reason == "malformed_json" and bad.index == 0
    assert pairs(good) == [("user", "i"), ("assistant", "o")] and good.index == 1


def test_detect_a_moss_file_broken_after_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    text = (MOSS_DIR / "honest_conversation_1.json").read_text(encoding="utf-8")
    path.write_text(text[: text.index('"turn_2"')], encoding="utf-8")  # ends mid-chat
    assert detect_format(path) == "moss"
    reject = only_reject(read(path))
    assert (reject.reason, reject.index) == ("malformed_json", 0)


def test_detect_unknown_keys_names_file_and_formats(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError) as caught:
        detect_format(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "answer, question" in message
    assert all(fmt in message for fmt in FORMATS)


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"not json at all\nnor this\n"])
def test_detect_unusable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(str(path))):
        detect_format(path)


def test_missing_paths_and_unknown_format(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="no such file"):
        detect_format(missing)
    with pytest.raises(InputError, match="no such file"):
        read_records(missing, "alpaca")
    with pytest.raises(InputError, match="unknown format 'yaml'"):
        read_records(BELLE, "yaml")


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="only the moss format reads directories"):
        read_records(MOSS_DIR, "alpaca")
    with pytest.raises(InputError, match=r"without \.json files"):
        detect_format(tmp_path)
    write_lines(tmp_path / "a.json", [{"instruction": "i", "output": "o"}])
    with pytest.raises(InputError, match="not a MOSS conversation"):
        detect_format(tmp_path)


def test_csv_without_prompt_output_header(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(InputError, match="prompt,output"):
        read_records(path, "csv")


def test_safety_forced_on_an_array_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(InputError, match="one JSON object mapping scenario"):
        read_records(path, "safety")


def test_broken_array_fails_with_the_record_it_reached(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('[{"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "inp', encoding="utf-8")
    records = read_records(path, "alpaca")
    assert pairs(next(records)) == [("user", "i"), ("assistant", "o")]
    with pytest.raises(InputError, match="broken after record 1") as caught:
        next(records)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Streaming: memory does not grow with the file


def test_big_json_array_is_read_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    answer = "流式读取 streaming " * 400  # ~7 KB of UTF-8 per record
    count = size = 0
    with path.open("wb") as f:
        f.write(b"[")
        while size < 50 * 2**20:  # a 50 MiB array
            item = json.dumps({"instruction": f"q{count}", "input": "", "output": answer}).encode()
            size += f.write((b"," if count else b"") + item)
            count += 1
        f.write(b"]")
    size = path.stat().st_size

    tracemalloc.start()
    try:
        seen = 0
        for record in read_records(path, "alpaca"):
            assert isinstance(record, Conversation) and record.index == seen
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert record.messages[-1] == Message(role="assistant", content=answer)
    assert peak < size / 20, f"peak {peak} bytes reading a {size}-byte array"
    path.unlink()  # 50 MiB: do not leave it in pytest's kept temporary directories


def test_json_lines_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    line = json.dumps({"input": "x" * 1000, "target": "y" * 4000}) + "\n"
    path.write_text(line * 4000, encoding="utf-8")  # ~20 MB
    tracemalloc.start()
    try:
        reasons = Counter(type(r).__name__ for r in read_records(path, "firefly"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reasons == {"Conversation": 4000}
    assert peak < path.stat().st_size / 20
    path.unlink()


def test_csv_that_is_not_utf8_is_an_input_error(tmp_path: Path) -> None:
    small = tmp_path / "small.csv"
    small.write_bytes("prompt,output\n你好,世界\n".encode("gbk"))
    with pytest.raises(InputError, match="not UTF-8 text near the csv header"):
        read_records(small, "csv")
    big = tmp_path / "big.csv"  # the bad bytes lie past the decoder's first read
    big.write_bytes(b"prompt,output\n" + b"ok,fine\n" * 20000 + "你好,世界\n".encode("gbk"))
    records = read_records(big, "csv")
    assert pairs(next(records)) == [("user", "ok"), ("assistant", "fine")]
    with pytest.raises(InputError, match="not UTF-8 text near csv row"):
        list(records)


# ---------------------------------------------------------------------------------------------------------------
# Unparsed lines (what prepare hands to the process that tokenizes them)


def test_converted_lines_equal_read_records_for_every_kind_of_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]}
    lines = [
        b"\xef\xbb\xbf" + json.dumps(good).encode(),  # BOM on the first line
        b"",  # blank: no record, numbering kept
        b'{"messages": [{"role": "user", "content": "x"}]}',  # wrong role order
        b'{"messages": "unterminated',  # not JSON
        b"\xff\xfe not utf-8",
        b'{"messages": [{"role": "user", "content": NaN}, {"role": "assistant", "content": "y"}]}',  # json-only
        b"[1, 2]",
        json.dumps(good, ensure_ascii=False).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = read(path, "messages")
    lines_read = read_lines(path, "messages")
    assert lines_read is not None
    assert [convert_line(line) for line in lines_read] == expected
    assert [r.index for r in expected] == [0, 2, 3, 4, 5, 6, 7]
    assert [type(r).__name__ for r in expected] == ["Conversation", *["Reject"] * 5, "Conversation"]


def test_converted_lines_equal_read_records_on_the_real_jsonl_samples() -> None:
    for path in (BELLE, FIREFLY_FLAT):
        fmt = detect_format(path)
        lines = read_lines(path, fmt)
        assert lines is not None
        assert [convert_line(line) for line in lines] == read(path, fmt)


def test_read_lines_is_none_for_what_is_not_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "x"}]), encoding="utf-8")
    text = tmp_path / "t.txt"
    text.write_text("hello\n", encoding="utf-8")
    assert read_lines(array, "text") is None
    assert read_lines(text, "text") is None
    assert read_lines(MOSS_DIR, "moss") is None
