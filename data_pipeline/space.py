"""A full disk while writing a prepare output: recognise it, remove the temporary files, say it in one line.

What a full file system really raises, measured by writing into a size-limited tmpfs: Python's own writes raise
``OSError(ENOSPC)`` (with the file name when ``open`` fails, without when a later write or close does); pyarrow's
``OSFile`` raises ``OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device``
(``pyarrow.lib.ArrowIOError`` is ``OSError``), with no file name. A quota gives EDQUOT, a file-size limit
(``ulimit -f``) EFBIG. Every write of the output goes to ``NAME.tmp`` and is renamed when complete, so what a
failed run leaves is finished blocks (reused by the rerun) and ``*.tmp`` files, which ``out_of_space`` removes.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pyarrow as pa

from data_pipeline.blocks import BLOCKS_DIR
from data_pipeline.schema import SPLITS

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class OutOfSpace(Exception):
    """Writing the output failed for lack of space; the message is one line: what, where, free space, what to do."""


def is_out_of_space(error: BaseException) -> bool:
    """True for the errors a full file system, a quota or a file-size limit raise (see the module docstring)."""
    if isinstance(error, OSError) and error.errno in _SPACE_ERRNOS:
        return True
    return isinstance(error, OSError | pa.ArrowException) and "No space left on device" in str(error)


def remove_temporaries(out: Path) -> int:
    """Delete the ``*.tmp`` files a write into ``out`` (prepare or merge) may leave; return how many."""
    removed = 0
    for folder in (out, out / BLOCKS_DIR, *(out / split for split in SPLITS)):
        if folder.is_dir():
            for tmp in folder.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def out_of_space(out: Path, error: OSError | Exception, command: str) -> OutOfSpace:
    """Remove the temporary files under ``out`` and return the one-line OutOfSpace for ``error``."""
    remove_temporaries(out)
    filename = getattr(error, "filename", None)
    where = filename if filename else f"under {out}"
    code = getattr(error, "errno", None)
    what = os.strerror(code) if isinstance(code, int) else "No space left on device"
    probe = out if out.exists() else out.parent
    free = shutil.disk_usage(probe).free if probe.exists() else 0
    rerun = "rerun the same command"
    if command == "prepare":
        finished = len(list((out / BLOCKS_DIR).glob("[0-9]*.json"))) if (out / BLOCKS_DIR).is_dir() else 0
        rerun += f": the {finished} finished blocks are reused"
    return OutOfSpace(
        f"{command}: {what} writing {where} ({free / 2**20:.1f} MiB free on its file system); temporary files "
        f"removed. Free space (or choose another --out) and {rerun}"
    )
