"""Every shipped run YAML loads, merges its DeepSpeed config, passes validate_method, and the large-model ones
carry the planner verdict that `python -m trainer.plan` prints today for the command in their header."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.ds_config import build_ds_config
from trainer.model import validate_method
from trainer.plan import main as plan_main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PLANNED = {
    "llama2_7b_full_zero3_2nodes.yaml": ("full", "zero3.json", 16),
    "llama2_13b_full_zero3_offload.yaml": ("full", "zero3_offload.json", 8),
    "moss_16b_full_2nodes.yaml": ("full", "zero2.json", 16),
    "llama2_7b_lora_zero2.yaml": ("lora", "zero2.json", 4),
    "llama2_7b_qlora_1gpu.yaml": ("qlora", "zero2.json", 1),
    "chatglm3_6b_lora_1gpu.yaml": ("lora", "zero2.json", 1),
    "baichuan2_7b_full_zero3.yaml": ("full", "zero3.json", 8),
}


def test_the_five_large_model_configs_are_shipped() -> None:
    assert {p.name for p in CONFIGS} >= set(PLANNED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # from any directory: deepspeed.config falls back to the project's ds_configs/
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ") and f"--config configs/{path.name}" in first_line
    cfg = load_config(path)
    world = PLANNED.get(path.name, ("", "", 2))[2]
    ds_config = build_ds_config(cfg, world_size=world)
    validate_method(cfg, ds_config)
    if path.name in PLANNED:
        method, ds_json, _ = PLANNED[path.name]
        assert cfg.model.method == method and cfg.deepspeed.config == str(ROOT / "ds_configs" / ds_json)


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_header_verdict_is_what_the_planner_prints(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    header = [line.removeprefix("#").strip() for line in (ROOT / "configs" / name).read_text().splitlines()]
    (command,) = [line for line in header if line.startswith("Planner: python -m trainer.plan ")]
    (verdict,) = [line for line in header if line.startswith("verdict: ")]
    assert plan_main(shlex.split(command.removeprefix("Planner: python -m trainer.plan "))) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict: ")]
    assert printed == [verdict.removesuffix(".")]
    method, ds_json, _ = PLANNED[name]
    assert verdict.startswith(f"verdict: {method}") and (ds_json in verdict or method == "qlora")
