"""Plain text, trained whole (prepare cuts it into max-seq-len chunks): JSON records with a text field, or a .txt
file as one document.

    {"text": "..."}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.formats.checks import text_record
from data_pipeline.formats.records import RAW_LIMIT, CorpusFormat, text_field, truncate
from sft_stack.chat.conversation import InputError, Record, Reject, Text


def convert(record: dict[str, Any], source: str, index: int) -> Text:
    return text_record(text_field(record, "text"), source, index)


def read_file(path: Path, max_bytes: int) -> Iterator[Record]:
    """A .txt file is one document: every token of it is trained (prepare cuts it into max-seq-len chunks)."""
    size = path.stat().st_size
    if size > max_bytes:
        with path.open("rb") as f:
            raw = f.read(RAW_LIMIT * 4).decode("utf-8", errors="replace")
        detail = f"file of {size} bytes > max_record_bytes {max_bytes}: split it, or convert it to JSON lines of text"
        return iter([Reject(reason="too_large", source=str(path), index=0, raw=truncate(raw), detail=detail)])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte {error.start}); convert it to UTF-8") from error
    # the reader has refused a blank file, so this Text is never empty.
    return iter([Text(text=text, source=str(path), index=0)])


FORMAT = CorpusFormat(
    name="text",
    fields=("text",),
    convert=convert,
    detect=lambda keys, item_keys: "text" in keys,
    detect_rank=6,
    suffix=".txt",
    read_file=read_file,
)
