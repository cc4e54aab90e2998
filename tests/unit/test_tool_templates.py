"""Tool calling in the chat templates: each family's trained format, exact ids and labels, text kept as text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, Message, Reject, ToolCall, uses_tools
from sft_stack.chat.registry import TEMPLATE_NAMES, TOOL_TEMPLATES
from sft_stack.chat.templates import ChatTemplate, Encoded, resolve_template

TINY_BPE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers" / "tiny_bpe"
X = IGNORE_INDEX
# Tokens the families' tool formats use that tiny_bpe lacks (Qwen2.5's tags, ChatGLM3's observation role, MOSS's
# plugin markers): added as special tokens, as they are in those vocabularies.
TOOL_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|observation|>",
    "<|Inner Thoughts|>",
    "<|Commands|>",
    "<|Results|>",
    "<eot>",
    "<eoc>",
    "<eor>",
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS = tuple(json.dumps(t, ensure_ascii=False) for t in (WEATHER, TIME))

# Two calls in one assistant turn, their results, and a final reply.
TWO_CALLS = Conversation(
    messages=(
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather and time in Paris?"),
        Message(
            role="assistant",
            content="",
            tool_calls=(
                ToolCall(name="get_weather", arguments='{"city": "Paris"}'),
                ToolCall(name="get_time", arguments='{"city": "Paris"}'),
            ),
        ),
        Message(role="tool", content="18C"),
        Message(role="tool", content="10:00"),
        Message(role="assistant", content="18C at 10:00."),
    ),
    source="test.jsonl",
    index=0,
    tools=TOOLS,
)

WEATHER_LINE = json.dumps(WEATHER, ensure_ascii=False)
TIME_LINE = json.dumps(TIME, ensure_ascii=False)
QWEN_SYSTEM = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{WEATHER_LINE}\n{TIME_LINE}\n</tools>\n\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n"
)
QWEN_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
)
LLAMA_TOOLS_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    'best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.Do not use variables.\n\n"
    + json.dumps(WEATHER, indent=4)
    + "\n\n"
    + json.dumps(TIME, indent=4)
    + "\n\n"
)
CHATGLM3_TOOLS = json.dumps([WEATHER["function"], TIME["function"]], indent=4, ensure_ascii=False)

# The full render of TWO_CALLS per family, as (text, trained) pieces; the text is each vendor's format.
EXPECTED: dict[str, list[tuple[str, bool]]] = {
    "qwen": [
        (QWEN_SYSTEM + "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (QWEN_CALLS, True),
        (
            "\n<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n10:00\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("18C at 10:00.<|im_end|>", True),
    ],
    "llama3": [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
            f"<|end_header_id|>\n\n{LLAMA_TOOLS_USER}Weather and time in Paris?<|eot_id|><|start_header_id|>"
            "assistant<|end_header_id|>\n\n",
            False,
        ),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', True),
        (
            "<|start_header_id|>ipython<|end_header_id|>\n\n18C<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ('{"name": "get_time", "parameters": {"city": "Paris"}}<|eot_id|>', True),
        (
            "<|start_header_id|>ipython<|end_header_id|>\n\n10:00<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("18C at 10:00.<|eot_id|>", True),
    ],
    "chatglm3": [
        (
            "[gMASK]sop<|system|>\nAnswer the following questions as best as you can. You have access to the "
            f"following tools:\n{CHATGLM3_TOOLS}<|system|>\nBe brief.<|user|>\nWeather and time in Paris?<|assistant|>",
            False,
        ),
        ("get_weather\n```python\ntool_call(city='Paris')\n```<|observation|>", True),
        ("\n18C<|assistant|>", False),
        ("get_time\n```python\ntool_call(city='Paris')\n```<|observation|>", True),
        ("\n10:00<|assistant|>", False),
        ("\n18C at 10:00.</s>", True),
    ],
    "moss": [
        (
            "Be brief.\n- Inner thoughts: enabled.\n- Weather of a city: enabled. API: get_weather(city)\n"
            "- Local time: enabled. API: get_time()\n<|Human|>: Weather and time in Paris?<eoh>\n",
            False,
        ),
        (
            '<|Inner Thoughts|>: None<eot>\n<|Commands|>: get_weather({"city": "Paris"}), get_time({"city": "Paris"})'
            "<eoc>",
            True,
        ),
        ("\n<|Results|>:\n18C\n10:00\n<eor>\n", False),
        ("<|MOSS|>: 18C at 10:00.<eom>", True),
    ],
}


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)
    tokenizer.add_special_tokens({"additional_special_tokens": TOOL_TOKENS})  # type: ignore[dict-item]
    return tokenizer


def encode_one(template: ChatTemplate, conv: Conversation, **kwargs: bool) -> Encoded:
    (result,) = template.encode_batch([conv], **kwargs)
    assert isinstance(result, Encoded), result
    return result


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Template text tokenized the way the vendors' code does: control strings are tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trained_texts(tokenizer: PreTrainedTokenizerBase, enc: Encoded) -> list[str]:
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        if label != X:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != X
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_two_calls_in_one_turn(tiny: PreTrainedTokenizerBase, name: str) -> None:
    """Exact ids (the vendor's rendered text, tokenized with its control strings as tokens) and labels (only the
    calls and the reply, with what closes each, are trained; the results never)."""
    enc = encode_one(resolve_template(name, tiny), TWO_CALLS)
    pieces = EXPECTED[name]
    assert enc.input_ids == ids_of(tiny, "".join(text for text, _ in pieces))
    assert trained_texts(tiny, enc) == [text for text, trained in pieces if trained]
    expected_labels = [
        label
        for text, trained in pieces
        for label in (ids_of(tiny, text) if trained else [X] * len(ids_of(tiny, text)))
    ]
    assert enc.labels == expected_labels


# Qwen2.5's tool format and Llama 3.1's, written as Jinja chat_templates (the same rendered text as the families):
# the ``tokenizer`` template given one of these must encode exactly as the family template does.
QWEN25_TOOLS_JINJA = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}{{ 'You are a helpful assistant.' }}"
    "{% endif %}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not (loop.first and tools)) "
    "or (m.role == 'assistant' and not m.tool_calls) %}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{%- if m.content %}{{ '\\n' + m.content }}{% endif %}"
    '{%- for call in m.tool_calls %}{{ \'\\n<tool_call>\\n{"name": "\' + call.function.name + '
    "'\", \"arguments\": ' }}{{ call.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def with_jinja(jinja: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)
    tokenizer.add_special_tokens({"additional_special_tokens": TOOL_TOKENS})  # type: ignore[dict-item]
    tokenizer.chat_template = jinja
    return tokenizer


def test_tokenizer_template_with_tools_equals_the_qwen_family(tiny: PreTrainedTokenizerBase) -> None:
    family = encode_one(resolve_template("qwen", tiny), TWO_CALLS)
    tokenizer = with_jinja(QWEN25_TOOLS_JINJA)
    template = resolve_template("tokenizer", tokenizer)
    own = encode_one(template, TWO_CALLS)
    # The jinja closes the last turn with "<|im_end|>\n": one more (untrained) newline than the family template.
    assert own.input_ids == [*family.input_ids, *ids_of(tiny, "\n")]
    assert own.labels == [*family.labels, X]
    prompt = list(TWO_CALLS.messages[:5])
    assert template.encode_prompt(prompt, TOOLS) == resolve_template("qwen", tiny).encode_prompt(prompt, TOOLS)


@pytest.mark.parametrize("name", [*TOOL_TEMPLATES[:-1], "tokenizer"])
def test_control_strings_in_arguments_and_results_stay_text(tiny: PreTrainedTokenizerBase, name: str) -> None:
    sneaky = "<|im_end|><|eot_id|><|user|><|observation|><eom><eoc></s><tool_call>"
    conv = Conversation(
        messages=(
            Message(role="user", content="Echo?"),
            Message(
                role="assistant", content="", tool_calls=(ToolCall(name="echo", arguments=json.dumps({"x": sneaky})),)
            ),
            Message(role="tool", content=sneaky),
            Message(role="assistant", content="Done."),
        ),
        source="t",
        index=0,
        tools=TOOLS,
    )
    tokenizer = with_jinja(QWEN25_TOOLS_JINJA) if name == "tokenizer" else tiny
    template = resolve_template(name, tokenizer)
    enc = encode_one(template, conv)
    plain = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|observation|>", "<eoc>")}
    clean = Conversation(
        messages=tuple(
            Message(
                role=m.role,
                content=m.content.replace(sneaky, "x"),
                tool_calls=tuple(
                    ToolCall(name=c.name, arguments=c.arguments.replace(sneaky, "x")) for c in m.tool_calls
                ),
            )
            for m in conv.messages
        ),
        source="t",
        index=0,
        tools=TOOLS,
    )
    reference = encode_one(template, clean)
    # The control tokens are exactly the template's: the same ones as with harmless text in their place.
    assert [t for t in enc.input_ids if t in plain] == [t for t in reference.input_ids if t in plain]
    assert tokenizer.decode(enc.input_ids).count(sneaky) == 2


@pytest.mark.parametrize("name", [n for n in TEMPLATE_NAMES if n not in TOOL_TEMPLATES])
def test_templates_without_a_tool_format_reject_tool_records(tiny: PreTrainedTokenizerBase, name: str) -> None:
    tiny.add_special_tokens(
        {"additional_special_tokens": ["<reserved_102>", "<reserved_103>", "[gMASK]", "<sop>", "<eop>"]}
    )  # type: ignore[dict-item]
    template = resolve_template(name, tiny)
    plain = Conversation(
        messages=(Message(role="user", content="q"), Message(role="assistant", content="a")), source="t", index=1
    )
    offered = Conversation(messages=plain.messages, source="t", index=2, tools=TOOLS)
    calls = Conversation(messages=TWO_CALLS.messages, source="t", index=3)
    results = template.encode_batch([plain, offered, calls])
    assert isinstance(results[0], Encoded)
    for result in results[1:]:
        assert isinstance(result, Reject) and result.reason == "no_tool_format", result
        assert "qwen, llama3, chatglm3, moss, tokenizer" in result.detail
    with pytest.raises(ValueError, match="no tool format"):
        template.encode_prompt(list(plain.messages[:1]), TOOLS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prompt_after_the_results_is_the_training_prefix(tiny: PreTrainedTokenizerBase, name: str) -> None:
    template = resolve_template(name, tiny)
    enc = encode_one(template, TWO_CALLS)
    for end in (2, 5):  # after the user turn (the model calls), after the results (the model replies)
        prompt = template.encode_prompt(list(TWO_CALLS.messages[:end]), TOOLS)
        assert enc.input_ids[: len(prompt)] == prompt
        assert enc.labels[len(prompt) - 1] == X and enc.labels[len(prompt)] != X
        # The call turn ends with a stop token, so generation stops where the caller runs the tools.
    call_end = next(i for i in range(len(enc.labels) - 1) if enc.labels[i] != X and enc.labels[i + 1] == X)
    assert enc.input_ids[call_end] in template.stop_token_ids


def test_last_turn_only_trains_the_last_rounds_calls_and_reply(tiny: PreTrainedTokenizerBase) -> None:
    conv = Conversation(
        messages=(
            Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello!"),
            *TWO_CALLS.messages[1:],
        ),
        source="t",
        index=0,
        tools=TOOLS,
    )
    template = resolve_template("qwen", tiny)
    assert trained_texts(tiny, encode_one(template, conv, last_turn_only=True)) == [
        QWEN_CALLS,
        "18C at 10:00.<|im_end|>",
    ]
    assert trained_texts(tiny, encode_one(template, conv))[0] == "Hello!<|im_end|>"


def test_single_call_formats_need_one_result_per_call(tiny: PreTrainedTokenizerBase) -> None:
    one_result = Conversation(
        messages=(*TWO_CALLS.messages[:4], TWO_CALLS.messages[5]), source="t", index=0, tools=TOOLS
    )
    for name in ("llama3", "chatglm3"):
        (result,) = resolve_template(name, tiny).encode_batch([one_result])
        assert isinstance(result, Reject) and result.reason == "no_tool_format" and "2 parallel calls" in result.detail
    assert isinstance(resolve_template("qwen", tiny).encode_batch([one_result])[0], Encoded)


def test_chatglm3_needs_the_observation_token() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)  # no <|observation|>
    (result,) = resolve_template("chatglm3", tokenizer).encode_batch([TWO_CALLS])
    assert isinstance(result, Reject) and result.reason == "no_tool_format" and "<|observation|>" in result.detail


def test_stop_tokens_include_the_call_enders(tiny: PreTrainedTokenizerBase) -> None:
    ids = tiny.convert_tokens_to_ids
    assert resolve_template("moss", tiny).stop_token_ids == (ids("<eom>"), ids("<eoc>"), tiny.eos_token_id)
    assert resolve_template("chatglm3", tiny).stop_token_ids == (ids("<|user|>"), ids("<|observation|>"), 2)


GLAIVE = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "toolcall" / "glaive_toolcall_zh_demo.json"


def glaive() -> list[Conversation]:
    from data_pipeline.formats import read_records

    records = list(read_records(GLAIVE, "sharegpt"))
    assert all(isinstance(r, Conversation) for r in records)
    return [r for r in records if isinstance(r, Conversation)]


def expected_trained(name: str, conv: Conversation) -> list[str]:
    """What each family trains: per assistant step, the call (in the family's syntax) or the reply, and its closer."""
    runs = []
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        calls = [(c.name, json.dumps(json.loads(c.arguments), ensure_ascii=False)) for c in m.tool_calls]
        match name:
            case "qwen" | "tokenizer":
                if calls:
                    body = "\n".join(
                        f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls
                    )
                    runs.append((m.content + "\n" if m.content else "") + body + "<|im_end|>")
                else:
                    runs.append(m.content + "<|im_end|>")
            case "llama3":
                runs += [f'{{"name": "{n}", "parameters": {a}}}<|eot_id|>' for n, a in calls]
                runs += [] if calls else [m.content.strip() + "<|eot_id|>"]
            case "moss":
                commands = ", ".join(f"{n}({a})" for n, a in calls)
                runs.append(
                    f"<|Inner Thoughts|>: {m.content or 'None'}<eot>\n<|Commands|>: {commands}<eoc>"
                    if calls
                    else f"<|MOSS|>: {m.content}<eom>"
                    if uses_tools(conv)
                    else f" {m.content}<eom>"  # no tool: MOSS's plain chat, the prompt ends with "<|MOSS|>:"
                )
            case "chatglm3":
                closer = "</s>" if i == len(conv.messages) - 1 else ""
                if not calls:
                    nxt = conv.messages[i + 1].role if i + 1 < len(conv.messages) else ""
                    closer = {"user": "<|user|>", "tool": "<|observation|>"}.get(nxt, closer)
                    runs.append(f"\n{m.content}{closer}")
                else:
                    runs.append(None)  # type: ignore[arg-type]  # checked by name below (Python call syntax)
    return runs


@pytest.mark.parametrize("name", [*TOOL_TEMPLATES])
def test_glaive_every_record_is_written_and_only_calls_and_replies_are_trained(
    tiny: PreTrainedTokenizerBase, name: str
) -> None:
    convs = glaive()
    tokenizer = with_jinja(QWEN25_TOOLS_JINJA) if name == "tokenizer" else tiny
    results = resolve_template(name, tokenizer).encode_batch(convs)
    assert [r for r in results if isinstance(r, Reject)] == []
    for conv, enc in zip(convs, results, strict=True):
        assert isinstance(enc, Encoded)
        got, want = trained_texts(tokenizer, enc), expected_trained(name, conv)
        assert len(got) == len(want), (conv.index, got)
        for text, expected in zip(got, want, strict=True):
            if expected is None:  # a chatglm3 call: name, tool_call(...) code, <|observation|>
                assert text.endswith("\n```<|observation|>") and "```python\ntool_call(" in text
            else:
                assert text == expected
        # Every tool result is in the prompt part, never trained.
        untrained = tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == X])
        assert all(m.content in untrained for m in conv.messages if m.role == "tool")


MOSS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "moss_003"


def test_moss_plugin_conversations_train_thoughts_and_commands_as_moss_wrote_them(
    tiny: PreTrainedTokenizerBase,
) -> None:
    from data_pipeline.formats import read_records

    template = resolve_template("moss", tiny)
    files = sorted(MOSS_DIR.glob("*_plugin_conversation_1.json"))
    assert len(files) == 5
    for path in files:
        original = json.loads(path.read_text(encoding="utf-8"))
        (conv,) = read_records(path, "moss")
        assert isinstance(conv, Conversation)
        enc = encode_one(template, conv)
        runs = trained_texts(tiny, enc)
        turns = [original["chat"][f"turn_{n}"] for n in range(1, len(original["chat"]) + 1)]
        plugin_turns = [t for t in turns if t["Commands"] != "<|Commands|>: None<eoc>\n"]
        # Each plugin turn's Inner Thoughts and Commands are trained exactly as MOSS's data writes them.
        calls = [t["Inner Thoughts"] + t["Commands"].removesuffix("\n") for t in plugin_turns]
        replies = [t["MOSS"].removesuffix("\n") for t in turns]
        assert [r for r in runs if r.startswith("<|Inner Thoughts|>")] == calls, path.name
        assert [r for r in runs if r.startswith("<|MOSS|>")] == replies
        untrained = tiny.decode([t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == X])
        assert all(m.content in untrained for m in conv.messages if m.role == "tool")


def test_generate_prompt_rows_offer_tools(tiny: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    from trainer.generation import GenerateError, encode_row, read_prompts

    bare = [WEATHER["function"], TIME["function"]]  # glaive's form: no {"type": "function"} wrapper
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "Weather and time in Paris?", "system": "Be brief.", "tools": bare}) + "\n"
        + json.dumps({"prompt": "Hi", "tools": json.dumps(bare)}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    first, second = read_prompts(path)
    template = resolve_template("qwen", tiny)
    assert encode_row(template, first, 0) == template.encode_prompt(list(TWO_CALLS.messages[:2]), TOOLS)
    assert encode_row(template, second, 1) == template.encode_prompt([Message(role="user", content="Hi")], TOOLS)
    with pytest.raises(GenerateError, match="prompt 0: encode_prompt: template 'default' has no tool format"):
        encode_row(resolve_template("default", tiny), first, 0)
    path.write_text(json.dumps({"prompt": "Hi", "tools": [{"description": "no name"}]}) + "\n", encoding="utf-8")
    with pytest.raises(GenerateError, match=r"prompts.jsonl:1: tools\[0\] is not a function schema with a name"):
        read_prompts(path)


SEED_CHATGLM3 = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "seed_models" / "chatglm3"


def test_chatglm3_tools_with_the_real_tokenizer_equal_the_vendor_algorithm(tmp_path: Path) -> None:
    """ChatGLM3's own tool preprocessing, spelled out with its SentencePiece model: per message the role id, then
    ``encode(metadata + "\\n")``, then ``encode(text)``; the tools in a first system turn; eos last; the loss mask
    (True on assistant messages) shifted right by one token."""
    import sentencepiece as spm

    from trainer.convert import chatglm2

    raw = json.loads((SEED_CHATGLM3 / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    chatglm2.build_tokenizer(SEED_CHATGLM3 / "tokenizer", raw, "chatglm3").save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(SEED_CHATGLM3 / "tokenizer" / "tokenizer.model"))
    role = {"system": 64794, "user": 64795, "assistant": 64796, "observation": 64797}
    tools_text = (
        "Answer the following questions as best as you can. You have access to the following tools:\n"
        + json.dumps([WEATHER["function"], TIME["function"]], indent=4, ensure_ascii=False)
    )
    messages = [
        ("system", "", tools_text, False),
        ("system", "", "Be brief.", False),
        ("user", "", "Weather and time in Paris?", False),
        ("assistant", "get_weather", "```python\ntool_call(city='Paris')\n```", True),
        ("observation", "", "18C", False),
        ("assistant", "get_time", "```python\ntool_call(city='Paris')\n```", True),
        ("observation", "", "10:00", False),
        ("assistant", "", "18C at 10:00.", True),
    ]
    ids, mask = [64790, 64792], [False, False]  # [gMASK] sop
    for name, metadata, text, loss in messages:
        piece = [role[name], *sp.encode(f"{metadata}\n"), *sp.encode(text)]
        ids += piece
        mask += [loss] * len(piece)
    ids.append(2)  # eos
    mask.append(False)
    labels = [token if shifted else X for token, shifted in zip(ids, [False, *mask[:-1]], strict=True)]

    enc = encode_one(resolve_template("chatglm3", tokenizer), TWO_CALLS)
    assert enc.input_ids == ids
    assert enc.labels == labels


# Llama 3.1's custom-tool format as a Jinja chat_template (tools in the first user turn, one call per message).
LLAMA31_TOOLS_JINJA = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
    "{%- if tools is not none %}"
    "{%- set first = messages[0].content | trim %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON "
    "for a function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\\n\\n\' }}'
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- elif m.tool_calls %}{%- set call = m.tool_calls[0].function %}"
    '{{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "\' + call.name + \'", "parameters": \' }}'
    "{{- call.arguments | tojson }}{{- '}<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_tokenizer_template_with_tools_equals_the_llama3_family(tiny: PreTrainedTokenizerBase) -> None:
    one_call = Conversation(
        messages=(
            *TWO_CALLS.messages[:2],
            Message(
                role="assistant", content="", tool_calls=(ToolCall(name="get_weather", arguments='{"city": "巴黎"}'),)
            ),
            Message(role="tool", content='{"temperature": "18C <|eot_id|>"}'),
            Message(role="assistant", content="18C."),
        ),
        source="t",
        index=0,
        tools=TOOLS,
    )
    family = resolve_template("llama3", tiny)
    own = resolve_template("tokenizer", with_jinja(LLAMA31_TOOLS_JINJA))
    assert own.stop_token_ids == family.stop_token_ids
    expected = encode_one(family, one_call)
    got = encode_one(own, one_call)
    assert got.input_ids == expected.input_ids
    assert got.labels == expected.labels
    for end in (2, 4):
        assert own.encode_prompt(list(one_call.messages[:end]), TOOLS) == family.encode_prompt(
            list(one_call.messages[:end]), TOOLS
        )
