"""Security checks: unsafe unpickling only on verified directories, loopback dashboard, no remote code by default,
secrets never reach MLflow (cli.evaluate included).

The drills with planted pickles are in test_checkpoint_faults.py; control-token injection for every template is
tests/unit/test_templates.py::test_control_strings_in_content_stay_text (all templates, parametrized).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from sft_stack.chat.registry import TEMPLATE_NAMES
from tracking import cli, naming
from trainer.config import load_config, to_dict

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
UNSAFE_LOAD_ALLOWED = {("trainer/export.py", "load_checkpoint_state")}
"""The one torch.load(weights_only=False) of ours: DeepSpeed's model states of a checkpoint directory that
resolve_checkpoint verified against its marker first (docs/RELIABILITY.md, "Security")."""


def torch_load_calls() -> list[tuple[str, str, ast.Call]]:
    calls = []
    for package in ("launcher", "trainer", "data_pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch"
                    ):
                        calls.append((str(path.relative_to(ROOT)), func.name, node))
    return calls


def test_every_torch_load_is_weights_only_or_the_documented_exception() -> None:
    calls = torch_load_calls()
    assert len(calls) >= 3  # checkpoint RNG, generate's legacy adapter, export's model states
    for where, function, call in calls:
        flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        assert isinstance(flag, ast.Constant), f"{where}:{call.lineno} torch.load without an explicit weights_only"
        if flag.value is not True:
            assert (where, function) in UNSAFE_LOAD_ALLOWED, f"{where}:{call.lineno} weights_only=False"


def test_dashboard_binds_loopback_unless_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"")
    seen: list[str] = []

    def fake_command(store: Path, host: str, port: int, extra: list[str]) -> list[str]:
        seen.append(host)
        return ["true"]

    monkeypatch.setattr(cli, "dashboard_command", fake_command)
    cli.main(["dashboard", "--store", str(tmp_path)])
    cli.main(["dashboard", "--store", str(tmp_path), "--host", "0.0.0.0"])
    assert seen == ["127.0.0.1", "0.0.0.0"]
    assert "HOST ?= 127.0.0.1" in (ROOT / "Makefile").read_text()


def test_remote_code_is_off_by_default() -> None:
    from sft_stack.cli.evaluate import build_parser as evaluate_parser
    from sft_stack.cli.generate import build_parser as generate_parser

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    assert cfg.model.trust_remote_code_paths == ()  # the allow-list (test_model.py: refused unless listed)
    assert generate_parser().parse_args(["--model", "m", "--prompt", "p"]).trust_remote_code is False
    assert evaluate_parser().parse_args(["--model", "m"]).trust_remote_code is False


def test_control_token_injection_is_tested_for_every_template() -> None:
    source = (ROOT / "tests" / "unit" / "test_templates.py").read_text()
    assert 'FAMILIES = tuple(name for name in TEMPLATE_NAMES if name != "tokenizer")' in source
    assert '@pytest.mark.parametrize("name", (*FAMILIES, "tokenizer"))\ndef test_control_strings_in_content' in source
    assert len(TEMPLATE_NAMES) >= 10


SECRETS = {"hf_token": "hf_SECRET1", "api_key": "sk-SECRET2", "password": "SECRET3"}


def test_redact_covers_keys_urls_and_nesting() -> None:
    tree: dict[str, Any] = {
        "uri": "https://alice:SECRET4@mlflow.example.com/x",
        "nested": [{"hf_token": "hf_SECRET1", "ok": "max_new_tokens"}],
        "max_new_tokens": 64,
    }
    clean = naming.redact(tree)
    assert "SECRET" not in json.dumps(clean)
    assert clean["nested"][0]["ok"] == "max_new_tokens" and clean["max_new_tokens"] == 64


def test_config_artifact_has_no_url_password() -> None:
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["tracking.uri=https://bob:SECRET5@mlflow.example.com"])
    assert "SECRET5" not in json.dumps(naming.redact(to_dict(cfg)))


def test_evaluate_redacts_what_it_logs_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    # mlflow.set_tracking_uri (the evaluation record's old fluent API) exports MLFLOW_TRACKING_URI; registered here so
    # teardown removes it and later tests' subprocesses (the demo's training runs) do not inherit this store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    from tracking.records import log_evaluation

    results = {
        "loss": {"loss": 1.5, "perplexity": 4.48, "data": "https://carol:SECRET6@data.example.com/v1", **SECRETS},
        "decoding": {"preset": "greedy", "auth": "Bearer SECRET7"},
    }
    rows = [{"prompt": "p", "prediction": "q", "api_key": "sk-SECRET8"}]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_evaluation(results, rows, tracking_uri=uri, run_id=None, experiment="eval")
    client = mlflow.MlflowClient(uri)
    logged = ""
    for artifact in ("eval/results.json", "eval/generations.json"):
        logged += Path(client.download_artifacts(run_id, artifact, str(tmp_path))).read_text()
    assert "eval/loss" in client.get_run(run_id).data.metrics
    assert "SECRET" not in logged, logged
    assert '"***"' in logged and "***@data.example.com" in logged
