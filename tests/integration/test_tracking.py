"""Tracking without a server: redaction, tracking off (mlflow never imported), the embedded store, the journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracking import cli
from tracking.journal import JOURNAL_FILE, RUN_FILE, SPOOL_DIR
from tracking.naming import (
    MAX_PARAM_CHARS,
    REDACTED,
    clean_params,
    clean_value,
    is_secret_name,
    resolve_tracking_uri,
    store_uri,
)
from trainer.config import load_config
from trainer.run_record import open_tracker

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
ALPACA = ROOT / "tests" / "fixtures" / "real" / "alpaca" / "alpaca_en_demo.json"


def tiny_config(out: Path, *overrides: str):
    return load_config(
        None,
        [f"model.path={TINY}", f"data.path={out / 'data'}", f"train.output_dir={out}", "train.max_steps=5", *overrides],
    )


@pytest.mark.parametrize(
    "name",
    ["hf_token", "HF_TOKEN", "api_key", "apiKey", "MLFLOW_TRACKING_PASSWORD", "db.passwd", "aws_secret_access_key",
     "gcp.credentials", "auth", "x.auth.header", "ds.wandb.key"],
)  # fmt: skip
def test_secret_looking_names_are_secret(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    ["tokenizer_path", "max_new_tokens", "data.tokenizer_fingerprint", "train.keep_last_checkpoints", "model.path",
     "ds.zero_optimization.stage", "author", "monkey"],
)  # fmt: skip
def test_ordinary_names_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_clean_params_redacts_truncates_and_strips_url_passwords() -> None:
    cleaned = clean_params(
        {
            "hf_token": "hf_abcdefghijklmnop",
            "lora.r": 16,
            "eval.prompts_file": None,
            "tracking.uri": "https://alice:s3cret@mlflow.example.com/",
            "long": "x" * 10_000,
            "empty_token": "",
        }
    )
    assert cleaned["hf_token"] == REDACTED
    assert cleaned["lora.r"] == "16"
    assert cleaned["eval.prompts_file"] == "null"
    assert cleaned["tracking.uri"] == f"https://{REDACTED}@mlflow.example.com/"
    assert len(cleaned["long"]) == MAX_PARAM_CHARS and cleaned["long"].endswith("...[truncated]")
    assert cleaned["empty_token"] == ""  # nothing to hide
    assert clean_value("list", ["a", "b"]) == '["a", "b"]'


def test_default_store_is_mlruns_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One default for prepare, training, evaluate and the dashboard: ./mlruns where the command runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri, artifacts = resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert store_uri(cli._parser().parse_args(["dashboard"]).store) == uri  # what `python -m tracking dashboard` serves
    makefile = (ROOT / "Makefile").read_text()
    assert "STORE ?= mlruns\n" in makefile  # `make dashboard` too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(None) == ("http://127.0.0.1:1", None)
    assert resolve_tracking_uri("http://h:2") == ("http://h:2", None)
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"  # a store of its own (the demo's) keeps its artifacts
    assert resolve_tracking_uri(other) == (other, (tmp_path / "elsewhere" / "artifacts").as_uri())


DISABLED_SCRIPT = """
import sys
from pathlib import Path
from trainer.config import load_config
from trainer.run_record import open_tracker
out = Path(sys.argv[1])
for rank, enabled in ((0, "false"), (1, "true")):
    cfg = load_config(None, [f"model.path={sys.argv[2]}", "data.path=d", f"train.output_dir={out}", "train.max_steps=2",
                             f"tracking.enabled={enabled}"])
    tracker = open_tracker(cfg=cfg, ds_config={}, output_dir=out, rank=rank, world_size=2, device="cpu")
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_artifact(sys.argv[2])
    tracker.log_table([{"a": 1}], "t.json")
    tracker.close("FINISHED", out)
    assert tracker.run_id is None
print(sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")))
"""


def test_tracking_off_or_other_rank_never_imports_mlflow(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", DISABLED_SCRIPT, str(tmp_path / "run"), str(TINY)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not (tmp_path / "run" / SPOOL_DIR).exists()
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_embedded_store_run_resumes_without_duplicate_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server: the run lands in ./mlruns; a second session continues it and skips steps it had."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    first = open_tracker(
        cfg=tiny_config(out, "tracking.system_metrics=false", "train.stop_at_step=3"),
        ds_config={"zero_optimization": {"stage": 2}},
        output_dir=out,
        rank=0,
        world_size=1,
        device="cpu",
    )
    for step in (1, 2, 3):
        first.log_metrics({"loss": 10.0 - step, "step": step, "note": "not a number"}, step)
    first.close("FINISHED")
    run_id = first.run_id
    assert run_id and json.loads((out / RUN_FILE).read_text())["run_id"] == run_id

    # resumed from a checkpoint at step 2: the loop logs step 3 again, then 4 and 5
    second = open_tracker(
        cfg=tiny_config(out, "tracking.system_metrics=false"),
        ds_config={"zero_optimization": {"stage": 2}},
        output_dir=out,
        rank=0,
        world_size=1,
        device="cpu",
    )
    assert second.run_id == run_id
    for step in (3, 4, 5):
        second.log_metrics({"loss": 10.0 - step + 0.5}, step)
    second.close("FINISHED")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.5), (5, 5.5)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.stop_at_step"] == "3"
    assert run.data.tags["changed_on_resume.train.stop_at_step"] == "null"
    assert "note" not in run.data.metrics
    ops = [json.loads(line) for line in (out / SPOOL_DIR / JOURNAL_FILE).read_text().splitlines()]
    assert [op["op"] for op in ops].count("start") == 2
    assert [op["seq"] for op in ops] == list(range(len(ops)))


def test_prepare_run_with_unreachable_server_warns_once_and_returns_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from data_pipeline.schema import Manifest, SplitInfo
    from data_pipeline.tracking import PREPARE_RUN_FILE, is_enabled, log_prepare_run

    manifest = Manifest(
        schema_version=1, sources=(), tokenizer_fingerprint="f" * 64, tokenizer_path="tok", template="qwen",
        packed=False, max_seq_len=16, options={"hf_token": "x"}, counts={"samples_read": 1}, length_histogram={},
        packing_efficiency=1.0, splits={"train": SplitInfo(shards=(), rows=0, samples=0, tokens=0, loss_tokens=0)},
    )  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: connection refused
    assert log_prepare_run(manifest, tmp_path / "data") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not tracked in MLflow at http://127.0.0.1:9" in err[0]
    assert "python -m data_pipeline.tracking" in err[0]
    assert not (tmp_path / "data" / PREPARE_RUN_FILE).exists()
    monkeypatch.setenv("SFT_TRACKING", "0")
    assert not is_enabled() and is_enabled(True)
    monkeypatch.delenv("SFT_TRACKING")
    assert is_enabled() and not is_enabled(False)


@pytest.mark.slow
def test_prepare_returns_before_its_record_and_the_record_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prepare` hands its MLflow record to a detached process; the run lands in the default store ./mlruns, the
    one a training run started in the same directory uses, so the training run's lineage tag names it."""
    from mlflow import MlflowClient

    from data_pipeline.tracking import LOG_FILE, PREPARE_RUN_FILE
    from trainer.run_record import lineage_tags

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SFT_TRACKING")}
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "prepare", "--source", str(ALPACA), "--tokenizer", str(TINY),
         "--out", "data", "--template", "qwen", "--max-seq-len", "128", "--no-progress"],
        cwd=tmp_path, env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recording the run in MLflow in the background" in result.stdout
    deadline = time.monotonic() + 300  # a generous bound on a busy machine; the record normally takes seconds
    while not (data / PREPARE_RUN_FILE).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    record = json.loads((data / PREPARE_RUN_FILE).read_text())
    assert record["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    manifest = json.loads((data / "manifest.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "prepare:data"
    assert run.data.metrics["samples_written"] == manifest["counts"]["samples_written"]
    assert run.data.params["option.max_seq_len"] == "128" and "option.workers" in run.data.params
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data")} == {
        "data/manifest.json", "data/rejects_summary.json"
    }  # fmt: skip
    assert client.get_experiment(record["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Traceback" not in (data / LOG_FILE).read_text()
    # the training run's link: the same store a training run started here logs to, and the dashboard's default
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert (
        lineage_tags(data, None)["data.prepare_tracking_uri"] == resolve_tracking_uri(None)[0] == record["tracking_uri"]
    )


def test_run_is_named_by_model_method_and_data(tmp_path: Path) -> None:
    from trainer.run_record import run_name

    assert run_name(tiny_config(tmp_path / "out")) == "tiny_llama-full-data"
    assert run_name(tiny_config(tmp_path / "out", "tracking.run_name=mine")) == "mine"


def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Two prepare records (or a record and a run) opening a new sqlite store at once raced in its table creation
    ("table _alembic_tmp_tags already exists", then every later run spooled): open_client holds the store's lock
    from the client's construction on. Real processes, started together."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    code = (
        "import sys; from tracking.naming import open_client, get_or_create_experiment;"
        f"c = open_client({uri!r}); print(get_or_create_experiment(c, 'race', None))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err[-2000:] for _, err, rc in results if rc]
    assert len({out.strip() for out, _, _ in results}) == 1  # one experiment, found or created by each
