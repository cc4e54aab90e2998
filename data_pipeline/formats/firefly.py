"""Firefly: one round as input and target.

{"input": "...", "target": "..."}
"""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.checks import conversation
from data_pipeline.formats.records import CorpusFormat, text_field
from sft_stack.chat.conversation import Conversation


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(
        [("user", text_field(record, "input")), ("assistant", text_field(record, "target"))], source, index
    )


FORMAT = CorpusFormat(
    name="firefly",
    fields=("input", "target"),
    convert=convert,
    detect=lambda keys, item_keys: {"input", "target"} <= keys,
    detect_rank=5,
)
