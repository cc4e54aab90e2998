"""The wire form of a block's records crossing the process pool: plain tuples pickle about 4x faster than the
frozen dataclasses they stand for. ``from_wire(to_wire(samples)) == samples``."""

from __future__ import annotations

from typing import Any

from data_pipeline.formats import Line
from sft_stack.chat.conversation import Conversation, Message, Record, Reject, Text, ToolCall

Sample = tuple[int, Record | Line]
"""(source position, record). A JSON line is left unparsed (a Line) until the block is processed: parsing in the
process that tokenizes keeps the reading process cheap, so it does not compete with the workers for cores."""

Wire = tuple[Any, ...]
"""A record as sent to a worker."""


def to_wire(records: list[Sample]) -> list[Wire]:
    wire: list[Wire] = []
    for position, r in records:
        if isinstance(r, Line):
            wire.append(("l", position, r.source, r.index, r.fmt, r.data, r.columns))
        elif isinstance(r, Conversation):
            messages = tuple(
                (m.role, m.content, tuple((c.name, c.arguments) for c in m.tool_calls), m.name) for m in r.messages
            )
            wire.append(("c", position, r.source, r.index, messages, r.tools, r.dropped_turns))
        elif isinstance(r, Text):
            wire.append(("t", position, r.source, r.index, r.text))
        else:
            wire.append(("r", position, r.source, r.index, r.reason, r.raw, r.detail))
    return wire


def from_wire(wire: list[Wire]) -> list[Sample]:
    records: list[Sample] = []
    for item in wire:
        kind, position, source, index = item[:4]
        record: Record | Line
        if kind == "l":
            record = Line(source=source, fmt=item[4], index=index, data=item[5], columns=item[6])
        elif kind == "c":
            messages = tuple(
                Message(
                    role=role,
                    content=content,
                    tool_calls=tuple(ToolCall(name=n, arguments=a) for n, a in calls),
                    name=name,
                )
                for role, content, calls, name in item[4]
            )
            record = Conversation(messages=messages, source=source, index=index, tools=item[5], dropped_turns=item[6])
        elif kind == "t":
            record = Text(text=item[4], source=source, index=index)
        else:
            record = Reject(reason=item[4], source=source, index=index, raw=item[5], detail=item[6])
        records.append((position, record))
    return records
