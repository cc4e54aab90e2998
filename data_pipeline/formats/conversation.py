"""Firefly's multi-round form: a list of {human, assistant} rounds after an optional system.

{"system": "...", "conversation": [{"human": "...", "assistant": "..."}, ...]}
"""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.checks import conversation
from data_pipeline.formats.records import CorpusFormat, Turn, object_items, system_turn, text_field
from sft_stack.chat.conversation import Conversation


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(_turns(record), source, index)


def _turns(record: dict[str, Any]) -> list[Turn]:
    turns: list[Turn] = list(system_turn(record, "system"))
    for _, pair, where in object_items(record, "conversation"):
        turns += [("user", text_field(pair, "human", where)), ("assistant", text_field(pair, "assistant", where))]
    return turns


FORMAT = CorpusFormat(
    name="conversation",
    fields=("conversation", "system"),
    convert=convert,
    detect=lambda keys, item_keys: "conversation" in keys,
    detect_rank=3,
)
