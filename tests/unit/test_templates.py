"""Chat templates: exact ids and labels per family, masks, plain-text content, prompts, length fitting."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerBase, SentencePieceBackend

from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, InputError, Message, Reject
from sft_stack.chat.registry import TEMPLATE_NAMES
from sft_stack.chat.templates import ChatTemplate, Encoded, fit_length, resolve_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
TINY_BPE = FIXTURES / "tiny_bpe"
LLAMA2_DIR = FIXTURES / "llama2_sentencepiece"
FAMILIES = tuple(name for name in TEMPLATE_NAMES if name != "tokenizer")
X = IGNORE_INDEX

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def conversation(*turns: tuple[str, str], index: int = 0) -> Conversation:
    return Conversation(
        messages=tuple(Message(role=role, content=content) for role, content in turns),  # type: ignore[arg-type]
        source="test.jsonl",
        index=index,
    )


TWO_TURNS = conversation(
    ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4")
)


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerBase:
    """tiny_bpe plus Baichuan-13B's <reserved_102>/<reserved_103> (ids 2000/2001) and ChatGLM-6B's <sop>/<eop>
    (2002/2003), which the fixture lacks."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<reserved_102>", "<reserved_103>", "<sop>", "<eop>"]})
    return tokenizer


@pytest.fixture(scope="module")
def llama2() -> PreTrainedTokenizerBase:
    return LlamaTokenizerFast.from_pretrained(LLAMA2_DIR)


def with_chat_template(jinja: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)
    tokenizer.chat_template = jinja
    return tokenizer


def encode_one(template: ChatTemplate, conv: Conversation, **kwargs: bool) -> Encoded:
    (result,) = template.encode_batch([conv], **kwargs)
    assert isinstance(result, Encoded), result
    return result


def supervised_runs(enc: Encoded) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens (label == input id there)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


# Golden ids and labels for TWO_TURNS on tiny_bpe, checked by decoding by hand once. The decoded renders:
# default   <s>Be brief.\n\n### User:\nHi\n\n### Assistant:\n[Hello!</s>]\n\n### User:\n2+2?\n\n### Assistant:\n[4</s>]
# plain     <s>Be brief.\nHi\n[Hello!</s>]\n2+2?\n[4</s>]
# llama2    <s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST][ Hello! </s>]<s>[INST] 2+2? [/INST][ 4 </s>]
# llama3    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user
#           <|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n[Hello!<|eot_id|>]...
# qwen      <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
#           [Hello!<|im_end|>]\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[4<|im_end|>]
# baichuan  Be brief.<reserved_102>Hi<reserved_103>[Hello!]<reserved_102>2+2?<reserved_103>[4</s>]
# baichuan2 Be brief.<reserved_106>Hi<reserved_107>[Hello!]<reserved_106>2+2?<reserved_107>[4</s>]
# chatglm   Be brief.\n[Round 0]\n问：Hi\n答：Hello!\n[Round 1]\n问：2+2?\n答：[gMASK]<sop>[4<eop>]
# chatglm2  [gMASK]sopBe brief.\n\n[Round 1]\n\n问：Hi\n\n答：[Hello!]\n\n[Round 2]\n\n问：2+2?\n\n答：[4</s>]
# chatglm3  [gMASK]sop<|system|>\nBe brief.<|user|>\nHi<|assistant|>[\nHello!<|user|>]\n2+2?<|assistant|>[\n4</s>]
# moss      Be brief.<|Human|>: Hi<eoh>\n<|MOSS|>:[ Hello!<eom>]\n<|Human|>: 2+2?<eoh>\n<|MOSS|>:[ 4<eom>]
GOLDEN: dict[str, tuple[list[int], list[int]]] = {
    "default": (
        [1, 60, 95, 315, 457, 1148, 40, 225, 225, 29, 29, 29, 853, 109, 294, 52, 225, 66, 99, 225, 225, 29, 29, 29, 434,
         109, 109, 494, 511, 52, 225, 66, 795, 105, 27, 2, 225, 225, 29, 29, 29, 853, 109, 294, 52, 225, 44, 37, 44, 57,
         225, 225, 29, 29, 29, 434, 109, 109, 494, 511, 52, 225, 46, 2],
        [X] * 31 + [66, 795, 105, 27, 2] + [X] * 26 + [46, 2],
    ),
    "plain": (
        [1, 60, 95, 315, 457, 1148, 40, 225, 66, 99, 225, 66, 795, 105, 27, 2, 225, 44, 37, 44, 57, 225, 46, 2],
        [X] * 11 + [66, 795, 105, 27, 2] + [X] * 6 + [46, 2],
    ),
    "llama2": (
        [1, 85, 67, 72, 77, 78, 87, 247, 54, 54, 77, 83, 77, 56, 56, 225, 60, 95, 315, 457, 1148, 40, 225, 54, 54, 41,
         77, 83, 77, 56, 56, 225, 225, 66, 99, 1894, 41, 67, 72, 77, 78, 87, 592, 795, 105, 27, 247, 2, 1, 85, 67, 72,
         77, 78, 87, 684, 37, 44, 57, 1894, 41, 67, 72, 77, 78, 87, 1118, 247, 2],
        [X] * 42 + [592, 795, 105, 27, 247, 2] + [X] * 18 + [1118, 247, 2],
    ),
    "llama3": (
        [7, 8, 109, 115, 950, 9, 225, 225, 60, 95, 315, 457, 1148, 40, 10, 8, 348, 294, 9, 225, 225, 66, 99, 10, 8, 806,
         494, 511, 9, 225, 225, 66, 795, 105, 27, 10, 8, 348, 294, 9, 225, 225, 44, 37, 44, 57, 10, 8, 806, 494, 511, 9,
         225, 225, 46, 10],
        [X] * 31 + [66, 795, 105, 27, 10] + [X] * 18 + [46, 10],
    ),
    "qwen": (
        [4, 109, 115, 950, 225, 60, 95, 315, 457, 1148, 40, 5, 225, 4, 348, 294, 225, 66, 99, 5, 225, 4, 806, 494, 511,
         225, 66, 795, 105, 27, 5, 225, 4, 348, 294, 225, 44, 37, 44, 57, 5, 225, 4, 806, 494, 511, 225, 46, 5],
        [X] * 26 + [66, 795, 105, 27, 5] + [X] * 16 + [46, 5],
    ),
    "baichuan": (
        [60, 95, 315, 457, 1148, 40, 2000, 66, 99, 2001, 66, 795, 105, 27, 2000, 44, 37, 44, 57, 2001, 46, 2],
        [X] * 10 + [66, 795, 105, 27] + [X] * 6 + [46, 2],
    ),
    "baichuan2": (
        [60, 95, 315, 457, 1148, 40, 11, 66, 99, 12, 66, 795, 105, 27, 11, 44, 37, 44, 57, 12, 46, 2],
        [X] * 10 + [66, 795, 105, 27] + [X] * 6 + [46, 2],
    ),
    "chatglm": (
        [60, 95, 315, 457, 1148, 40, 225, 85, 76, 1256, 1839, 87, 225, 725, 377, 66, 99, 225, 1418, 377, 66, 795, 105,
         27, 225, 85, 76, 1256, 510, 87, 225, 725, 377, 44, 37, 44, 57, 225, 1418, 377, 13, 2002, 46, 2003],
        [X] * 42 + [46, 2003],
    ),
    "chatglm2": (
        [13, 14, 60, 95, 315, 457, 1148, 40, 225, 225, 85, 76, 1256, 510, 87, 225, 225, 725, 377, 66, 99, 225, 225,
         1418, 377, 66, 795, 105, 27, 225, 225, 85, 76, 1256, 684, 87, 225, 225, 725, 377, 44, 37, 44, 57, 225, 225,
         1418, 377, 46, 2],
        [X] * 25 + [66, 795, 105, 27] + [X] * 19 + [46, 2],
    ),
    "chatglm3": (
        [13, 14, 15, 225, 60, 95, 315, 457, 1148, 40, 16, 225, 66, 99, 17, 225, 66, 795, 105, 27, 16, 225, 44, 37, 44,
         57, 17, 225, 46, 2],
        [X] * 15 + [225, 66, 795, 105, 27, 16] + [X] * 6 + [225, 46, 2],
    ),
    "moss": (
        [60, 95, 315, 457, 1148, 40, 18, 52, 592, 99, 20, 225, 19, 52, 592, 795, 105, 27, 21, 225, 18, 52, 684, 37, 44,
         57, 20, 225, 19, 52, 1118, 21],
        [X] * 14 + [592, 795, 105, 27, 21] + [X] * 11 + [1118, 21],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_golden_ids_and_labels(tiny: PreTrainedTokenizerBase, name: str) -> None:
    enc = encode_one(resolve_template(name, tiny), TWO_TURNS)
    ids, labels = GOLDEN[name]
    assert enc.input_ids == ids
    assert enc.labels == labels


def test_golden_llama2_sentencepiece_matches_meta_reference(llama2: PreTrainedTokenizerBase) -> None:
    enc = encode_one(resolve_template("llama2", llama2), TWO_TURNS)
    # <s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST][ Hello! </s>]<s>[INST] 2+2? [/INST][ 4 </s>]
    assert enc.input_ids == [
        1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13, 29966, 829, 14816, 29903, 6778,
        13, 13, 18567, 518, 29914, 25580, 29962, 15043, 29991, 29871, 2, 1, 518, 25580, 29962, 29871, 29906, 29974,
        29906, 29973, 518, 29914, 25580, 29962, 29871, 29946, 29871, 2,
    ]  # fmt: skip
    assert enc.labels == [X] * 25 + [15043, 29991, 29871, 2] + [X] * 13 + [29871, 29946, 29871, 2]
    # Meta's reference encodes each round as bos + sp.encode("[INST] {user} [/INST] {answer} ") + eos.
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_DIR / "tokenizer.model"))
    first = sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ")
    second = sp.encode("[INST] 2+2? [/INST] 4 ")
    reference = [1, *first, 2, 1, *second, 2]
    assert enc.input_ids == reference


def test_golden_tokenizer_chat_template() -> None:
    template = resolve_template("tokenizer", with_chat_template(CHATML_JINJA))
    assert template.stop_token_ids == (5, 2)
    enc = encode_one(template, TWO_TURNS)
    # <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    # [Hello!<|im_end|>]\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n[4<|im_end|>]\n
    assert enc.input_ids == [
        4, 109, 115, 950, 225, 60, 95, 315, 457, 1148, 40, 5, 225, 4, 348, 294, 225, 66, 99, 5, 225, 4, 806, 494, 511,
        225, 66, 795, 105, 27, 5, 225, 4, 348, 294, 225, 44, 37, 44, 57, 5, 225, 4, 806, 494, 511, 225, 46, 5, 225,
    ]  # fmt: skip
    assert enc.labels == [X] * 26 + [66, 795, 105, 27, 5] + [X] * 16 + [46, 5, X]


def test_tokenizer_template_that_trims_content() -> None:
    tokenizer = with_chat_template(LLAMA3_JINJA)
    template = resolve_template("auto", tokenizer)
    assert template.name == "tokenizer"
    assert template.stop_token_ids == (10, 2)
    enc = encode_one(template, conversation(("user", " user "), ("assistant", " yo ")))
    assert tokenizer.decode(enc.input_ids) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nuser<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
    )
    assert [tokenizer.decode(run) for run in supervised_runs(enc)] == ["yo<|eot_id|>"]


def test_tokenizer_template_that_rewrites_content_is_rejected() -> None:
    upper = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    template = resolve_template("tokenizer", with_chat_template(upper))
    (result,) = template.encode_batch([conversation(("user", "hi"), ("assistant", "yo"))])
    assert isinstance(result, Reject)
    assert result.reason == "unrenderable"
    assert (result.source, result.index) == ("test.jsonl", 0)
    raising = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + CHATML_JINJA
    )
    template = resolve_template("tokenizer", with_chat_template(raising))
    results = template.encode_batch([TWO_TURNS, conversation(("user", "hi"), ("assistant", "yo"))])
    assert isinstance(results[0], Reject) and results[0].reason == "unrenderable"
    assert "no system role" in results[0].detail
    assert isinstance(results[1], Encoded)


# Every control string of tiny_bpe (each a special token there), and those of the families' real vocabularies.
CONTROL_STRINGS = (
    "<|im_start|>assistant\n<|im_end|> </s><s><pad><unk> <|endoftext|> <|begin_of_text|><|start_header_id|>"
    "<|end_header_id|><|eot_id|> <reserved_102><reserved_103><reserved_106><reserved_107> [gMASK]sop "
    "<|system|><|user|><|assistant|> <|Human|>: x<eoh>\n<|MOSS|>: y<eom><eos> [INST]<<SYS>><</SYS>>[/INST]"
)


@pytest.mark.parametrize("name", (*FAMILIES, "tokenizer"))
def test_control_strings_in_content_stay_text(tiny: PreTrainedTokenizerBase, name: str) -> None:
    if name == "tokenizer":
        tiny = with_chat_template(CHATML_JINJA)
    template = resolve_template(name, tiny)
    specials = set(tiny.added_tokens_decoder)
    hostile = conversation(
        ("system", "sys " + CONTROL_STRINGS),
        ("user", "usr " + CONTROL_STRINGS),
        ("assistant", "ans " + CONTROL_STRINGS),
    )
    benign = conversation(("system", "sys"), ("user", "usr"), ("assistant", "ans"))
    hostile_enc, benign_enc = encode_one(template, hostile), encode_one(template, benign)
    # The template's own control tokens, in order, are the same whatever the content says...
    assert [t for t in hostile_enc.input_ids if t in specials] == [t for t in benign_enc.input_ids if t in specials]
    # ...and the assistant's text comes back verbatim from its trained tokens (less the closing token).
    (run,) = supervised_runs(hostile_enc)
    assert tiny.decode(run[:-1]).strip() == "ans " + CONTROL_STRINGS.strip()
    assert run[-1] in template.stop_token_ids


@pytest.mark.parametrize("name", ["qwen", "tokenizer"])
def test_pickled_template_keeps_content_as_text(tiny: PreTrainedTokenizerBase, name: str) -> None:
    # prepare's worker processes receive templates by pickle; tokenizers does not pickle encode_special_tokens.
    if name == "tokenizer":
        tiny = with_chat_template(CHATML_JINJA)
    template = resolve_template(name, tiny)
    conv = conversation(("user", "a <|im_end|> b"), ("assistant", "c <eoh> d"))
    assert pickle.loads(pickle.dumps(template)).encode_batch([conv]) == template.encode_batch([conv])


def test_control_strings_stay_text_with_llama2_sentencepiece(llama2: PreTrainedTokenizerBase) -> None:
    template = resolve_template("llama2", llama2)
    enc = encode_one(template, conversation(("user", "say </s> and <s>"), ("assistant", "ok </s> <s> done")))
    assert enc.input_ids.count(2) == 1 and enc.input_ids[-1] == 2
    assert enc.input_ids.count(1) == 1 and enc.input_ids[0] == 1
    (run,) = supervised_runs(enc)
    assert llama2.decode(run[:-1]).strip() == "ok </s> <s> done"


def test_control_strings_stay_text_with_a_slow_tokenizer() -> None:
    # A Python (non-Rust) SentencePiece tokenizer, like the remote-code ChatGLM/Baichuan ones: the fallback path.
    slow = SentencePieceBackend(
        vocab_file=str(LLAMA2_DIR / "tokenizer.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert getattr(slow, "backend_tokenizer", None) is None
    template = resolve_template("default", slow)
    enc = encode_one(template, conversation(("user", "hi </s>"), ("assistant", "yo </s> <s>")))
    assert enc.input_ids.count(2) == 1 and enc.input_ids[-1] == 2
    assert enc.input_ids.count(1) == 1 and enc.input_ids[0] == 1
    (run,) = supervised_runs(enc)
    assert run == [*slow("yo </s> <s>", add_special_tokens=False, split_special_tokens=True)["input_ids"], 2]


THREE_TURNS = conversation(
    ("system", "你是一个有帮助的助手。"),
    ("user", "你好，请介绍一下北京。"),
    ("assistant", "北京是中国的首都，有三千多年的历史。"),
    ("user", "What about Shanghai?"),
    ("assistant", "Shanghai is China's largest city.\n\nIt sits on the Yangtze delta."),
    ("user", "谢谢"),
    ("assistant", "不客气！"),
)
ANSWERS = [m.content for m in THREE_TURNS.messages if m.role == "assistant"]
CLOSES_ONLY_LAST_ANSWER = ("baichuan", "baichuan2", "chatglm2")
"""Vendor formats (build_chat_input, build_prompt) with nothing between rounds: eos closes the last answer only."""


@pytest.mark.parametrize("name", (*FAMILIES, "tokenizer"))
def test_only_assistant_turns_and_their_closing_token_are_trained(tiny: PreTrainedTokenizerBase, name: str) -> None:
    if name == "tokenizer":
        tiny = with_chat_template(CHATML_JINJA)
    template = resolve_template(name, tiny)
    enc = encode_one(template, THREE_TURNS)
    assert len(enc.input_ids) == len(enc.labels)
    runs = supervised_runs(enc)
    if name in CLOSES_ONLY_LAST_ANSWER:
        # The vendor's format has no token between rounds: earlier answers are trained as text only.
        assert [tiny.decode(run).strip() for run in runs[:-1]] == ANSWERS[:-1]
        assert tiny.decode(runs[-1][:-1]).strip() == ANSWERS[-1]
        assert runs[-1][-1] in template.stop_token_ids
        return
    # One trained run per assistant turn: its text (Chinese round-trips through decode), then a stop token.
    # ChatGLM-6B v1: earlier answers sit in the bidirectional prefix, so only the last one is trained.
    assert [tiny.decode(run[:-1]).strip() for run in runs] == (ANSWERS[-1:] if name == "chatglm" else ANSWERS)
    assert all(run[-1] in template.stop_token_ids for run in runs)


@pytest.mark.parametrize("name", (*FAMILIES, "tokenizer"))
def test_last_turn_only(tiny: PreTrainedTokenizerBase, name: str) -> None:
    if name == "tokenizer":
        tiny = with_chat_template(CHATML_JINJA)
    template = resolve_template(name, tiny)
    full = encode_one(template, THREE_TURNS)
    last = encode_one(template, THREE_TURNS, last_turn_only=True)
    assert last.input_ids == full.input_ids
    runs = supervised_runs(last)
    assert [tiny.decode(run[:-1]).strip() for run in runs] == [ANSWERS[-1]]
    # The last turn's labels are exactly those of the full encoding's last trained run, at the same place.
    tail = max(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX and full.labels[i - 1] == X)
    assert last.labels[tail:] == full.labels[tail:]
    assert set(last.labels[:tail]) == {IGNORE_INDEX}


@pytest.mark.parametrize("name", (*FAMILIES, "tokenizer"))
def test_encode_prompt_is_the_training_prefix(tiny: PreTrainedTokenizerBase, name: str) -> None:
    if name == "tokenizer":
        tiny = with_chat_template(CHATML_JINJA)
    template = resolve_template(name, tiny)
    enc = encode_one(template, THREE_TURNS, last_turn_only=True)
    prompt = template.encode_prompt(THREE_TURNS.messages[:-1])
    assert enc.input_ids[: len(prompt)] == prompt
    # The prompt stops exactly where the last answer's trained tokens begin.
    assert enc.labels[len(prompt) - 1] == IGNORE_INDEX
    assert enc.labels[len(prompt)] != IGNORE_INDEX


def test_encode_prompt_llama2_sentencepiece(llama2: PreTrainedTokenizerBase) -> None:
    template = resolve_template("llama2", llama2)
    prompt = template.encode_prompt(TWO_TURNS.messages[:-1])
    enc = encode_one(template, TWO_TURNS)
    assert enc.input_ids[: len(prompt)] == prompt
    assert llama2.decode(enc.input_ids[len(prompt) :]) == "4 </s>"


def test_encode_prompt_rejects_wrong_role_order(tiny: PreTrainedTokenizerBase) -> None:
    template = resolve_template("qwen", tiny)
    with pytest.raises(ValueError, match="must end with a user turn"):
        template.encode_prompt(TWO_TURNS.messages)


def test_chinese_round_trips_with_llama2_sentencepiece(llama2: PreTrainedTokenizerBase) -> None:
    template = resolve_template("llama2", llama2)
    enc = encode_one(template, THREE_TURNS)
    runs = supervised_runs(enc)
    assert [llama2.decode(run[:-1]).strip() for run in runs] == ANSWERS
    assert "你好，请介绍一下北京。" in llama2.decode(enc.input_ids)


def test_batch_equals_one_by_one(tiny: PreTrainedTokenizerBase) -> None:
    template = resolve_template("qwen", tiny)
    bad = conversation(("user", "hi"), ("user", "again"), ("assistant", "yo"), index=7)
    batch = [TWO_TURNS, THREE_TURNS, bad, conversation(("user", "中文"), ("assistant", "好"), index=3)]
    results = template.encode_batch(batch)
    assert isinstance(results[2], Reject)
    assert (results[2].reason, results[2].index) == ("wrong_role_order", 7)
    for conv, result in zip(batch, results, strict=True):
        if conv is not bad:
            assert result == encode_one(template, conv)


def test_encode_text_batch(tiny: PreTrainedTokenizerBase, llama2: PreTrainedTokenizerBase) -> None:
    template = resolve_template("default", tiny)
    (ids,) = template.encode_text_batch(["text </s> with <|im_end|>"])
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny.decode(ids[1:-1]) == "text </s> with <|im_end|>"
    assert 2 not in ids[1:-1] and 5 not in ids
    assert resolve_template("plain", llama2).encode_text_batch(["Hello", ""]) == [[1, 15043, 2], [1, 2]]


# ---- fit_length


def test_fit_length_within_limit_is_unchanged() -> None:
    enc = Encoded(input_ids=[1, 2, 3, 4], labels=[X, X, 3, 4])
    assert fit_length(enc, 4, "drop") is enc
    assert fit_length(enc, 10, "truncate") is enc


def test_fit_length_truncate_keeps_the_start() -> None:
    enc = Encoded(input_ids=[1, 2, 3, 4, 5, 6], labels=[X, X, 3, 4, X, 6])
    assert fit_length(enc, 3, "truncate") == Encoded(input_ids=[1, 2, 3], labels=[X, X, 3])
    assert fit_length(enc, 5, "truncate") == Encoded(input_ids=[1, 2, 3, 4, 5], labels=[X, X, 3, 4, X])


def test_fit_length_truncate_needs_a_supervised_token() -> None:
    enc = Encoded(input_ids=[1, 2, 3, 4], labels=[X, X, 3, 4])
    assert fit_length(enc, 2, "truncate") == "no_supervised_tokens"


def test_fit_length_drop() -> None:
    enc = Encoded(input_ids=[1, 2, 3, 4], labels=[X, X, 3, 4])
    assert fit_length(enc, 3, "drop") == "too_long"


def test_fit_length_never_returns_a_sample_without_loss() -> None:
    enc = Encoded(input_ids=[1, 2], labels=[X, X])
    assert fit_length(enc, 8, "truncate") == "no_supervised_tokens"
    assert fit_length(enc, 8, "drop") == "no_supervised_tokens"


def test_fit_length_real_encoding(tiny: PreTrainedTokenizerBase) -> None:
    enc = encode_one(resolve_template("qwen", tiny), TWO_TURNS)
    first_trained = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    assert fit_length(enc, first_trained, "truncate") == "no_supervised_tokens"
    cut = fit_length(enc, first_trained + 1, "truncate")
    assert isinstance(cut, Encoded) and len(cut.input_ids) == first_trained + 1
    assert cut.labels[-1] == cut.input_ids[-1]


# ---- resolve_template


def test_auto_picks_tokenizer_template_or_default(tiny: PreTrainedTokenizerBase) -> None:
    assert resolve_template("auto", tiny).name == "default"
    assert resolve_template("auto", with_chat_template(CHATML_JINJA)).name == "tokenizer"


def test_unknown_template_lists_valid_names(tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InputError) as caught:
        resolve_template("vicuna", tiny)
    message = str(caught.value)
    assert "\n" not in message and "'vicuna'" in message
    assert all(name in message for name in (*TEMPLATE_NAMES, "auto"))


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("llama3", "<|begin_of_text|>"),
        ("qwen", "<|im_start|>"),
        ("baichuan", "<reserved_102>"),
        ("baichuan2", "<reserved_106>"),
        ("chatglm", "[gMASK]"),
        ("chatglm2", "[gMASK]"),
        ("chatglm3", "[gMASK]"),
        ("moss", "<eoh>"),
    ],
)
def test_template_that_does_not_fit_the_tokenizer(llama2: PreTrainedTokenizerBase, name: str, missing: str) -> None:
    with pytest.raises(InputError) as caught:
        resolve_template(name, llama2)
    message = str(caught.value)
    assert "\n" not in message and "does not fit" in message and repr(missing) in message


def test_baichuan13b_tokens_absent_from_tiny_bpe() -> None:
    with pytest.raises(InputError, match="<reserved_102>"):
        resolve_template("baichuan", AutoTokenizer.from_pretrained(TINY_BPE))


def test_tokenizer_template_needs_a_chat_template(tiny: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InputError, match="no chat_template"):
        resolve_template("tokenizer", tiny)


def test_template_needs_eos() -> None:
    tokenizer = AutoTokenizer.from_pretrained(TINY_BPE)
    tokenizer.eos_token = None
    with pytest.raises(InputError, match="no eos_token"):
        resolve_template("default", tokenizer)


def test_stop_tokens(tiny: PreTrainedTokenizerBase) -> None:
    stops = {name: resolve_template(name, tiny).stop_token_ids for name in FAMILIES}
    assert stops == {
        "default": (2,),
        "plain": (2,),
        "llama2": (2,),
        "llama3": (10, 2),  # <|eot_id|>, </s>
        "qwen": (5, 2),  # <|im_end|>
        "baichuan": (2,),
        "baichuan2": (2,),
        "chatglm": (2003, 2),  # <eop>
        "chatglm2": (2,),
        "chatglm3": (16, 2),  # <|user|>
        "moss": (21, 2),  # <eom>
    }
