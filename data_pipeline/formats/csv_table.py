"""CSV with a header row naming prompt and output columns (other columns are ignored), read row by row.

prompt,output
"What is 2+2?","4"
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.formats.checks import validated
from data_pipeline.formats.records import RAW_LIMIT, CorpusFormat, Refused, first_line, truncate
from sft_stack.chat.conversation import Conversation, InputError, Record, Reject, Role


def read_file(path: Path, max_bytes: int) -> Iterator[Record]:
    return _read_csv(path, _csv_columns(path), max_bytes)


def _open_csv(path: Path) -> io.TextIOWrapper:
    # utf-8-sig drops the byte-order mark spreadsheet exports put before the header; newline="" lets the csv
    # module see the line breaks inside quoted fields.
    return path.open(encoding="utf-8-sig", newline="")


def _csv_columns(path: Path) -> tuple[int, int, int]:
    """Positions of the prompt and output columns and the header width; InputError without that header."""
    try:
        with _open_csv(path) as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text near the csv header; convert the file to UTF-8") from error
    except csv.Error as error:
        raise InputError(f"{path}: cannot read the csv header: {first_line(error)}") from error
    names = [name.strip() for name in header]
    if "prompt" not in names or "output" not in names:
        raise InputError(
            f"{path}: a csv source needs a header row with prompt,output columns; found: {','.join(names)[:200]}"
        )
    return names.index("prompt"), names.index("output"), len(names)


def _read_csv(path: Path, columns: tuple[int, int, int], max_bytes: int) -> Iterator[Record]:
    prompt_at, output_at, width = columns
    source = str(path)
    # One answer may be longer than the csv module's default 128 KiB field limit; raising it affects nothing else.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with _open_csv(path) as f:
        rows = csv.reader(f)
        next(rows)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError as error:
                # The decoder reads ahead, so the bad bytes lie at or a little after this row.
                raise InputError(f"{path}: not UTF-8 text near csv row {index}; convert the file to UTF-8") from error
            except csv.Error as error:
                raise InputError(f"{path}: cannot read csv row {index}: {first_line(error)}") from error
            if not row:
                index += 1
                continue  # a blank line is no row
            record: Record
            size = sum(len(field) for field in row)
            if size > max_bytes:
                record = Reject(
                    reason="too_large",
                    source=source,
                    index=index,
                    raw=truncate(_csv_line([field[:RAW_LIMIT] for field in row])),
                    detail=f"row of {size} characters > max_record_bytes {max_bytes}",
                )
            elif len(row) != width:
                record = Reject(
                    reason="malformed_csv",
                    source=source,
                    index=index,
                    raw=truncate(_csv_line(row)),
                    detail=f"row has {len(row)} fields, the header {width} (an unquoted comma or a missing field?)",
                )
            else:
                try:
                    turns: list[tuple[Role, str]] = [("user", row[prompt_at]), ("assistant", row[output_at])]
                    record = Conversation(messages=validated(turns)[0], source=source, index=index)
                except Refused as refused:
                    raw = truncate(_csv_line(row))
                    record = Reject(reason=refused.reason, source=source, index=index, raw=raw, detail=refused.detail)
            yield record
            index += 1


def _csv_line(row: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue().rstrip("\r\n")


FORMAT = CorpusFormat(name="csv", suffix=".csv", read_file=read_file)
