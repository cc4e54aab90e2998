"""Alpaca (and BELLE, which publishes in it): instruction, optional input and system, output, optional history.

{"instruction": "...", "input": "", "output": "...", "history": [["user", "assistant"], ...]}
"""

from __future__ import annotations

from typing import Any

from data_pipeline.formats.checks import conversation
from data_pipeline.formats.records import (
    CorpusFormat,
    Refused,
    Turn,
    optional_list,
    optional_text,
    system_turn,
    text_field,
    type_name,
)
from sft_stack.chat.conversation import Conversation


def convert(record: dict[str, Any], source: str, index: int) -> Conversation:
    return conversation(_turns(record), source, index)


def _turns(record: dict[str, Any]) -> list[Turn]:
    instruction = text_field(record, "instruction")
    query = optional_text(record, "input")
    output = text_field(record, "output")
    turns: list[Turn] = list(system_turn(record, "system"))
    # LLaMA-Factory's alpaca form: earlier rounds as [[user, assistant], ...] before the instruction.
    for number, pair in enumerate(optional_list(record, "history")):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise Refused("non_string_field", f"history[{number}] is not a [user, assistant] pair")
        for part in pair:
            if not isinstance(part, str):
                raise Refused("non_string_field", f"history[{number}] holds {type_name(part)}, not a string")
        turns += [("user", pair[0]), ("assistant", pair[1])]
    user = f"{instruction}\n{query}" if query else instruction
    return [*turns, ("user", user), ("assistant", output)]


FORMAT = CorpusFormat(
    name="alpaca",
    fields=("instruction", "input", "output", "system", "history"),
    convert=convert,
    detect=lambda keys, item_keys: {"instruction", "output"} <= keys,
    detect_rank=4,
)
