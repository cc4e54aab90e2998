"""Failed writes of checkpoints and exports: one line that names the file and the free space, agreed by every rank.

A full disk does not look the same from every call that hits it: ``open``/``write`` raise ``OSError(ENOSPC)``,
while ``torch.save`` into a zip archive raises ``RuntimeError: [enforce fail at inline_container.cc:…] unexpected
pos …``, and safetensors its own ``SafetensorError``. All are caught where a checkpoint or an export is written and
turned into one line by ``describe``, with the space left on that file system measured at the moment of failure.

A rank whose write failed must not leave the collective its peers wait in: each rank writes what it can, then
every rank reports its outcome (``gather_failures``) before any rank decides, and all of them raise the same
``WriteFailedError`` (``fail_together``): rank 0 prints its one line before any rank leaves (a launcher may kill
the rest once one rank has exited), and the launcher exits non-zero without printing it again. Nothing waits for
``train.collective_timeout_s``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist
from safetensors import SafetensorError

from sft_stack.common.errors import PREFIX

WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What a write into a full (or failing) file system raises: OSError from plain files and torch.save's legacy
format; RuntimeError from torch.save's zip writer (``unexpected pos``); SafetensorError from safetensors
(``Error while serializing: I/O error: No space left on device``), which is neither."""


class WriteFailedError(Exception):
    """A checkpoint or export that could not be written on some rank; every rank raises it with the same message."""


def free_space(path: Path) -> str:
    """The space left on the file system holding ``path`` (or its nearest existing parent), e.g. ``0.3 MiB free``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return f"free space unknown: {exc.strerror or exc}"
    return f"{free / 2**20:.1f} MiB free"


def describe(exc: BaseException, path: Path) -> str:
    """One line for a failed write of ``path``: the reason, the file, and the free space on its file system."""
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        target = Path(exc.filename) if exc.filename else path
    else:  # torch's C++ errors may carry a C++ stack below the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason, target = f"{type(exc).__name__}: {first}", path
    return f"{reason} writing {target} ({free_space(target)})"


def gather_failures(failure: str | None) -> list[str]:
    """Every rank's failure (``None`` where the rank succeeded), rank order; all ranks call it, all get the same list.

    Without a process group this process's own outcome is the whole answer.
    """
    if not dist.is_initialized():
        return [failure] if failure else []
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, failure)
    return [f"rank {rank}: {text}" for rank, text in enumerate(outcomes) if text]


def fail_together(message: str) -> NoReturn:
    """Print ``message`` once (rank 0, or this process without a group), wait for every rank, raise WriteFailedError.

    Every rank must call it with the same message (they do after gather_failures).
    """
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()
    raise WriteFailedError(message)
