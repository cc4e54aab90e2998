"""Arrow shards on disk: write one atomically, describe a split directory for ``datasets``, link shards.

Shards are Arrow IPC streams (what ``datasets`` itself writes) with exactly ``schema.ARROW_SCHEMA``, no
metadata and no timestamps, written in record batches of a fixed row count; the same rows always give the
same bytes. A split directory also holds the ``state.json`` and ``dataset_info.json`` that
``datasets.load_from_disk`` reads to open all its shards as one dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.schema import ARROW_SCHEMA, ShardInfo, sha256_file
from sft_stack.common.atomic import write_text_atomic

BATCH_ROWS = 1024
"""Rows per Arrow record batch. Fixed, so a shard's bytes depend only on its rows."""

DATASETS_FEATURES = {
    name: {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}
    for name in ("input_ids", "labels", "position_ids")
}
"""``datasets.Features.from_arrow_schema(ARROW_SCHEMA).to_dict()``, written out: importing ``datasets`` to compute it
costs a second or two of every run (tests/unit/test_prepare_speed.py checks they agree)."""


def _int32_array(values: np.ndarray) -> pa.Array:
    """An int32 Arrow array over the bytes of ``values`` (no copy): ``pa.array(ndarray)`` would import pandas, a
    second of every worker's start-up, and gives the same array."""
    values = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])


def write_shard(path: Path, row_lengths: Sequence[int], columns: Sequence[np.ndarray]) -> ShardInfo:
    """Write rows to ``path`` via a temporary name and an atomic rename; return its ShardInfo.

    ``columns`` are the flat values of input_ids, labels and position_ids (every row's tokens, rows in order);
    ``row_lengths`` cuts them into rows. A crash leaves either no file or a complete one under the final name.
    """
    ends = np.cumsum(np.asarray(row_lengths, dtype=np.int64))
    if len(ends) and ends[-1] >= 2**31:
        raise ValueError("write_shard: over 2**31 tokens in one shard; use a smaller block_size")
    offsets = np.concatenate([np.zeros(1, dtype=np.int32), ends.astype(np.int32)])
    if len(columns) != len(ARROW_SCHEMA) or any(len(c) != offsets[-1] for c in columns):
        raise ValueError("write_shard: need input_ids, labels and position_ids, each sum(row_lengths) long")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
            for start in range(0, len(row_lengths), BATCH_ROWS):
                stop = min(start + BATCH_ROWS, len(row_lengths))
                low, high = offsets[start], offsets[stop]
                batch_offsets = _int32_array(offsets[start : stop + 1] - low)
                arrays = [pa.ListArray.from_arrays(batch_offsets, _int32_array(column[low:high])) for column in columns]
                writer.write_batch(pa.record_batch(arrays, schema=ARROW_SCHEMA))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename is None and error.errno is not None:
            # pyarrow's errors name no file (a full disk: "[Errno 28] Error writing bytes to file"): name it.
            raise OSError(error.errno, os.strerror(error.errno), str(tmp)) from error
        raise
    return ShardInfo(file=path.name, rows=len(row_lengths), sha256=sha256_file(path))


def write_split_metadata(split_dir: Path, shards: Sequence[ShardInfo]) -> None:
    """Write the ``state.json`` and ``dataset_info.json`` that let ``datasets.load_from_disk`` open the split."""
    info = {"citation": "", "description": "", "features": DATASETS_FEATURES, "homepage": "", "license": ""}
    # datasets keys its cache on _fingerprint; derive it from the shards so identical data gives identical files.
    fingerprint = hashlib.sha256("".join(s.sha256 for s in shards).encode()).hexdigest()[:16]
    state: dict[str, object] = {
        "_data_files": [{"filename": s.file} for s in shards],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    write_text_atomic(split_dir / "dataset_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    write_text_atomic(split_dir / "state.json", json.dumps(state, indent=2, sort_keys=True) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    """Place ``src`` at ``dst`` (a hard link when on the same file system, else a copy), replacing ``dst``."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        try:
            shutil.copyfile(src, tmp)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            if error.errno is None:
                raise
            # copyfile's error may name the source; a full disk is about the file being written.
            raise OSError(error.errno, os.strerror(error.errno), str(tmp)) from error
    os.replace(tmp, dst)
