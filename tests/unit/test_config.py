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


def write_run_yaml(folder: Path, train_lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(
        "model:\n  path: model\ndata:\n  path: ../data\ntrain:\n  output_dir: out\n  max_steps: 10\n" + train_lines
    )
    return path


def test_learning_rates_as_ml_engineers_write_them(tmp_path: Path) -> None:
    assert load_config(TINY, ["train.lr=1e-5"]).train.lr == 1e-5
    assert load_config(TINY, ["train.lr=1E-2", "train.min_lr_ratio=1e-1"]).train.min_lr_ratio == 0.1
    cfg = load_config(write_run_yaml(tmp_path, "  lr: 3e-5\n  adam_eps: 1e-8\n  weight_decay: 1E-2\n"))
    assert (cfg.train.lr, cfg.train.adam_eps, cfg.train.weight_decay) == (3e-5, 1e-8, 1e-2)
    assert type(cfg.train.lr) is float
    assert yaml.safe_load(dump_yaml(cfg))["train"]["lr"] == 3e-5  # dumped as a float YAML 1.1 reads back


def test_a_wrong_value_names_the_override_or_the_file_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, ["train.lr=abc"])
    assert str(caught.value) == "override train.lr=abc: train.lr='abc': expected a number"
    path = write_run_yaml(tmp_path, "  lr: abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:8: train.lr='abc': expected a number"
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["train.lr=2e-5", "train.warmup_steps=10"])  # the file's lr is overridden: fine
    assert str(caught.value) == ("override train.warmup_steps=10: train.warmup_steps=10 must be < train.max_steps=10")
    with pytest.raises(ConfigError, match=r":8: unknown key train\.max_step; valid keys of train: output_dir"):
        load_config(write_run_yaml(tmp_path, "  max_step: 3\n"))


def test_relative_paths_resolve_against_the_config_folder_and_overrides_against_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_run_yaml(tmp_path / "recipes", "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe, ["eval.prompts_file=prompts.jsonl", "model.trust_remote_code_paths=[model, /abs]"])
    assert cfg.model.path == str(tmp_path / "recipes" / "model")
    assert cfg.data.path == str(tmp_path / "data")  # ../data, normalized
    assert cfg.train.output_dir == str(tmp_path / "recipes" / "out")
    assert cfg.eval.prompts_file == str(elsewhere / "prompts.jsonl")  # an override: against the current directory
    assert cfg.model.trust_remote_code_paths == (str(elsewhere / "model"), "/abs")
    # deepspeed.config (the default here) falls back to the project's shipped ds_configs/
    assert cfg.deepspeed.config == str(ROOT / "ds_configs" / "zero2.json")
    assert load_config(recipe, ["deepspeed.config=ds_configs/zero3.json"]).deepspeed.config == str(
        ROOT / "ds_configs" / "zero3.json"
    )
    (elsewhere / "ds_configs").mkdir()
    (elsewhere / "ds_configs" / "zero3.json").write_text("{}")  # a file of the user's own wins over the project's
    assert load_config(recipe, ["deepspeed.config=ds_configs/zero3.json"]).deepspeed.config == str(
        elsewhere / "ds_configs" / "zero3.json"
    )
    assert load_config(recipe, ["deepspeed.config=nowhere.json"]).deepspeed.config == str(elsewhere / "nowhere.json")
    # the resolved config is location-independent: it reloads identically from anywhere
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_yaml(cfg))
    monkeypatch.chdir(ROOT)
    assert load_config(dumped) == cfg


def test_the_prepare_config_reads_yaml_12_floats_too(tmp_path: Path) -> None:
    from data_pipeline.options import build_options, read_config

    path = tmp_path / "prep.yaml"
    path.write_text("sources: [a.jsonl]\ntokenizer: tok\nout: o\nval_fraction: 1e-2\nmax_bad_fraction: 5E-3\n")
    options = build_options(read_config(path, ["max_dropped_fraction=2e-1"]), f"--config {path}")
    assert (options.val_fraction, options.max_bad_fraction, options.max_dropped_fraction) == (0.01, 0.005, 0.2)
