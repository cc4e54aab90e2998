"""A planted secret in the tracking URI reaches no file, no MLflow record and no log line.

The URI carries both kinds of credential the project redacts: a password (``http://alice:PASSWORD@host``) and a
token-like query value (``?token=TOKEN``). A loopback gateway in front of a real `mlflow server` checks the
password on every request (basic auth, as an authenticating proxy would) and the token where MLflow sends it
(its REST calls; artifact uploads go to a URL MLflow builds without the query), and forwards to the server, so
the runs below only land if the connection really used the real URI. Then, with real processes throughout:

- ``python -m data_pipeline prepare`` (tracked in the background, URI from ``$MLFLOW_TRACKING_URI``);
- a training run through ``launcher/run.py`` with ``tracking.uri=`` that URI, checkpoints every step;
- a training run whose server is unreachable (the spool path), then ``python -m tracking sync``: refused in one
  line without ``--uri`` (the spool keeps no credentials), sent with it;

and every byte under the work folder (data, outputs, checkpoints, spools, the prepare record and its log), the
MLflow store (database, artifacts, server log) and the captured stdout and stderr of every command is scanned
for the password and the token value.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.http_proxy import LoopbackProxy, forward, refuse
from tests.helpers.mlflow_server import MlflowServer, free_port, module_server

pytestmark = [pytest.mark.slow, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
ALPACA = ROOT / "tests" / "fixtures" / "real" / "alpaca" / "alpaca_en_demo.json"
PASSWORD = "pw-PLANTED-5e1d9c"
TOKEN = "tok-PLANTED-8b27f4"
SECRETS = (PASSWORD.encode(), TOKEN.encode())


class Gateway:
    """Forwards to ``upstream_port`` what arrives with alice's password; 401 for anything else.

    MLflow joins the tracking URI and a REST endpoint as strings, so a REST call arrives as
    ``/?token=TOKEN/api/2.0/mlflow/...`` (its own query joined with ``&``): the gateway counts and strips it.
    """

    PREFIX = f"/?token={TOKEN}"
    EXPECTED_AUTH = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    def __init__(self, upstream_port: int) -> None:
        self.authorized = 0
        self.with_token = 0
        self.refused = 0
        self.refusals: list[str] = []
        """What each refused request was: method, path up to its query, whether it carried an Authorization."""
        self.upstream_port = upstream_port
        self.proxy = LoopbackProxy(self._handle)
        self.port = self.proxy.port

    def _handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        auth = request.headers.get("Authorization")
        if auth != self.EXPECTED_AUTH or (
            request.path.startswith("/?") and not request.path.startswith(self.PREFIX + "/")
        ):
            self.refused += 1
            what = "none" if auth is None else "wrong" if auth != self.EXPECTED_AUTH else "right"
            self.refusals.append(f"{request.command} {request.path.partition('?')[0]} (authorization: {what})")
            refuse(request, 401)
            return
        self.authorized += 1
        if request.path.startswith(self.PREFIX):
            self.with_token += 1
            path, _, query = request.path.removeprefix(self.PREFIX).partition("&")
        else:
            path, _, query = request.path.partition("?")
        forward(
            request,
            body,
            self.upstream_port,
            path=f"{path}?{query}" if query else path,
            drop_headers=("host", "authorization"),
            timeout_s=120,
        )

    def close(self) -> None:
        self.proxy.close()


server = module_server()


def secret_uri(port: int) -> str:
    return f"http://alice:{PASSWORD}@127.0.0.1:{port}/?token={TOKEN}"


def run(command: list[str], cwd: Path, env: dict[str, str], outputs: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    outputs += [result.stdout, result.stderr]
    return result


def files_holding_a_secret(*roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {secret.decode()}" for secret in SECRETS if secret in data]
    return found


def wait_for_prepare_record(data: Path, gateway: Gateway) -> dict[str, Any]:
    """The detached prepare record's result, once it lands; fails with its log and the gateway's refusals if the
    record gives up or never comes."""
    record_file = data / "mlflow_prepare_run.json"
    record_log = data / "mlflow_prepare_run.log"
    deadline = time.monotonic() + 300  # generous: the detached record imports mlflow on a busy machine
    while not record_file.is_file() and time.monotonic() < deadline:
        if record_log.is_file() and "not tracked" in record_log.read_text():
            break  # the record gave up: its log says why
        time.sleep(0.5)
    assert record_file.is_file(), (
        f"no prepare record; its log: {record_log.read_text() if record_log.is_file() else '(none)'}; "
        f"gateway refused {gateway.refusals}"
    )
    return dict(json.loads(record_file.read_text()))


def test_planted_secret_reaches_no_file_record_or_log_line(server: MlflowServer, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    gateway = Gateway(server.port)
    uri = secret_uri(gateway.port)
    redacted = f"http://***@127.0.0.1:{gateway.port}/?token=***"
    base_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SFT_TRACKING")}
    base_env |= {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    outputs: list[str] = []
    try:
        # 1. prepare, recorded in the background in the server behind the gateway
        prepare = run(
            [sys.executable, "-m", "data_pipeline", "prepare", "--source", str(ALPACA), "--tokenizer", str(TINY),
             "--out", "data", "--template", "qwen", "--max-seq-len", "128", "--no-progress"],
            work, base_env | {"MLFLOW_TRACKING_URI": uri}, outputs,
        )  # fmt: skip
        assert prepare.returncode == 0, prepare.stderr
        record = wait_for_prepare_record(work / "data", gateway)
        assert record["tracking_uri"] == redacted

        # 2. a tracked training run, the URI given as an override, a checkpoint at every step
        train = [sys.executable, str(ROOT / "launcher" / "run.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
                 f"model.path={TINY}", "data.path=data", f"deepspeed.config={ROOT / 'ds_configs' / 'zero2.json'}",
                 "train.max_steps=2", "train.warmup_steps=1", "train.save_every_steps=1", "eval.every_steps=1",
                 "tracking.system_metrics=false",
                 "tracking.experiment=secrets"]  # fmt: skip
        live = run([*train, "train.output_dir=live", f"tracking.uri={uri}"], work, base_env, outputs)
        assert live.returncode == 0, live.stdout[-3000:] + live.stderr[-3000:]
        state = json.loads((work / "live" / "mlflow_run.json").read_text())
        assert state["tracking_uri"] == redacted
        assert f"uri: {redacted}" in (work / "live" / "run_config.yaml").read_text()
        checkpoints = sorted((work / "live" / "checkpoints").glob("*/run_config.yaml"))
        assert checkpoints and all(f"uri: {redacted}" in p.read_text() for p in checkpoints)

        # 3. the server unreachable: everything goes to the spool; the URI from the environment this time
        dead_port = free_port()
        dead = secret_uri(dead_port)
        spooled = run(
            [*train, "train.output_dir=spooled", "tracking.close_timeout_s=1"],
            work, base_env | {"MLFLOW_TRACKING_URI": dead}, outputs,
        )  # fmt: skip
        assert spooled.returncode == 0, spooled.stdout[-3000:] + spooled.stderr[-3000:]
        assert "is unreachable" in spooled.stderr  # the warning that names the URI did print, redacted
        ops = (work / "spooled" / "mlflow_spool" / "ops.jsonl").read_text()
        assert f'"tracking_uri": "http://***@127.0.0.1:{dead_port}/?token=***"' in ops
        sync = [sys.executable, "-m", "tracking", "sync", "spooled"]
        refused = run(sync, work, base_env, outputs)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "pass it with --uri URI or set MLFLOW_TRACKING_URI" in refused.stderr
        sent = run([*sync, "--uri", uri], work, base_env, outputs)
        assert sent.returncode == 0, sent.stderr
    finally:
        gateway.close()

    # the connection used the real credentials: every run landed through the gateway, none was refused
    assert gateway.authorized > gateway.with_token > 0 and gateway.refusals == []
    client = MlflowClient(server.uri)
    live_run = client.get_run(state["run_id"])
    assert live_run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(state["run_id"], "_loss/train")) == [1, 2]
    assert live_run.data.params["tracking.uri"] == redacted
    assert live_run.data.tags["data.prepare_run_id"] == record["run_id"]
    assert live_run.data.tags["data.prepare_tracking_uri"] == redacted
    synced = json.loads((work / "spooled" / "mlflow_run.json").read_text())
    assert client.get_run(synced["run_id"]).info.status == "FINISHED"

    assert files_holding_a_secret(work, server.store) == []
    leaks = [(secret.decode(), text[max(0, text.find(secret.decode()) - 300) :][:600])
             for text in outputs for secret in SECRETS if secret.decode() in text]  # fmt: skip
    assert leaks == []
