"""A real ``mlflow server`` for tests: free loopback port, sqlite backend, local artifact root; stop and restart.

server = MlflowServer(tmp_path / "store")
server.start()          # waits until GET /health answers
server.uri              # http://127.0.0.1:<port>
server.stop()           # kills the process (the outage); start() again brings it back on the same port/store
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sft_stack.common.ports import free_port

__all__ = ["MlflowServer", "free_port", "module_server"]


class MlflowServer:
    def __init__(self, store: Path, port: int | None = None, argv: list[str] | None = None) -> None:
        """``argv``: a different command that serves on ``port`` (e.g. `python -m tracking dashboard`)."""
        self.argv = argv
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.store / 'mlflow.db'}",
            "--artifacts-destination",
            (self.store / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout_s: float = 180.0) -> None:
        """Start the server and wait for /health (the first start creates the sqlite schema: slow on 2 cores)."""
        assert self.process is None, "server already running"
        env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the child process)
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log_path}")
            if self.is_healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server on port {self.port} not healthy after {timeout_s} s; see {self.log_path}")

    def is_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Kill the server and its workers (its own process group) and wait until the port is closed."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.is_healthy():
            time.sleep(0.1)


def module_server() -> Any:
    """A module-scoped fixture (``server = module_server()`` in a test module): a real `mlflow server` on a fresh
    store, started before the module's first test that asks for it and stopped after its last."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
        srv = MlflowServer(tmp_path_factory.mktemp("mlruns"))
        srv.start()
        yield srv
        srv.stop()

    return server
