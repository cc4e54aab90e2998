"""A new corpus format is one module and one registry line: a throwaway format, written to a temporary directory and
imported, is detected, read, refused where its field is missing, column-mapped, and prepared into shards by the
real ``prepare``, without any other file of the project being edited (the chat-format twin is
tests/unit/test_chat_registry.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from data_pipeline.formats import COLUMN_FIELDS, FORMATS, REGISTRY, CorpusFormat, detect_format, read_records, register
from data_pipeline.formats.registry import DETECTED
from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from data_pipeline.schema import IGNORE_INDEX
from sft_stack.chat.conversation import Conversation, InputError, Message, Reject
from sft_stack.chat.templates import Encoded, resolve_template
from tests.helpers.data import write_jsonl
from tests.helpers.modules import imported_module

TINY_BPE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers" / "tiny_bpe"

THROWAWAY_MODULE = '''
"""A corpus format defined outside data_pipeline/formats: one question and its answer, {"q": ..., "a": ...}."""

from typing import Any

from data_pipeline.formats import CorpusFormat, register
from data_pipeline.formats.checks import conversation
from data_pipeline.formats.records import text_field
from sft_stack.chat.conversation import Conversation


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation([("user", text_field(record, "q")), ("assistant", text_field(record, "a"))], source, index)


FORMAT = register(
    CorpusFormat(
        name="throwaway_qa",
        fields=("q", "a"),
        convert=convert,
        detect=lambda keys, item_keys: {"q", "a"} <= keys,
        detect_rank=99,
    )
)
'''

RECORDS = [{"q": f"What is {a} + {a}?", "a": str(2 * a)} for a in range(6)]


@pytest.fixture
def throwaway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The throwaway module imported from a temporary directory; the registry restored afterwards."""
    saved = (list(REGISTRY), list(FORMATS), dict(COLUMN_FIELDS), list(DETECTED))
    with imported_module(tmp_path / "formats", "throwaway_corpus_format", THROWAWAY_MODULE, monkeypatch):
        yield "throwaway_qa"
    REGISTRY[:], FORMATS[:], DETECTED[:] = saved[0], saved[1], saved[3]
    COLUMN_FIELDS.clear()
    COLUMN_FIELDS.update(saved[2])


def test_it_is_detected_read_and_refused_by_field(throwaway: str, tmp_path: Path) -> None:
    assert FORMATS[-1] == throwaway and COLUMN_FIELDS[throwaway] == ("q", "a")
    source = write_jsonl(tmp_path / "qa.jsonl", [*RECORDS[:2], {"q": "no answer"}])
    assert detect_format(source) == throwaway
    first, second, refused = read_records(source, throwaway)
    assert first == Conversation(
        messages=(Message(role="user", content="What is 0 + 0?"), Message(role="assistant", content="0")),
        source=str(source),
        index=0,
    )
    assert isinstance(second, Conversation) and second.messages[1].content == "2"
    assert isinstance(refused, Reject)
    assert (refused.reason, refused.index, refused.detail) == ("missing_field", 2, "a is missing")


def test_a_column_mapping_names_its_fields(throwaway: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "2?", "answer": "two"}])
    columns = {"q": "question", "a": "answer"}
    assert detect_format(source, columns) == throwaway
    (record,) = read_records(source, throwaway, columns=columns)
    assert isinstance(record, Conversation)
    assert [(m.role, m.content) for m in record.messages] == [("user", "2?"), ("assistant", "two")]


def test_register_refuses_a_name_already_taken(throwaway: str) -> None:
    for name in ("alpaca", throwaway, "auto"):
        with pytest.raises(ValueError, match=f"corpus format {name!r} is already registered"):
            register(CorpusFormat(name=name))
    assert FORMATS.count(throwaway) == 1


def test_an_unregistered_name_is_still_refused_by_name(throwaway: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    with pytest.raises(
        InputError, match=r"unknown format 'throwaway_qa2' .*; known formats: alpaca, .*, throwaway_qa$"
    ):
        list(read_records(source, "throwaway_qa2"))


def test_prepare_writes_shards_from_the_new_format(throwaway: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "qa.jsonl", RECORDS)
    options = PrepareOptions(
        sources=(SourceSpec(path=str(source)),),  # format auto: the registered format is detected
        tokenizer=str(TINY_BPE),
        out=str(tmp_path / "out"),
        template="default",
        val_fraction=0.0,
        progress=False,
    )
    manifest = prepare(options)
    assert manifest.counts["samples_written"] == 6 and manifest.counts["samples_rejected"] == 0
    assert [s.format for s in manifest.sources] == [throwaway]

    tiny = AutoTokenizer.from_pretrained(str(TINY_BPE))
    template = resolve_template("default", tiny)
    conversations = [
        Conversation(
            messages=(Message(role="user", content=r["q"]), Message(role="assistant", content=r["a"])),
            source=str(source),
            index=n,
        )
        for n, r in enumerate(RECORDS)
    ]
    expected = sorted((e.input_ids, e.labels) for e in template.encode_batch(conversations) if isinstance(e, Encoded))
    rows = list(datasets.load_from_disk(str(tmp_path / "out" / "train")))
    assert sorted((row["input_ids"], row["labels"]) for row in rows) == expected
    answers = sorted(tiny.decode([t for t in labels if t != IGNORE_INDEX]) for _, labels in expected)
    assert answers == sorted(f"{2 * a}</s>" for a in range(6))
