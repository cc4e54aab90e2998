"""Every command in the fenced ``bash`` blocks of README.md and docs/*.md runs, on the tiny fixtures.

Each line of a fenced bash block is one command (backslash continuations joined, ``# comments`` dropped). A
command is either run or listed in ``SKIP`` with the reason it cannot run here (a download, a SLURM cluster, a
server that runs until Ctrl-C ...); a new command that is neither fails ``test_every_fenced_command_is_run_or_skipped``.

``sft ...`` and ``python -m ...`` commands are run in this process (``sft_stack.cli.main``), from the repository
root, with the paths a reader replaces substituted (``Substitutes``): a model directory becomes the tiny Llama
(``tests/fixtures/tiny_llama``) or the base of the one tiny LoRA run trained for this module (``sft train --cpu
--gpus 2 tiny_cpu_lora``), ``OUT/final`` and ``runs/*/final`` that run's adapter, data directories one tiny
prepared dataset, corpora the committed BELLE sample, outputs fresh folders under tmp, and ``--workers N`` 1.
``sft train`` lines keep their own flags and overrides but train the tiny model: the recipe (its method picking
``tiny_cpu.yaml`` or ``tiny_cpu_lora.yaml``) gets ``--cpu --gpus 2`` and ``--dry-run``, and the resolved config
with the line's overrides is loaded by ``trainer.config.load_config``, strictly; the shipped recipes themselves
are validated by tests/unit/test_model_configs.py, and a real 2-rank run through ``sft train`` is this module's
fixture (and tests/integration/test_sft_cli.py). Generation is capped at a few new tokens.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sft_stack.cli.main import main as sft_main
from sft_stack.common.ports import free_port
from tests.helpers.data import BELLE, REPO, TINY_LLAMA

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SKIP: dict[str, str] = {
    "make demo": "minutes of training; tests/integration/test_demo.py runs the demo",
    "make test": "the whole suite itself",
    "make test-faults": "the fault drills (tests/faults), run by the suite itself",
    "make dashboard": "a server that runs until Ctrl-C; tests/integration/test_tracking_server.py serves the UI",
    "sft dashboard": "a server that runs until Ctrl-C; tests/integration/test_tracking_server.py serves the UI",
    "export MLFLOW_FLASK_SERVER_SECRET_KEY=": "the basic-auth dashboard's environment; test_tracking_server sets it",
    "export MLFLOW_AUTH_ADMIN_PASSWORD=": "the basic-auth dashboard's environment; test_tracking_server sets it",
    "huggingface-cli download": "a download from the Hugging Face hub; no network here",
    "sft convert": "needs an original checkpoint; tests/unit/test_convert.py converts the seed checkpoints",
    "sbatch": "needs a SLURM cluster; tests/slurm/test_slurm.py runs the sbatch scripts on a 2-node test cluster",
    "a=$(sbatch": "needs a SLURM cluster; tests/slurm/test_slurm.py runs the prepare array and its merge",
    "export SLURM_CONF=": "part of the SLURM test cluster's set-up (docs/slurm.md), run by tests/slurm",
    "scripts/slurm_cluster.sh": "starts munge and slurm daemons; tests/slurm/conftest.py does",
    "deepspeed": "the launcher line `sft train` builds (tests/integration/test_sft_cli.py); tests/distributed run it",
    "DS_ACCELERATOR=cpu deepspeed": "the launcher line `sft train --cpu` builds; tests/distributed run it",
    "DS_ACCELERATOR=cpu python launcher/run.py": "one-process launch; tests/unit/test_convert.py runs it",
    "python launcher/run.py": "one-process launch on a GPU (QLoRA); tests/unit/test_convert.py runs it on CPU",
    "python benchmarks/bench_train.py": "a benchmark; tests/integration/test_bench_train.py runs its dry run",
    "bash benchmarks/run_gpu.sh": "needs a GPU",
    "export HF_DATASETS_CACHE=": "where a networked machine caches public benchmark data; no network here",
    "lm_eval run": "downloads public benchmark data; tests/integration/test_harness.py runs local task YAMLs",
    "sft evaluate --model OUT/final --tasks ceval-valid": "public benchmarks need their data downloaded; "
    "tests/integration/test_harness.py runs local tasks and the offline refusal",
    "sft evaluate --model BASE --adapter OUT/final --tasks cmmlu": "public benchmarks need their data downloaded; "
    "tests/integration/test_harness.py runs --compare on a LoRA adapter with local tasks",
    "sft evaluate --model OUT/final --tasks my_task": "a placeholder line (`<training run id>`, a user's task folder); "
    "tests/integration/test_harness.py runs the fixture tasks into MLflow",
    "sft evaluate ... --tracking-uri": "a placeholder line (`...`, `<training run id>`); test_evaluate logs to MLflow",
}
"""Commands (by their first words) that are not run here, and why."""

MODULES = {
    "data_pipeline": [],
    "tracking": [],
    "sft_stack.cli.generate": ["generate"],
    "sft_stack.cli.evaluate": ["evaluate"],
    "sft_stack.cli.export": ["export"],
    "trainer.convert": ["convert"],
    "trainer.plan": ["plan"],
}
"""``python -m MODULE`` -> the ``sft`` subcommand it is (``data_pipeline``/``tracking`` take theirs from argv)."""


@dataclass(frozen=True)
class DocCommand:
    where: str
    """file:line of the command's first line."""
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def fenced_commands() -> Iterator[DocCommand]:
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_bash = False
        pending, start = "", 0
        for number, line in enumerate(lines, start=1):
            stripped = line.strip()
            if stripped.startswith("```"):
                in_bash = not in_bash and stripped in ("```bash", "```sh")
                continue
            if not in_bash:
                continue
            if not pending:
                start = number
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            words = tuple(shlex.split(pending + stripped, comments=True))
            pending = ""
            if words:
                yield DocCommand(f"{path.relative_to(REPO)}:{start}", words)


COMMANDS = list(fenced_commands())


def skip_reason(command: DocCommand) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.text.startswith(prefix)), None)


def sft_argv(command: DocCommand) -> list[str] | None:
    """The ``sft`` argv a runnable command is, or None."""
    words = list(command.words)
    if words[0] == "sft":
        return words[1:]
    if words[:2] == ["python", "-m"] and words[2] in MODULES:
        return [*MODULES[words[2]], *words[3:]]
    return None


def test_every_fenced_command_is_run_or_skipped() -> None:
    assert len(COMMANDS) > 40  # the parser reads real blocks (an empty list would pass vacuously)
    unlisted = [f"{c.where}: {c.text}" for c in COMMANDS if skip_reason(c) is None and sft_argv(c) is None]
    assert not unlisted, "fenced commands neither run nor listed in SKIP (with the reason):\n" + "\n".join(unlisted)


def test_no_skip_entry_is_stale() -> None:
    used = {prefix for prefix in SKIP for c in COMMANDS if c.text.startswith(prefix)}
    assert set(SKIP) == used, f"SKIP entries no document uses any more: {sorted(set(SKIP) - used)}"


@dataclass(frozen=True)
class Substitutes:
    """What the docs' placeholder paths become here."""

    tmp: Path
    data: Path
    """One tiny prepared dataset (BELLE sample, tiny Llama tokenizer, qwen template)."""
    run: Path
    """One tiny LoRA run (2 ranks, 2 steps): run/final is its adapter, run/random_init_base its base."""
    prompts_jsonl: Path
    prompts_csv: Path
    predictions: Path


def _write_inputs(tmp: Path) -> tuple[Path, Path, Path]:
    gsm8k = tmp / "gsm8k_test.jsonl"  # GSM8K's own rows, as the docs suggest passing them
    gsm8k.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in [("1+1=?", "1+1=2\n#### 2")] * 2)
    )
    csv = tmp / "prompts.csv"
    csv.write_text('prompt,output\n"2+2=?","#### 4"\n你好,你好\n', encoding="utf-8")
    predictions = tmp / "gen.jsonl"
    predictions.write_text(json.dumps({"prompt": "1+1=?", "output": "2", "reference": "#### 2"}) + "\n")
    return gsm8k, csv, predictions


@pytest.fixture(scope="module")
def subs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Substitutes]:
    tmp = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as patch:
        # prepare's MLflow record runs in a process of its own: not needed here (and not after this module:
        # left set, it turned off the records that later modules wait for)
        patch.setenv("SFT_TRACKING", "0")
        yield _substitutes(tmp)


def _substitutes(tmp: Path) -> Substitutes:
    """The tiny prepared data and the tiny 2-rank LoRA run the commands are pointed at."""
    data = tmp / "data"
    prepare = ["prepare", "--source", str(BELLE), "--tokenizer", str(TINY_LLAMA), "--template", "qwen", "--out",
               str(data), "--max-seq-len", "256", "--pack", "--val-fraction", "0.1", "--no-progress"]  # fmt: skip
    assert sft_main(prepare) == 0
    port = free_port()  # not the default port: another launcher may hold it
    run = tmp / "run"
    train = [sys.executable, "-m", "sft_stack.cli", "train", "tiny_cpu_lora", "--cpu", "--gpus", "2",
             "--master-port", str(port), f"data.path={data}", f"train.output_dir={run}", "train.max_steps=2", "train.warmup_steps=0",
             "train.save_every_steps=2", "eval.every_steps=0", "tracking.enabled=true"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Substitutes(tmp, data, run, *_write_inputs(tmp))


def _model(value: str, subs: Substitutes) -> str:
    """--model: a run's export is the tiny run's adapter; any other model directory is the tiny run's base."""
    return str(subs.run / "final") if Path(value).name in ("final", "merged") else str(subs.run / "random_init_base")


def _out(command: str, value: str, subs: Substitutes, index: int) -> str:
    return str(subs.tmp / "outputs" / f"{index}-{command}" / Path(value).name)


def substitute(argv: list[str], subs: Substitutes, index: int) -> list[str]:
    """The docs' command with its placeholder paths replaced (module docstring)."""
    command, rest = argv[0], argv[1:]
    values = {
        "--source": lambda v: str(BELLE),
        "--tokenizer": lambda v: str(TINY_LLAMA),
        "--out": lambda v: _out(command, v, subs, index),
        "--model": lambda v: str(TINY_LLAMA) if command == "plan" else _model(v, subs),
        "--adapter": lambda v: str(subs.run / "final"),
        "--run": lambda v: str(subs.run),
        "--checkpoint": lambda v: str(subs.run / "checkpoints" / "step_00000002"),
        "--data": lambda v: str(subs.data),
        "--prompts-file": lambda v: str(subs.prompts_csv if v.endswith(".csv") else subs.prompts_jsonl),
        "--predictions": lambda v: str(subs.predictions),
        "--workers": lambda v: "1",
        "--gpus": lambda v: "2",
    }
    dropped = {"--hostfile", "--nodes"}
    overrides = {
        "data.path": str(subs.data),
        "train.output_dir": str(subs.tmp / "outputs" / f"{index}-train"),
        "model.path": str(TINY_LLAMA),
    }
    out: list[str] = [command]
    positionals: list[str] = []
    words = iter(rest)
    for word in words:
        if word in values:
            out += [word, values[word](next(words))]
        elif word in dropped:
            next(words)
        elif "=" in word and not word.startswith("-"):
            key, _, value = word.partition("=")
            out.append(f"{key}={overrides.get(key, value)}")
        elif not word.startswith("-"):
            positionals.append(word)
            out.append(word)
        else:
            out.append(word)
    match command:
        case "verify" | "inspect":
            out[out.index(positionals[0])] = str(subs.data)
        case "sync":
            out[out.index(positionals[0])] = str(subs.run)
        case "configs" if positionals[:1] == ["cp"]:
            out[out.index(positionals[2])] = str(subs.tmp / "outputs" / f"{index}-configs" / positionals[2])
        case "prepare" if "--config" in out:
            # the shipped prepare YAMLs name real corpora and tokenizers: the tiny ones instead
            out += [f"data.sources=[{BELLE}]", f"data.tokenizer={TINY_LLAMA}", "work.workers=1",
                    f"data.out={_out(command, 'data', subs, index)}"]  # fmt: skip
        case "train":
            recipe = REPO / positionals[0]
            method = yaml.safe_load(recipe.read_text())["model"]["method"]
            tiny = "configs/tiny_cpu_lora.yaml" if method in ("lora", "qlora") else "configs/tiny_cpu.yaml"
            out[out.index(positionals[0])] = tiny
            out += ["--cpu", "--dry-run", f"data.path={subs.data}", "train.max_steps=2", "train.warmup_steps=0"]
            if "--gpus" not in out:
                out += ["--gpus", "2"]
            if not any(w.startswith("train.output_dir=") for w in out):
                out.append(f"train.output_dir={overrides['train.output_dir']}")
        case "generate" | "chat" | "evaluate":
            out += ["--max-new-tokens", "4", "--device", "cpu"]
            if command == "evaluate" and "--out" not in out:  # its default, eval_results.json, is in the cwd
                out += ["--out", _out(command, "eval_results.json", subs, index)]
    if command in ("prepare", "merge"):
        out.append("--no-progress")
    return out


RUNNABLE = [c for c in COMMANDS if skip_reason(c) is None and sft_argv(c) is not None]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: c.where)
def test_fenced_command_runs(
    command: DocCommand, subs: Substitutes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = sft_argv(command)
    assert argv is not None
    index = RUNNABLE.index(command)
    args = substitute(argv, subs, index)
    monkeypatch.chdir(REPO)
    if args[0] == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("1+1=?\n/exit\n"))
    try:
        code = sft_main(args)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    captured = capsys.readouterr()
    assert code == 0, f"{command.where}: sft {shlex.join(args)}\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
    if args[0] == "train":
        from trainer.config import load_config

        config = args[1]
        keys = [w for w in args[2:] if re.match(r"^[a-z_]+\.[a-z_]+=", w)]
        cfg = load_config(REPO / config, keys)  # the line's overrides are valid keys with valid values
        assert cfg.data.path == str(subs.data)
    if args[0] == "prepare":
        out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(args[-2].split("=", 1)[1])
        assert (out / "manifest.json").is_file()
