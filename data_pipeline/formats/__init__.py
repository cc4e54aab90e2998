"""Format readers: SFT corpus files, as published, streamed into normalized records.

``detect_format`` names the format of a file from its extension and its first record; ``read_records`` yields one
:class:`Conversation`, :class:`Text` or :class:`Reject` per source record, in file order, and never holds a whole
corpus in memory: JSON lines are read line by line, a JSON array item by item (ijson), a Safety-Prompts object
scenario by scenario (``ijson.kvitems``), CSV row by row. docs/formats.md has an example of every format, the
reject reasons, and the MOSS plugin rule.

The package, bottom up: ``records`` (the CorpusFormat record, Refused, field access), ``checks`` (role order,
emptiness, media, Unicode), ``readers`` (files, JSON lines with their numbers, arrays, documents), ``tool_calls``,
``columns`` (column mapping), ``convert`` (one parsed record -> a record or a Reject), one module per format
(``alpaca``, ``firefly``, ``moss``, ``conversation``, ``sharegpt``, ``messages``, ``safety``, ``csv_table``,
``text``), each defining ``FORMAT = CorpusFormat(...)``; ``registry`` lists them; ``detect`` and ``reading`` are
the API. A new corpus format is one module with its mapper and ``FORMAT``, plus one line in ``registry.REGISTRY``
(a format defined outside the package joins with ``register(FORMAT)`` instead).
"""

from data_pipeline.formats.detect import detect_format
from data_pipeline.formats.reading import Line, convert_line, read_lines, read_records
from data_pipeline.formats.records import MAX_DEPTH, MAX_RECORD_BYTES, RAW_LIMIT, REJECT_REASONS, CorpusFormat
from data_pipeline.formats.registry import COLUMN_FIELDS, FORMATS, REGISTRY, register

__all__ = [
    "COLUMN_FIELDS",
    "FORMATS",
    "MAX_DEPTH",
    "MAX_RECORD_BYTES",
    "RAW_LIMIT",
    "REGISTRY",
    "REJECT_REASONS",
    "CorpusFormat",
    "Line",
    "convert_line",
    "detect_format",
    "read_lines",
    "read_records",
    "register",
]
