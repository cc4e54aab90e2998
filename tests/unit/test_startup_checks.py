"""The mistakes a user makes in a run, each refused by `python launcher/run.py` before any process group: one line
per problem, exit code 2, and no "joining the process group" line (trainer/preflight.py). And the other side: a
shipped recipe runs from a directory outside the repository, announcing the join."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.data import make_prepared_dir

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
JOINING = "joining the process group"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with prepared data, data whose manifest names an unknown template, prompts, bad DeepSpeed JSONs."""
    root = tmp_path_factory.mktemp("mistakes")
    data = make_prepared_dir(root / "data")
    shutil.copytree(data, root / "data_bad_template")
    manifest = json.loads((data / "manifest.json").read_text())
    (root / "data_bad_template" / "manifest.json").write_text(json.dumps({**manifest, "template": "nosuch"}))
    (root / "empty_dir").mkdir()
    (root / "prompts.jsonl").write_text('{"prompt": "What is 2 + 3?"}\n')
    (root / "ds_injected.json").write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    (root / "ds_broken.json").write_text('{"zero_optimization": {"stage": 2},\n}')
    (root / "wrong_type.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load(TINY.read_text()), "train": {"output_dir": "o", "max_steps": "ten"}})
    )
    return root


def launch(cwd: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, str(ROOT / "launcher" / "run.py"), "--config", str(config), *overrides],
        cwd=cwd, env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


MISTAKES = [
    # (name, overrides with {w} for the fixture folder, the line's start, what it must say)
    ("unknown key", ["train.max_step=3"], "sft: error: override train.max_step=3: ", "unknown key train.max_step; valid keys of train: output_dir, max_steps"),
    ("wrong type in the YAML", ["@wrong_type.yaml"], "sft: error: {w}/wrong_type.yaml:", ": train.max_steps='ten': expected an integer"),
    ("wrong type in an override", ["train.lr=abc"], "sft: error: override train.lr=abc: ", "train.lr='abc': expected a number"),
    ("QLoRA with ZeRO-3", ["model.method=qlora", "model.dtype=bf16", "deepspeed.config=ds_configs/zero3.json"], "sft: error: model.method=qlora with ZeRO-3 ", "use ds_configs/zero2.json"),
    ("QLoRA with offload", ["model.method=qlora", "model.dtype=bf16", "deepspeed.config=ds_configs/zero2_offload.json"], "sft: error: model.method=qlora with offload_optimizer ", "without offload"),
    ("missing data folder", ["data.path={w}/no_such_data"], "sft: error: data.path={w}/no_such_data: no such directory", "python -m data_pipeline prepare --out"),
    ("data folder without a manifest", ["data.path={w}/empty_dir"], "sft: error: {w}/empty_dir/manifest.json: no manifest", "prepare"),
    ("missing model folder", ["model.path={w}/no_such_model"], "sft: error: model.path={w}/no_such_model: no such directory", "local HF model directory"),
    ("model folder without config.json", ["model.path={w}/empty_dir"], "sft: error: model.path={w}/empty_dir: no config.json there", "local HF model directory"),
    ("model without weights", ["model.random_init=false"], "sft: error: model.path=", "no weights (*.safetensors, *.bin, *.pt); download them there, or set model.random_init=true"),
    ("bad template", ["data.path={w}/data_bad_template", "eval.prompts_file={w}/prompts.jsonl"], "sft: error: {w}/data_bad_template/manifest.json: template 'nosuch' ", "re-run prepare with --template"),
    ("missing prompts file", ["eval.prompts_file={w}/no_prompts.jsonl"], "sft: error: eval.prompts_file={w}/no_prompts.jsonl: no such file", "unset it"),
    ("missing DeepSpeed config", ["deepspeed.config=ds_configs/zero9.json"], "sft: error: deepspeed.config={w}/ds_configs/zero9.json: file not found", "zero2.json"),
    ("DeepSpeed config setting an injected key", ["deepspeed.config={w}/ds_injected.json"], "sft: error: {w}/ds_injected.json: remove 'train_batch_size'", "train.micro_batch_size"),
    ("DeepSpeed config that is not JSON", ["deepspeed.config={w}/ds_broken.json"], "sft: error: {w}/ds_broken.json:2: invalid JSON", ""),
    ("unknown model family", ["model.family=llamma"], "sft: error: model.family='llamma': unknown; valid: auto, ", ""),
    ("unknown benchmark task", ["eval.harness_tasks=[tiny_mcc]", f"eval.harness_include_path={ROOT}/tests/fixtures/harness"], "sft: error: eval.harness_tasks: unknown task 'tiny_mcc' (did you mean tiny_mc", "lm_eval ls tasks"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "overrides", "start", "says"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_and_exit_2_before_the_process_group(
    world: Path, name: str, overrides: list[str], start: str, says: str
) -> None:
    config = world / overrides[0][1:] if overrides[0].startswith("@") else TINY
    overrides = [o.format(w=world) for o in overrides if not o.startswith("@")]
    result = launch(world, config, f"data.path={world / 'data'}", f"train.output_dir={world / 'out'}", *overrides)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(start.format(w=world)) and says in lines[0], lines[0]
    assert JOINING not in result.stdout
    assert not (world / "out").exists()


def test_every_problem_is_reported_at_once(world: Path) -> None:
    result = launch(
        world,
        TINY,
        f"data.path={world / 'no_such_data'}",
        f"train.output_dir={world / 'out'}",
        "model.method=qlora",
        "model.dtype=bf16",
        "deepspeed.config=ds_configs/zero3.json",
        f"eval.prompts_file={world / 'no_prompts.jsonl'}",
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 3, result.stderr[-3000:]
    assert all(line.startswith("sft: error: ") for line in lines) and len(lines) == 3, lines
    assert "qlora with ZeRO-3" in lines[0] and "no_such_data: no such directory" in lines[1]
    assert "no_prompts.jsonl: no such file" in lines[2]
    assert JOINING not in result.stdout


@pytest.mark.slow
def test_a_shipped_recipe_runs_from_a_directory_outside_the_repository(tmp_path: Path) -> None:
    """configs/tiny_cpu.yaml by absolute path, from a temporary directory: its model path (../tests/fixtures/...)
    resolves against configs/, its ds_configs/zero2.json falls back to the project's, and the relative data
    and output overrides resolve against the current directory."""
    make_prepared_dir(tmp_path / "data")
    result = launch(
        tmp_path, TINY, "data.path=data", "train.output_dir=out", "train.max_steps=4", "train.save_every_steps=0",
        "eval.every_steps=0", "tracking.enabled=false", "train.lr=1e-3",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"{JOINING}: 1 rank(s), rendezvous 127.0.0.1:" in result.stdout
    resolved = yaml.safe_load((tmp_path / "out" / "run_config.yaml").read_text())
    assert resolved["model"]["path"] == str(ROOT / "tests" / "fixtures" / "tiny_llama")
    assert resolved["deepspeed"]["config"] == str(ROOT / "ds_configs" / "zero2.json")
    assert resolved["data"]["path"] == str(tmp_path / "data") and resolved["train"]["lr"] == 1e-3
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def test_a_mistaken_override_holding_a_password_is_refused_without_printing_it(world: Path) -> None:
    """The refusal quotes the override, as every refusal does, but with the URI's password redacted: it may come
    from `sft train`'s SFT_SECRET_OVERRIDES, which exists to keep that password off every printed line."""
    result = launch(world, TINY, f"data.path={world / 'data'}", "tracking.urii=http://alice:pw-PLANTED@127.0.0.1:9/")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        "sft: error: override tracking.urii=http://***@127.0.0.1:9/: unknown key tracking.urii; valid keys of "
        "tracking: enabled, uri, experiment, run_name, upload_weights, close_timeout_s, system_metrics"
    ]
    assert "PLANTED" not in result.stdout + result.stderr
