"""ds_configs/*.json and configs/*.yaml: every shipped file validates; "auto" and injected keys are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.dist import zero_stage
from trainer.ds_config import build_ds_config, find_auto, load_ds_json, offload_device

ROOT = Path(__file__).resolve().parents[2]
DS_JSONS = sorted((ROOT / "ds_configs").glob("*.json"))
EXPECTED = {
    "zero1.json": (1, "none", "none"),
    "zero2.json": (2, "none", "none"),
    "zero3.json": (3, "none", "none"),
    "zero2_offload.json": (2, "cpu", "none"),
    "zero3_offload.json": (3, "cpu", "cpu"),
}


def test_the_five_shipped_ds_configs_exist() -> None:
    assert {p.name for p in DS_JSONS} >= set(EXPECTED)


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_shipped_ds_config_validates_and_merges(path: Path) -> None:
    raw = load_ds_json(path)
    if path.name in EXPECTED:
        stage, optimizer_to, params_to = EXPECTED[path.name]
        assert zero_stage(raw) == stage
        assert offload_device(raw, "offload_optimizer") == optimizer_to
        assert offload_device(raw, "offload_param") == params_to
    cfg = load_config(
        None,
        [
            "model.path=m",
            "data.path=d",
            "train.output_dir=o",
            "train.max_steps=5",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=16",
            "train.grad_clip=0.5",
            f"deepspeed.config={path}",
        ],
    )
    merged = build_ds_config(cfg, world_size=8)
    assert merged["train_batch_size"] == 4 * 16 * 8
    assert merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["gradient_accumulation_steps"] == 16
    assert merged["gradient_clipping"] == 0.5
    assert merged["bf16"] == {"enabled": True}
    assert merged["fp16"]["enabled"] is False
    assert "optimizer" not in merged and "scheduler" not in merged
    assert find_auto(merged) == []
    # DeepSpeed's own parser accepts the merged config (batch arithmetic, ZeRO section, precision). Outside a
    # process group it assumes world size 1.
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(build_ds_config(cfg, world_size=1))
    assert parsed.zero_optimization_stage == zero_stage(raw)
    assert parsed.train_batch_size == 4 * 16


def write(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return path


def test_auto_is_refused_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    with pytest.raises(ConfigError, match=r'"auto" at zero_optimization\.reduce_bucket_size'):
        load_ds_json(path)


@pytest.mark.parametrize(
    ("key", "owner"),
    [
        ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ("gradient_clipping", "train.grad_clip"),
        ("bf16", "model.dtype"),
        ("optimizer", "train.lr"),
    ],
)
def test_injected_keys_are_refused(tmp_path: Path, key: str, owner: str) -> None:
    path = write(tmp_path, {"zero_optimization": {"stage": 2}, key: 1})
    with pytest.raises(ConfigError, match=f"remove '{key}'.*{owner}"):
        load_ds_json(path)


def test_bad_stage_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage must be"):
        load_ds_json(write(tmp_path, {"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        load_ds_json(write(tmp_path, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"bad\.json:1: invalid JSON"):
        load_ds_json(bad)


def test_offload_config_forces_the_ds_cpu_optimizer() -> None:
    cfg = load_config(
        None,
        [
            "model.path=m",
            "data.path=d",
            "train.output_dir=o",
            "train.max_steps=5",
            f"deepspeed.config={ROOT / 'ds_configs' / 'zero3_offload.json'}",
            "model.dtype=fp32",
        ],
    )
    merged = build_ds_config(cfg, world_size=1)
    assert merged["zero_force_ds_cpu_optimizer"] is True
    assert merged["bf16"] == {"enabled": False} and merged["fp16"]["enabled"] is False


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_run_config_validates(path: Path) -> None:
    cfg = load_config(path)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("#") and str(path.relative_to(ROOT)) in first_line, "head it with its launch command"
    ds_path = ROOT / cfg.deepspeed.config
    merged = build_ds_config(load_config(path, [f"deepspeed.config={ds_path}"]), world_size=2)
    assert merged["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 2
