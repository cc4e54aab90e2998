"""Distributed helpers, one home: this rank's number, a barrier, the accelerator's name and local device, the
ZeRO stage of a DeepSpeed config, and the removal of this rank's CPU shared-memory buffer.

Every function also works outside a process group (a single-process export, a test, a tool a person runs):
rank 0 of a world of 1, and a barrier that has nobody to wait for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def rank() -> int:
    """This process's global rank; 0 when no process group is initialized."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    """Whether this process writes what only one rank writes (metrics, configs, exports)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()


def device_name() -> str:
    """The accelerator model of this rank (e.g. "NVIDIA H100 80GB HBM3"), or "cpu" without a GPU.

    Never None: the MFU peak lookup (trainer.metrics.peak_flops) treats "cpu" as an unknown device, and the
    tracking params record it as the gpu_type, so one answer serves both.
    """
    return str(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This rank's accelerator (cuda:LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage of a merged DeepSpeed config.

    No ``zero_optimization`` section means stage 0, as in DeepSpeed itself (a single-process export builds the
    model with ``ds_config={}``); a section with a stage other than 0-3 is refused, never read as 0.
    """
    zero = ds_config.get("zero_optimization")
    if zero is None:
        return 0
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


def remove_cpu_shm_buffer() -> None:
    """Delete this rank's DeepSpeed CPU allreduce buffer, ``/dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK``.

    On the CPU accelerator (all ranks on one node) each rank creates a 66 MB shared-memory file at
    ``init_distributed`` that DeepSpeed never unlinks: every launch leaves its ranks' files in RAM until reboot
    (hundreds of launches filled 13 GB of /dev/shm here), and a killed run's files sit under the name the next
    launch on the same address and port opens. Called before joining (no rank maps a buffer before every rank
    has joined the rendezvous) and after leaving; a name that does not exist (a GPU run) is a no-op.
    """
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            os.environ.get("RANK", "0"),
        )
    )
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()
