"""Disk-full injection for tests/faults/test_drills.py, loaded at interpreter start-up only when this folder is on
PYTHONPATH: every ``torch.save`` into the checkpoint of step $SFT_TEST_ENOSPC_STEP writes a few bytes and then
fails with ENOSPC, as a full disk does (on every rank: they share the file system)."""

import errno
import os

_STEP = os.environ.get("SFT_TEST_ENOSPC_STEP")
if _STEP:
    import torch

    _save = torch.save

    def _full_disk_save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(f, (str, os.PathLike)) and f"step_{int(_STEP):08d}" in str(f):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04")  # the first bytes made it, the rest did not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = _full_disk_save
