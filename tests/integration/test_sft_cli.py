"""``sft``, the one command: every subcommand answers --help, the recipes listing and copy, the launcher line
``sft train`` builds and a real 2-rank run through it, and the entry points that predate it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from sft_stack.chat.registry import TEMPLATE_NAMES
from sft_stack.cli import configs as configs_cli
from sft_stack.cli.main import COMMANDS, main
from sft_stack.common.ports import free_port
from tests.helpers.data import REPO, make_prepared_dir

ALL = [
    "prepare", "verify", "inspect", "merge", "train", "generate", "chat", "evaluate", "export", "convert", "plan",
    "dashboard", "sync", "demo", "configs",
]  # fmt: skip
"""Every user task the issue names (issue 21, item 1)."""


def sft(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``sft ARGS`` as a user runs it: its own process (``python -m sft_stack.cli`` is the console script's code)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "sft_stack.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_console_script_is_declared() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sft"] == "sft_stack.cli.main:main"
    assert scripts["sft-data"] == "data_pipeline.cli:main"  # the older name keeps working


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    listed = re.findall(r"^  (\w+)  ", capsys.readouterr().out, flags=re.M)
    assert sorted(listed) == sorted(ALL) == sorted(c.name for c in COMMANDS)


@pytest.mark.parametrize("name", [n for n in ALL if n != "demo"])
def test_each_subcommand_help_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if name not in ("dashboard", "sync"):  # tracking's own parser names itself `python -m tracking`
        assert out.startswith(f"usage: sft {name}")


def test_demo_help_exits_0() -> None:
    result = sft("demo", "--help", timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m sft_stack.demo"), result.stderr


def test_unknown_subcommand_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"sft: error: unknown command 'trian'; choose from {', '.join(c.name for c in COMMANDS)}"
    )


def test_help_text_is_whole() -> None:
    """Item 9: no help cut at its first period, template names listed, the sampling preset apart from --seed."""
    prepare = sft("prepare", "--help").stdout
    assert "(e.g. a SLURM array); each writes a partial OUT for `merge`" in " ".join(prepare.split())
    assert "templates.TEMPLATE_NAMES" not in prepare
    assert ", ".join(TEMPLATE_NAMES) in " ".join(prepare.split())
    assert {"llama2", "llama3", "qwen", "baichuan2", "chatglm3", "moss"} <= set(TEMPLATE_NAMES)
    generate = " ".join(sft("generate", "--help").stdout.split())
    assert "--preset {greedy,beam,top_k,top_p,seed_readme}" in generate
    assert "{greedy,beam,top_k,top_p,seed}" not in generate


def test_configs_lists_every_shipped_recipe_with_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert path.stem in rows, path.name
    baichuan = rows["baichuan2_7b_full_zero3"].split()
    assert baichuan[1:4] == ["Baichuan2-7B-Chat-native", "full", "1x8"]
    assert rows["baichuan2_7b_full_zero3"].endswith("full ds_configs/zero3.json (28.4 of 40 GiB per GPU)")
    assert rows["chatglm3_6b_lora_1gpu"].split()[1:4] == ["chatglm3-6b-native", "lora", "1x1"]
    assert rows["tiny_cpu"].split()[1:4] == ["tiny_llama", "full", "2"]


def test_configs_cp_copies_a_recipe_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "cp", "chatglm3_6b_lora_1gpu", str(tmp_path)]) == 0
    copied = tmp_path / "chatglm3_6b_lora_1gpu.yaml"
    assert copied.read_bytes() == (REPO / "configs" / "chatglm3_6b_lora_1gpu.yaml").read_bytes()
    assert main(["configs", "cp", "tiny_cpu.yaml", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == (REPO / "configs" / "tiny_cpu.yaml").read_bytes()
    capsys.readouterr()
    assert main(["configs", "cp", "tiny_cpu", str(tmp_path / "mine.yaml")]) == 2
    assert (
        capsys.readouterr().err
        == f"sft: error: {tmp_path / 'mine.yaml'}: already exists; pass --force to overwrite it\n"
    )
    assert main(["configs", "cp", "gpt5_full", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("sft: error: gpt5_full: no such recipe; shipped: baichuan2_7b_full_zero3")


def test_recipes_are_found_next_to_the_installed_packages() -> None:
    assert configs_cli.CONFIGS_DIR == REPO / "configs"


def test_train_builds_the_deepspeed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "tiny_cpu", "--cpu", "--gpus", "2", "--master-port", "29555", "--dry-run", "train.max_steps=2"]
    assert main(args) == 0
    assert capsys.readouterr().err == (
        f"sft train: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port 29555 {REPO / 'launcher/run.py'} "
        f"--config {REPO / 'configs/tiny_cpu.yaml'} train.max_steps=2\n"
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    config = "configs/llama2_7b_full_zero3_2nodes.yaml"
    assert main(["train", config, "--hostfile", str(hosts), "--nodes", "2", "--dry-run", "train.lr=1e-5"]) == 0
    assert capsys.readouterr().err == (
        f"sft train: deepspeed --num_nodes 2 --hostfile {hosts} {REPO / 'launcher/run.py'} --config {config} "
        "train.lr=1e-5\n"
    )


PLANTED_URI = "http://alice:pw-PLANTED@127.0.0.1:9/?token=tok-PLANTED"


def test_train_keeps_a_credential_off_the_printed_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny_cpu", "--cpu", "--dry-run", f"tracking.uri={PLANTED_URI}", "train.max_steps=2"]) == 0
    assert capsys.readouterr().err == (
        f"sft train: DS_ACCELERATOR=cpu deepspeed {REPO / 'launcher/run.py'} --config {REPO / 'configs/tiny_cpu.yaml'} "
        "train.max_steps=2 (from the environment: tracking.uri=http://***@127.0.0.1:9/?token=***)\n"
    )
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\n")
    assert main(["train", "tiny_cpu", "--hostfile", str(hosts), "--dry-run", f"tracking.uri={PLANTED_URI}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sft: error: tracking.uri=http://***@127.0.0.1:9/?token=***: a credential on a multi-node")
    assert "PLANTED" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["configs/nope.yaml"],
            "configs/nope.yaml: no such run config; pass a YAML file or a shipped recipe's name (`sft configs` lists them)",
        ),
        (["tiny_cpu", "--hostfile", "no_hosts"], "--hostfile no_hosts: no such file"),
        (["tiny_cpu", "max_steps"], "'max_steps': expected a section.key=value override (e.g. train.max_steps=10)"),
    ],
)
def test_train_user_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err == f"sft: error: {message}\n"


@pytest.mark.slow
def test_sft_train_trains_the_tiny_model_on_two_gloo_ranks(tmp_path: Path) -> None:
    data = make_prepared_dir(tmp_path / "data", pack=True, max_seq_len=128)
    port = free_port()  # not the default port: another launcher may hold it
    out = tmp_path / "run"
    # what a killed CPU run on this rendezvous leaves: its ranks' shared-memory buffers, which DeepSpeed never unlinks
    buffers = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}") for rank in (0, 1)]
    for stale in buffers:
        stale.write_bytes(b"\xff" * 4096)
    result = sft(
        "train", "--cpu", "--gpus", "2", "--master-port", str(port), "configs/tiny_cpu.yaml",
        f"data.path={data}", f"train.output_dir={out}", "train.max_steps=4", "train.save_every_steps=0",
        "eval.every_steps=0", "tracking.enabled=false", f"tracking.uri={PLANTED_URI}", timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.startswith("sft train: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 ")
    # the credential reached the ranks (their resolved config holds the URI, redacted) but no printed line
    assert "uri: http://***@127.0.0.1:9/?token=***" in (out / "run_config.yaml").read_text()
    assert "PLANTED" not in result.stdout + result.stderr
    ds_config = json.loads((out / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4 * 2 * 2  # 4 micro x 2 accum x 2 ranks: both ranks joined
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "loss" in row] == [1, 2, 3, 4]
    assert (out / "final" / "config.json").is_file()
    assert [path for path in buffers if path.exists()] == []  # removed before joining, and this run's after leaving


OLD_ENTRY_POINTS = [
    (["-m", "data_pipeline", "prepare", "--help"], "usage: python -m data_pipeline prepare"),
    (["-m", "tracking", "sync", "--help"], "usage: python -m tracking sync"),
    (["-m", "sft_stack.cli.generate", "--help"], "usage: python -m sft_stack.cli.generate"),
    (["-m", "sft_stack.cli.evaluate", "--help"], "usage: python -m sft_stack.cli.evaluate"),
    (["-m", "sft_stack.cli.export", "--help"], "usage: python -m sft_stack.cli.export"),
    (["-m", "trainer.convert", "--help"], "usage: python -m sft_stack.cli.convert"),
    (["-m", "trainer.plan", "--help"], "usage: python -m sft_stack.cli.plan"),
    (["launcher/run.py", "--help"], "usage: run.py"),
]


@pytest.mark.parametrize(("argv", "usage"), OLD_ENTRY_POINTS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_old_entry_points_still_work(argv: list[str], usage: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith(usage), result.stderr[-2000:]
