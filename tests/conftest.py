"""Suite-wide: the MLflow store of runs that name none, the shared memory that killed CPU ranks leave, and an
environment that no module leaves changed for the next.

Without ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` a run logs to ``./mlruns`` in the current directory (the
project's default store, docs/tracking.md); the suite's runs go to a store of its own instead of the checkout's.
Tests of the default itself unset the variable and change directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracking.naming import store_uri


@pytest.fixture(autouse=True, scope="session")
def suite_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = store_uri(tmp_path_factory.mktemp("suite") / "mlruns")
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


SESSION_STARTED = time.time()


@pytest.fixture(autouse=True, scope="module")
def no_leftover_cpu_shm_buffers() -> Iterator[None]:
    """After each module, the DeepSpeed CPU allreduce buffers (66 MB of RAM per rank in /dev/shm) that this
    session's launches left: launcher/run.py removes its own (trainer.dist.remove_cpu_shm_buffer), but a rank
    the drills kill, and the test scenario scripts that call deepspeed directly, leave theirs, and hundreds of
    launches would hold gigabytes of the machine's memory. No launch outlives its module."""
    yield
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        with contextlib.suppress(OSError):  # gone meanwhile: removed by its own rank
            if path.stat().st_mtime >= SESSION_STARTED:
                path.unlink()


@pytest.fixture(autouse=True, scope="module")
def environment_restored_after_each_module() -> Iterator[None]:
    """Whatever a module's in-process code sets in ``os.environ`` (a fixture's ``SFT_TRACKING=0``, MLflow's HTTP
    settings that ``open_client`` defaults) is undone when the module ends, so no later module's subprocesses
    inherit it: a leaked ``SFT_TRACKING=0`` once turned off the prepare record another module waited for, and
    only in the whole suite's order."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
