"""Tracking against a real `mlflow server` (sqlite, free loopback port): one server for the module, stopped
and restarted for the outage tests; a real CPU training run through launcher/run.py; the dashboard in Chromium.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.chromium import browser, page_text, screenshot
from tests.helpers.mlflow_server import MlflowServer, free_port
from tracking import worker
from tracking.cli import dashboard_command
from tracking.journal import RUN_FILE, SPOOL_DIR
from tracking.links import ML_VIEW, run_page_url
from trainer.config import load_config
from trainer.run_record import open_tracker

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module, started with `make dashboard`'s command line (sqlite store, loopback)."""
    store, port = tmp_path_factory.mktemp("mlruns"), free_port()
    srv = MlflowServer(store, port=port, argv=dashboard_command(store, "127.0.0.1", port, []))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live(server: MlflowServer) -> MlflowServer:
    """The module's server, running (a test before may have stopped it)."""
    if server.process is None:
        server.start()
    return server


def client_for(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found.add(item.path)
        if item.is_dir:
            found |= artifact_paths(client, run_id, item.path)
    return found


# --------------------------------------------------------------------------- a real CPU training run, resumed


@pytest.fixture(scope="module")
def trained(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """prepare (tracked) -> launcher/run.py stopped at step 2 -> resumed to step 4, all against the server."""
    from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
    from data_pipeline.tracking import PREPARE_RUN_FILE, log_prepare_run

    if server.process is None:
        server.start()
    work = tmp_path_factory.mktemp("trained")
    data_dir = work / "data"
    options = PrepareOptions(
        sources=(SourceSpec(path=str(ROOT / "tests/fixtures/real/alpaca/alpaca_en_demo.json"), samples=200),),
        tokenizer=str(TINY),
        out=str(data_dir),
        template="qwen",
        max_seq_len=128,
        val_fraction=0.1,
        max_bad_fraction=0.2,
        progress=False,
    )
    manifest = prepare(options)
    suite_store = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        prepare_run_id = log_prepare_run(manifest, data_dir, options)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
        if suite_store is not None:
            os.environ["MLFLOW_TRACKING_URI"] = suite_store
    assert prepare_run_id and json.loads((data_dir / PREPARE_RUN_FILE).read_text())["run_id"] == prepare_run_id

    out = work / "run"
    command = [
        sys.executable,
        str(ROOT / "launcher" / "run.py"),
        "--config",
        str(ROOT / "configs" / "tiny_cpu.yaml"),
        f"model.path={TINY}",
        f"data.path={data_dir}",
        f"train.output_dir={out}",
        f"deepspeed.config={ROOT / 'ds_configs' / 'zero2.json'}",
        "train.max_steps=4",
        "train.save_every_steps=2",
        "eval.every_steps=2",
        "tracking.enabled=true",
        f"tracking.uri={server.uri}",
        "tracking.experiment=it_training",
        "tracking.run_name=tiny-cpu-tracked",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": "", "SLURM_JOB_ID": "4242"}
    sessions = []
    for extra in (["train.stop_at_step=2"], []):
        result = subprocess.run(command + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        sessions.append(json.loads((out / RUN_FILE).read_text())["run_id"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "data_dir": data_dir, "manifest": manifest, "prepare_run_id": prepare_run_id,
            "sessions": sessions, "rows": rows}  # fmt: skip


def test_training_run_has_params_metrics_artifacts_and_dataset(live: MlflowServer, trained: dict) -> None:
    client = client_for(live)
    run_id = trained["sessions"][-1]
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny-cpu-tracked"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == "4"
    assert params["model.method"] == "full"
    assert params["ds.zero_optimization.stage"] == "2"
    assert params["ds.train_micro_batch_size_per_gpu"] == "4"
    assert params["world_size"] == "1" and params["nodes"] == "1" and params["gpu_type"] == "cpu"
    assert params["version.torch"].startswith(__import__("torch").__version__.split("+")[0])
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", params["git_commit"])
    tags = run.data.tags
    assert tags["slurm.job_id"] == "4242" and tags["method"] == "full" and tags["model_family"] == "llama"
    assert tags["data.prepare_run_id"] == trained["prepare_run_id"]
    assert tags["data.fingerprint"] == trained["manifest"].fingerprint

    # every metrics.jsonl row of both sessions, each step once, with the loop's exact values; the losses once
    # each, under their MLflow names (trainer.loop.TRACKED_NAMES)
    train_rows = {row["step"]: row for row in trained["rows"] if "loss" in row}
    history = client.get_metric_history(run_id, "_loss/train")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == pytest.approx({s: r["loss"] for s, r in train_rows.items()})
    for key in ("lr", "grad_norm", "loss_tokens"):
        assert steps_of(client, run_id, key) == [1, 2, 3, 4], key
    assert steps_of(client, run_id, "_loss/val") == [2, 4]
    assert not {"loss", "val_loss", "loss/train", "loss/val"} & set(run.data.metrics)

    paths = artifact_paths(client, run_id)
    expected = {"config/config.yaml", "config/deepspeed_config.json", "data/manifest.json", "data/rejects_summary.json",
                "loss_curve.png"}  # fmt: skip
    assert expected <= paths, paths
    local = Path(client.download_artifacts(run_id, "loss_curve.png", str(trained["out"].parent)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest_json = json.loads(
        Path(client.download_artifacts(run_id, "data/manifest.json", str(local.parent))).read_text()
    )
    assert manifest_json["counts"] == trained["manifest"].counts
    assert tags["final.kind"] == "full" and tags["final.path"] == str((trained["out"] / "final").resolve())
    assert not any(p.startswith("final") for p in paths)  # full weights: path only unless tracking.upload_weights

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == trained["manifest"].fingerprint[:32]
    profile = json.loads(dataset_input.dataset.profile)
    assert profile["fingerprint"] == trained["manifest"].fingerprint
    assert profile["counts"] == trained["manifest"].counts
    assert [s["sha256"] for s in profile["sources"]] == [s.sha256 for s in trained["manifest"].sources]

    prepare_run = client.get_run(trained["prepare_run_id"])
    assert prepare_run.data.metrics["samples_written"] == trained["manifest"].counts["samples_written"]
    assert "data/manifest.json" in artifact_paths(client, trained["prepare_run_id"])


def test_run_stopped_and_resumed_continues_the_same_run(live: MlflowServer, trained: dict) -> None:
    client = client_for(live)
    first, second = trained["sessions"]
    assert first == second
    run = client.get_run(second)
    assert run.data.params["train.stop_at_step"] == "2"  # params are write-once: the first session's value
    assert run.data.tags["changed_on_resume.train.stop_at_step"] == "null"
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'tiny-cpu-tracked'")) == 1


# --------------------------------------------------------------------------- outages


def simulated_config(out: Path, server: MlflowServer, *overrides: str):
    return load_config(
        None,
        [f"model.path={TINY}", f"data.path={out / 'data'}", f"train.output_dir={out}", "train.max_steps=8",
         f"tracking.uri={server.uri}", "tracking.experiment=it_outage", "tracking.system_metrics=false", *overrides],
    )  # fmt: skip


def test_server_killed_mid_run_then_back_loses_no_step(
    live: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's calls exactly as in training; the server dies after step 3 and comes back before step 7."""
    caplog.set_level(logging.WARNING, logger="tracking")
    monkeypatch.setattr(worker, "_MAX_BACKOFF_S", 2.0)  # retry often: the test waits for the replay
    out = tmp_path / "run"
    tracker = open_tracker(
        cfg=simulated_config(out, live, "tracking.run_name=outage", "tracking.close_timeout_s=120"),
        ds_config={"zero_optimization": {"stage": 2}, "api_key": "sk-live-123"},
        output_dir=out,
        rank=0,
        world_size=1,
        device="cpu",
    )
    assert tracker.run_id is not None
    note = tmp_path / "note.txt"
    for step in range(1, 9):
        if step == 4:
            live.stop()
        if step == 7:
            live.start()
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3 * step, "step": step}, step)
        if step == 5:
            note.write_text("logged while the server was down")
            tracker.log_artifact(note, "notes")
            note.write_text("changed afterwards")
    tracker.log_table([{"prompt": "hi", "response": "hello"}], "samples/step_00000008.json")
    tracker.close("FINISHED")

    client = client_for(live)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert steps_of(client, tracker.run_id, "loss") == list(range(1, 9))
    assert steps_of(client, tracker.run_id, "lr") == list(range(1, 9))
    assert run.data.params["ds.api_key"] == "***"
    spooled = Path(client.download_artifacts(tracker.run_id, "notes/note.txt", str(tmp_path)))
    assert spooled.read_text() == "logged while the server was down"
    assert "samples/step_00000008.json" in artifact_paths(client, tracker.run_id)
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1, [r.getMessage() for r in caplog.records]


def test_server_down_at_start_run_created_by_sync(live: MlflowServer, tmp_path: Path) -> None:
    """No server at all during training: everything waits in the spool; `sync` creates the run and sends it."""
    out = tmp_path / "run"
    live.stop()
    try:
        tracker = open_tracker(
            cfg=simulated_config(out, live, "tracking.run_name=offline", "tracking.close_timeout_s=1"),
            ds_config={"zero_optimization": {"stage": 3}},
            output_dir=out,
            rank=0,
            world_size=2,
            device="cpu",
        )
        assert tracker.run_id is None
        for step in range(1, 6):
            tracker.log_metrics({"loss": 2.0 / step}, step)
        tracker.close("FINISHED")
        assert not (out / RUN_FILE).exists()
        assert (out / SPOOL_DIR / "ops.jsonl").stat().st_size > 0
    finally:
        live.start()
    result = subprocess.run(
        [sys.executable, "-m", "tracking", "sync", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    client = client_for(live)
    run = client.get_run(run_id)
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["ds.zero_optimization.stage"] == "3"
    assert steps_of(client, run_id, "loss") == [1, 2, 3, 4, 5]
    # a second sync has nothing left to send and creates nothing new
    again = subprocess.run(
        [sys.executable, "-m", "tracking", "sync", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "0 of 0" in again.stdout
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'offline'")) == 1


# --------------------------------------------------------------------------- dashboard and benchmark


def test_dashboard_shows_the_run_in_chromium(live: MlflowServer, trained: dict, tmp_path: Path) -> None:
    """Headless Chromium opens the training run's page on the dashboard; the run name and loss are rendered."""
    command = browser(tmp_path / "chromium")
    state = json.loads((trained["out"] / RUN_FILE).read_text())
    url = f"{live.uri}/#/experiments/{state['experiment_id']}/runs/{state['run_id']}?{ML_VIEW}"
    text = page_text(command, url)
    assert "tiny-cpu-tracked" in text, text[:2000]
    last_loss = next(row["loss"] for row in reversed(trained["rows"]) if "loss" in row)
    assert re.search(rf"_loss/train {re.escape(str(last_loss)[:6])}", text), (last_loss, text[:4000])
    assert screenshot(command, url, tmp_path / "dashboard_run.png").stat().st_size > 10_000

    # What a person opening the run sees: the model-training view (the experiment's kind; MLflow 3.17 reads
    # the view from its GenAI | Model training switch, which the link sets), and the loss section first.
    experiment = client_for(live).get_experiment(state["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    text = page_text(command, run_page_url(live.uri, state["experiment_id"], state["run_id"]))
    assert "Model training" in text and "Evaluation runs" not in text, text[:2000]
    assert "tiny-cpu-tracked" in text
    assert 0 <= text.index("_loss (2)") < text.index("Model metrics ("), text[:2000]


def test_bench_tracking_quick(live: MlflowServer) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_tracking.py"), "--quick", "--uri", live.uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["steps"] == 200
    assert report["metric_values_logged"] == report["metric_values_expected"] == 2000
    assert set(report["log_metrics_us"]) == {"mean", "p50", "p99", "max"}


def test_prepare_record_retries_until_the_server_is_back(trained: dict, tmp_path: Path) -> None:
    """The detached prepare record meets a real refused connection (no server on the port yet), says so, and
    lands once a real server comes up on that port: one restart does not lose the record."""
    import shutil

    from mlflow import MlflowClient

    data = tmp_path / "data"
    shutil.copytree(trained["data_dir"], data, ignore=shutil.ignore_patterns("mlflow_prepare_run.*"))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    record = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.tracking", str(data)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = MlflowServer(tmp_path / "store", port=port)
    try:
        assert record.stderr is not None
        first = record.stderr.readline()
        assert "attempt 1 to record in MLflow failed" in first and "retrying" in first, first
        server.start()
        out, err = record.communicate(timeout=300)
        assert record.returncode == 0, err
        run_id = json.loads((data / "mlflow_prepare_run.json").read_text())["run_id"]
        assert f"prepare run {run_id}" in out
        run = MlflowClient(server.uri).get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params  # the options arrived
    finally:
        record.kill()
        server.stop()
