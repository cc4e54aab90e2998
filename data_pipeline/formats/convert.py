"""One parsed JSON record -> what a reader yields for it: the format's Conversation or Text, or a Reject."""

from __future__ import annotations

from data_pipeline.formats.checks import checked_unicode, refuse_media_fields
from data_pipeline.formats.columns import Columns, mapped
from data_pipeline.formats.records import DEEP, CorpusFormat, Item, Refused, safe_dump, truncate, type_name
from sft_stack.chat.conversation import Record, Reject


def convert_item(spec: CorpusFormat, item: Item, source: str, columns: Columns = ()) -> Record:
    """The record of ``item`` read as ``spec`` (a JSON-record format), through the source's column mapping."""
    assert spec.convert is not None, f"format {spec.name} has no JSON record converter"
    try:
        if item.error is not None:
            raise Refused(item.reason, item.error)
        if not isinstance(item.value, dict):
            raise Refused("malformed_json", f"expected a JSON object, got {type_name(item.value)}")
        refuse_media_fields(item.value)
        return checked_unicode(spec.convert(mapped(item.value, columns), source, item.index))
    except RecursionError:
        # Parsed (orjson reads up to 1,024 levels), but deeper than the standard library's printer goes.
        refused = Refused("malformed_json", DEEP)
    except Refused as caught:
        refused = caught
    return Reject(
        reason=refused.reason,
        source=source,
        index=item.index,
        raw=truncate(item.raw if item.raw is not None else safe_dump(item.value)),
        detail=item.where + refused.detail,
    )
