"""Where each rank is, so a collective that times out names the step and the rank(s) that stopped.

Every rank records ``step:phase`` in the process group's key-value store (the launcher's rendezvous store,
one small set per phase) at the few points of a step where it is about to wait for the others. When a
collective times out (``train.collective_timeout_s``, the process group's timeout), the rank that saw it reads
everyone's record and ``CollectiveTimeoutError`` names the ranks that are behind: the ones that hung.

It also holds the fault hooks of the drills in tests/faults/ (``SFT_TEST_FAULT``): unset in a real run, each
check is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch.distributed as dist

PHASES = ("start", "data", "update", "done")
"""The points of a step a rank records: started it, has its batches (entering the first all-reduce), ran
forward/backward/step of every micro-batch, finished it."""
FAULT_ENV = "SFT_TEST_FAULT"
"""Test hook ``POINT:STEP:RANK:ACTION``: at POINT (a phase, ``save``, ``export`` or ``loss``) of step STEP, rank
RANK does ACTION: ``kill`` (SIGKILL itself), ``hang`` (sleep, as a rank stuck in a collective or in I/O) or
``nan`` (at ``loss``: its first micro-batch loss becomes NaN)."""
_KEY = "sft_progress/{rank}"


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within train.collective_timeout_s; the message names step and ranks."""


def fault_hook(point: str, step: int, rank: int) -> bool:
    """Act out SFT_TEST_FAULT if it names this point, step and rank; True for ``nan`` (the caller poisons)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    want_point, want_step, want_rank, action = spec.split(":")
    if (want_point, int(want_step), int(want_rank)) != (point, step, rank):
        return False
    if action == "nan":
        return True
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        while True:
            time.sleep(3600)
    raise ValueError(f"{FAULT_ENV}={spec!r}: the action must be kill, hang or nan")


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


def mark(step: int, phase: str, rank: int) -> None:
    """Record that this rank reached ``phase`` of step ``step`` (1-based: the step being computed)."""
    fault_hook(phase, step, rank)
    if dist.get_world_size() > 1:
        _store().set(_KEY.format(rank=rank), f"{step}:{PHASES.index(phase)}")


def is_timeout(exc: BaseException) -> bool:
    """True for the error a timed-out collective raises (gloo: 'Timed out waiting ...'; NCCL: 'Watchdog caught
    collective operation timeout')."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_timeout(step: int, rank: int, timeout_s: float) -> str:
    """The one-line error for a collective timeout seen by ``rank`` during step ``step``."""
    world = dist.get_world_size()
    where: dict[int, tuple[int, int]] = {}
    try:
        store = _store()
        for other in range(world):
            key = _KEY.format(rank=other)
            if store.check([key]):
                done_step, phase = store.get(key).decode().split(":")
                where[other] = (int(done_step), int(phase))
    except RuntimeError:  # the store went away with the rank hosting it
        where = {}
    head = f"rank {rank}: a collective of step {step} did not complete within train.collective_timeout_s={timeout_s:g}"
    if not where:
        return f"{head}; the other ranks' progress is unknown (the rank hosting the store is gone)"
    ahead = max(where.values())
    behind = {r: p for r, p in where.items() if p < ahead}
    silent = [r for r in range(world) if r not in where]
    if not behind and not silent:
        return f"{head}; every rank reached step {ahead[0]} ({PHASES[ahead[1]]}): the stall is inside a collective"
    parts = [f"rank {r} stopped at step {s} ({PHASES[p]})" for r, (s, p) in sorted(behind.items())]
    parts += [f"rank {r} never reported" for r in silent]
    return f"{head}: {', '.join(parts)} while others reached step {ahead[0]} ({PHASES[ahead[1]]})"
