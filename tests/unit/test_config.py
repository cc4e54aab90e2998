"""Run config loading as the launcher uses it: strict dotted overrides, clear errors, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_overrides_apply_and_the_dump_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["train.max_steps=7", "model.method=lora", "train.stop_at_step=3", "lora.r=4"])
    assert (cfg.train.max_steps, cfg.model.method, cfg.train.stop_at_step, cfg.lora.r) == (7, "lora", 3, 4)
    dumped = tmp_path / "run_config.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert load_config(dumped) == cfg
    assert yaml.safe_load(dumped.read_text())["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", r"unknown key train\.max_step; valid keys of train: output_dir, max_steps"),
        ("optim.lr=1", r"unknown section 'optim'"),
        ("train.max_steps=ten", r"train\.max_steps='ten': expected an integer"),
        ("model.method=adapter", r"model\.method='adapter': must be one of full, lora, qlora"),
        ("train.stop_at_step=99", r"train\.stop_at_step=99: must be in 1\.\.train\.max_steps"),
    ],
)
def test_bad_overrides_fail_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])
