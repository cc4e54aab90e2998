"""DeepSpeed's extension-build locks: find one that a killed launch left behind, before it freezes a launch.

DeepSpeed JIT-builds its C++ ops with torch.utils.cpp_extension (the CPU communication op ``deepspeed_shm_comm``
inside ``init_distributed``; ``cpu_adam`` with optimizer offload; fused ops on GPUs). torch guards each op's
build folder with a ``lock`` file (``torch.utils.file_baton.FileBaton``): created with O_EXCL and held open
while the process builds the op or only checks that the build is current, then closed and deleted. Every other
process that loads the op polls, silently, for as long as the file exists. A launch killed while it held the
lock leaves the file behind, and every later launch then waits forever inside ``init_distributed`` (issue 20:
three 2-rank runs sat 8 minutes at 0% CPU).

A lock is *stale* when the file exists and no process on this machine has it open: a builder holds it open
from creation to deletion, so on a local disk that test is exact (checked twice, a moment apart, so a lock
being released between its close and its delete is not mistaken for one). On a network filesystem a build on
another node that shares the folder cannot be seen, so there a lock is stale only when, besides, nothing in
its folder was written for ``STALE_AFTER_S``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STALE_AFTER_S = 600.0
"""On a network filesystem: a lock whose folder nothing wrote to for this long is stale. A build writes an object
file per source (the CPU op here: 2 files in about 80 s); 10 minutes leaves room for a slow CUDA op."""

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "fuse.ceph", "afs", "panfs", "wekafs", "orangefs", "9p")  # fmt: skip
"""Filesystem types (from /proc/self/mountinfo) that other machines may share."""


@dataclass(frozen=True)
class StaleLock:
    path: Path
    """The lock file to delete."""
    op: str
    """The DeepSpeed op whose build folder holds it (the folder's name, e.g. deepspeed_shm_comm)."""

    def message(self) -> str:
        return (
            f"{self.path}: stale lock of DeepSpeed's {self.op} build, left by a launch that was killed while "
            "building or loading it (no process has it open); every launch would wait for it forever inside "
            f"init_distributed. Delete it: rm {self.path}"
        )


def extensions_root() -> Path:
    """The folder torch.utils.cpp_extension builds ops under, as its ``_get_build_directory`` computes it:
    $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<major><minor><abiflags>_<cpu|cu<ver>|rocm<ver>>."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured is not None:
        return Path(configured)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def find_stale_locks(root: Path | None = None, *, recheck_s: float = 0.5) -> list[StaleLock]:
    """The stale ``<root>/<op>/lock`` files (every op: which ones a run loads depends on accelerator and offload)."""
    root = extensions_root() if root is None else root
    candidates = sorted(root.glob("*/lock")) if root.is_dir() else []
    suspects = [lock for lock in candidates if _looks_stale(lock)]
    if suspects:
        time.sleep(recheck_s)  # a lock seen between its owner's close() and remove() is gone by now
    return [StaleLock(path=lock, op=lock.parent.name) for lock in suspects if _looks_stale(lock)]


def _looks_stale(lock: Path) -> bool:
    try:
        real = os.path.realpath(lock)
        if not os.path.isfile(real):
            return False
        if is_open_by_any_process(real):
            return False
        if is_network_filesystem(real):
            return time.time() - newest_write(lock.parent) > STALE_AFTER_S
        return True
    except OSError:  # removed while we looked: its owner released it
        return False


def is_open_by_any_process(path: str) -> bool:
    """Whether a process on this machine (one we may inspect: ours, or any as root) has ``path`` open."""
    proc = Path("/proc")
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) == path:
                    return True
        except OSError:  # the process exited, or is another user's
            continue
    return False


def newest_write(folder: Path) -> float:
    """The latest modification time of ``folder`` and anything directly in it."""
    times = [folder.stat().st_mtime]
    for entry in folder.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except OSError:
            continue
    return max(times)


def is_network_filesystem(path: str) -> bool:
    """Whether ``path`` lies on a filesystem type that other machines may share (NFS, Lustre, ...)."""
    best, fstype = "", ""
    try:
        mounts = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        # mountinfo: id parent major:minor root MOUNT_POINT options [optional...] - FSTYPE source super-options
        mount_point = fields[4].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best) and "-" in fields:
            best, fstype = mount_point, fields[fields.index("-") + 1]
    return fstype in NETWORK_FILESYSTEMS
