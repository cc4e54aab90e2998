"""Tokenize and mask a block's records through their sources' chat templates, fitting each to max_seq_len."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.plan import Plan
from sft_stack.chat.conversation import Conversation, Record, Reject, Text

if TYPE_CHECKING:
    from sft_stack.chat.templates import ChatTemplate

RAW_CHARS = 500
"""Raw record text kept per line of rejects.jsonl."""

Sequences = list[tuple[np.ndarray, np.ndarray]]
"""A record's sequences as (input_ids, labels) arrays: one for a conversation, max_seq_len chunks for a text."""


def _raw_of(record: Conversation | Text) -> str:
    if isinstance(record, Text):
        return record.text[:RAW_CHARS]
    body = [
        {
            "role": m.role,
            "content": m.content,
            **({"tool_calls": [dataclasses.asdict(c) for c in m.tool_calls]} if m.tool_calls else {}),
        }
        for m in record.messages
    ]
    return json.dumps(body, ensure_ascii=False)[:RAW_CHARS]


def encode(
    plan: Plan, templates: dict[str, ChatTemplate], records: list[tuple[int, Record]]
) -> list[Reject | Sequences]:
    """Tokenize and mask every record: a Reject, or the record's sequences."""
    results: list[Reject | Sequences] = [record if isinstance(record, Reject) else [] for _, record in records]
    # Records are grouped by (template, kind) so each template sees one batch call.
    groups: dict[tuple[str, bool], list[int]] = {}
    for slot, (position, record) in enumerate(records):
        if not isinstance(record, Reject):
            groups.setdefault((plan.templates[position], isinstance(record, Text)), []).append(slot)
    for (name, is_text), slots in sorted(groups.items()):
        encode_group = _encode_texts if is_text else _encode_conversations
        encode_group(plan, templates[name], [records[s][1] for s in slots], slots, results)
    return results


def _encode_texts(
    plan: Plan, template: ChatTemplate, texts: list[Record], slots: list[int], results: list[Reject | Sequences]
) -> None:
    max_len = plan.options.max_seq_len
    token_lists = template.encode_text_batch([t.text for t in texts if isinstance(t, Text)])
    for slot, text, ids in zip(slots, texts, token_lists, strict=True):
        assert isinstance(text, Text)
        if not ids:
            results[slot] = Reject(
                reason="empty_text", source=text.source, index=text.index, raw=_raw_of(text), detail=""
            )
            continue
        array = np.asarray(ids, dtype=np.int32)
        results[slot] = [(array[i : i + max_len], array[i : i + max_len]) for i in range(0, len(array), max_len)]


def _encode_conversations(
    plan: Plan, template: ChatTemplate, records: list[Record], slots: list[int], results: list[Reject | Sequences]
) -> None:
    from sft_stack.chat.templates import fit_length_arrays

    max_len, overlong = plan.options.max_seq_len, plan.options.overlong
    convs = [c for c in records if isinstance(c, Conversation)]
    encoded = template.encode_batch_arrays(convs, last_turn_only=plan.options.last_turn_only)
    for slot, conv, enc in zip(slots, convs, encoded, strict=True):
        if isinstance(enc, Reject):
            results[slot] = enc
            continue
        fitted = fit_length_arrays(enc, max_len, overlong)
        if isinstance(fitted, str):
            detail = f"{len(enc[0])} tokens, max_seq_len {max_len}, overlong={overlong}"
            results[slot] = Reject(
                reason=fitted, source=conv.source, index=conv.index, raw=_raw_of(conv), detail=detail
            )
        else:
            results[slot] = [fitted]
