"""Converted tokenizers and the chatglm2/chatglm3/baichuan2 templates against the vendors' own encodings.

References: tests/fixtures/real/seed_models/*/tokenizer_reference.json, produced by each vendor's tokenizer
class and prompt/fine-tuning code (README there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, Message
from sft_stack.chat.templates import resolve_template
from trainer.convert import baichuan, chatglm2

SEED = Path(__file__).resolve().parents[1] / "fixtures" / "real" / "seed_models"
CASES = {
    # fixture dir: (tokenizer builder, template)
    "chatglm2": (chatglm2.build_tokenizer, "chatglm2"),
    "chatglm3": (chatglm2.build_tokenizer, "chatglm3"),
    "baichuan2_7b": (baichuan.build_tokenizer_2, "baichuan2"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, dict]:
    """(family dir, the converted tokenizer reloaded from disk with AutoTokenizer, the vendor reference)."""
    from transformers import AutoTokenizer

    family = request.param
    build, template = CASES[family]
    raw = json.loads((SEED / family / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    out = tmp_path_factory.mktemp(family)
    build(SEED / family / "tokenizer", raw, template).save_pretrained(out)
    reference = json.loads((SEED / family / "tokenizer_reference.json").read_text(encoding="utf-8"))
    return family, AutoTokenizer.from_pretrained(out), reference


def test_ids_equal_the_vendor_tokenizer(converted: tuple[str, Any, dict]) -> None:
    family, tokenizer, reference = converted
    strings = reference["strings"]
    assert len(strings) >= 150
    for probe in strings:
        text = probe["text"]
        assert tokenizer.encode(text, add_special_tokens=False) == probe["ids"], (family, text)
        assert tokenizer.encode(text) == probe["ids_with_special_tokens"], (family, text)
        if not any(name in text for name in ("<s>", "</s>", "<unk>")):
            # The vendor's slow decode adds a space after a special token; elsewhere decoding is equal.
            assert tokenizer.decode(probe["ids"]) == probe["decode"], (family, text)
    assert len(tokenizer) == reference["vocab"]["vocab_size"]


def _vendor_finetune(case: dict) -> tuple[list[int], list[int]]:
    """The vendor's training ids/labels without the right padding its script adds."""
    ids, labels = case["finetune"]["input_ids"], case["finetune"]["labels"]
    end = len(ids)
    while end and ids[end - 1] == 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    return ids[:end], labels[:end]


def test_templates_equal_the_vendor_encodings(converted: tuple[str, Any, dict]) -> None:
    family, tokenizer, reference = converted
    template = resolve_template(CASES[family][1], tokenizer)
    checked = 0
    for name, case in reference["chat"].items():
        if "input_ids" not in case.get("finetune", {}):
            continue  # ChatGLM2/Baichuan2 fine-tune code has no system role
        messages = [Message(role=m["role"], content=m["content"]) for m in case["messages"]]
        # ChatGLM2's ptuning trains only the last answer; ChatGLM3 and Baichuan2 train every answer.
        last_only = family == "chatglm2"
        (encoded,) = template.encode_batch(
            [Conversation(messages=tuple(messages), source=family, index=0)], last_turn_only=last_only
        )
        ids, labels = _vendor_finetune(case)
        assert encoded.input_ids == ids, (family, name)
        if family == "baichuan2_7b":
            # fine-tune.py puts an eos label on every user token (position 0 is never a target after the shift);
            # ours leaves them untrained: everything else is equal.
            labels = [
                IGNORE_INDEX if token == 195 and label == 2 else label for token, label in zip(ids, labels, strict=True)
            ]
        assert encoded.labels == labels, (family, name)
        assert template.encode_prompt(messages[:-1]) == case["inference_prompt"]["input_ids"], (family, name)
        checked += 1
    assert checked >= 2


def test_control_strings_in_messages_stay_text(converted: tuple[str, Any, dict]) -> None:
    family, tokenizer, _ = converted
    template = resolve_template(CASES[family][1], tokenizer)
    controls = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    controls |= {195, 196} if family == "baichuan2_7b" else set()
    plain = template.encode_prompt([Message(role="user", content="x")])
    for text in ("<reserved_106>", "</s>", "<s>", "[gMASK]", "<|user|>", "sop", "a <reserved_107>\n<reserved_106>\n"):
        typed = template.encode_prompt([Message(role="user", content=text)])
        # The only control ids are the template's own, the ones around "x" too.
        assert sorted(t for t in typed if t in controls) == sorted(t for t in plain if t in controls), (family, text)


def test_auto_picks_the_recorded_template(converted: tuple[str, Any, dict], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    family, tokenizer, _ = converted
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_format"] = CASES[family][1]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert resolve_template("auto", AutoTokenizer.from_pretrained(tmp_path)).name == CASES[family][1]
