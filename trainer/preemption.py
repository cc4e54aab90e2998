"""Preemption: SIGUSR1/SIGTERM become a clean stop after the current optimizer step.

slurm/train.sbatch signals the training step ahead of a time limit or a preemption. The loop asks
``is_preemption_requested()`` once per optimizer step on every rank; when it says yes, every rank saves a complete
checkpoint at that step and the process exits 0. The batch script, which knows it forwarded a signal, then
runs ``scontrol requeue``; the rerun resumes from the latest complete checkpoint (train.resume=auto).

The exit code is 0, not a "please requeue" code: with ``srun --kill-on-bad-exit=1`` the first rank to exit
non-zero gets its peers killed, and srun then reports their signal instead of the code.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals that request a stop: USR1 from ``--signal=USR1@N`` / the batch script, TERM from scancel or a kill."""

_received: int | None = None
_stopping = False
_group: Any = None
_previous: dict[int, Any] = {}


def install() -> None:
    """Catch STOP_SIGNALS on this rank; a repeated signal changes nothing.

    Call on every rank after the process group is up (it makes a gloo group: a CPU all-reduce of one flag
    never waits on the GPU stream) and before DataLoader workers start (they inherit the handler instead of
    dying of an uncaught SIGUSR1).
    """
    global _group
    for signum in STOP_SIGNALS:
        _previous[signum] = signal.signal(signum, _on_signal)
    if dist.is_available() and dist.is_initialized():
        _group = dist.new_group(backend="gloo")


def uninstall() -> None:
    """Restore the previous handlers and forget any received signal (tests, or a second run in one process)."""
    global _received, _stopping, _group
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()
    _received, _stopping, _group = None, False, None


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _received
    if _received is None:
        name = signal.Signals(signum).name
        print(f"received {name}: stopping after this optimizer step with a checkpoint", file=sys.stderr, flush=True)
        _received = signum


def is_preemption_requested() -> bool:
    """True on every rank as soon as any rank has received a stop signal.

    A collective: call it on all ranks at the same point, once per optimizer step. Ranks get the signal at
    slightly different moments; agreeing through one all-reduce makes them all stop after the same step,
    so they all reach the same save_checkpoint.
    """
    global _stopping
    flag = torch.tensor([0 if _received is None else 1], dtype=torch.int32)
    if _group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
    _stopping = _stopping or bool(flag.item())
    return _stopping


def is_stopping() -> bool:
    """Whether is_preemption_requested() has said yes on this rank (for the exit message)."""
    return _stopping
