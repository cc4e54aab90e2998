"""Safety-Prompts: one JSON object mapping each scenario to a list of {prompt, response, type}, streamed scenario
by scenario (bounded_json.iter_scenarios); records are numbered across scenarios.

    {"Insult": [{"prompt": "...", "response": "...", "type": "Insult"}, ...], ...}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ijson

from data_pipeline import bounded_json
from data_pipeline.formats.checks import checked_unicode, validated
from data_pipeline.formats.readers import first_byte
from data_pipeline.formats.records import (
    MAX_DEPTH,
    CorpusFormat,
    Refused,
    first_line,
    safe_dump,
    text_field,
    truncate,
    type_name,
)
from sft_stack.chat.conversation import Conversation, InputError, Record, Reject, Role


def read_file(path: Path, max_bytes: int) -> Iterator[Record]:
    with path.open("rb") as f:
        if first_byte(f) != b"{":
            raise InputError(
                f"{path}: the safety format is one JSON object mapping scenario -> [{{prompt, response, type}}]; "
                f"this file does not start with an object"
            )
    return _iter_safety(path, max_bytes)


def _iter_safety(path: Path, max_bytes: int) -> Iterator[Record]:
    source = str(path)
    index = 0
    with path.open("rb") as f:
        scenarios = bounded_json.iter_scenarios(bounded_json.skip_bom(f), max_bytes, MAX_DEPTH)
        while True:
            try:
                scenario, is_element, built = next(scenarios)
            except StopIteration:
                return
            except (ijson.JSONError, UnicodeDecodeError) as error:
                raise InputError(
                    f"{path}: the JSON object is broken after record {index}: {first_line(error)}; fix the file"
                ) from error
            if built.reason:
                yield Reject(
                    reason=built.reason,
                    source=source,
                    index=index,
                    raw="",
                    detail=f"scenario {scenario!r}: {built.detail}",
                )
            elif not is_element:
                yield Reject(
                    reason="non_string_field",
                    source=source,
                    index=index,
                    raw=truncate(safe_dump({scenario: built.value})),
                    detail=f"scenario {scenario!r} is {type_name(built.value)}, not a list",
                )
            else:
                yield _safety_record(built.value, scenario, source, index)
            index += 1


def _safety_record(item: Any, scenario: str, source: str, index: int) -> Record:
    try:
        if not isinstance(item, dict):
            raise Refused("non_string_field", f"an element of {scenario!r} is {type_name(item)}, not an object")
        turns: list[tuple[Role, str]] = [
            ("user", text_field(item, "prompt")),
            ("assistant", text_field(item, "response")),
        ]
        messages, dropped = validated(turns)
        conversation = Conversation(messages=messages, source=source, index=index, dropped_turns=dropped)
        return checked_unicode(conversation)
    except Refused as refused:
        return Reject(
            reason=refused.reason,
            source=source,
            index=index,
            raw=truncate(safe_dump(item)),
            detail=f"scenario {scenario!r}: {refused.detail}",
        )


FORMAT = CorpusFormat(
    name="safety",
    detect=lambda keys, item_keys: {"prompt", "response"} <= item_keys,
    detect_rank=7,
    read_file=read_file,
)
