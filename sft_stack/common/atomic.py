"""Atomic file writes: a reader (another rank, a resumed run, a person) sees the old file or the new, never half.

The one home for this in the project: write to ``NAME.tmp`` beside the target, fsync, then ``os.replace`` over it
(atomic on POSIX within one filesystem). A crash leaves at most a stray ``.tmp`` that the next write replaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, body: Any) -> None:
    """Write ``body`` as indented UTF-8 JSON (keys sorted, so equal bodies give equal bytes) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")
