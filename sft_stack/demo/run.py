"""The demo, top to bottom: a model learns chain-of-thought arithmetic from scratch, and we measure it.

    python -m sft_stack.demo                      # what `make demo` runs; --help for the knobs

1. data:      generated zh/en column-addition word problems (sft_stack/demo/arithmetic.py) as prompt,output CSV, a
              held-out set with unseen names/objects and unseen operand pairs, and the answer-only variant
2. tokenizer: a character-level tokenizer trained on the training corpus (sft_stack/demo/tokenizer.py), saved with the
              model's config.json as OUT/model, the directory that training starts from (random init)
3. prepare:   ``python -m data_pipeline prepare`` (CSV source, packing) for both variants
4. before:    ``cli.evaluate`` exact match of the random-init model on the held-out problems
5. train:     ``deepspeed --num_gpus 2 launcher/run.py --config configs/demo_arithmetic.yaml`` (2 CPU ranks,
              gloo), tracked in the embedded MLflow store; then the answer-only control with the same budget
6. after:     ``cli.evaluate`` of both models, each logged to its own run as eval/* (MLflow's compare view puts
              both on one eval/exact_match); each run's description holds its headline numbers and launch command
7. show:      a few held-out problems side by side: greedy and the seed notes' sampling preset
8. summary:   how to open the dashboard, and one JSON line

Steps 1-3 are skipped when OUT already holds their results for the same options (a second run reuses them);
the runs and evaluations are redone every time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.cli import main as data_cli
from sft_stack.cli.evaluate import main as evaluate_main
from sft_stack.cli.generate import main as generate_main
from sft_stack.common.ports import free_port
from sft_stack.demo.arithmetic import Problem, corpus_text, generate_problems, write_csv
from sft_stack.demo.tokenizer import train_char_tokenizer
from tracking.links import DASHBOARD, NOTE_TAG, compare_url, run_page_url
from tracking.naming import STORE_DIR, store_uri
from trainer.config import load_config
from trainer.model import build_random_model

ROOT = Path(__file__).resolve().parents[2]
"""The repository: configs/, launcher/run.py."""
CONFIG = ROOT / "configs" / "demo_arithmetic.yaml"
GENERATOR_FILES = (Path(__file__).with_name("arithmetic.py"), Path(__file__).with_name("tokenizer.py"))
TEMPLATE = "plain"
"""Prompt, newline, answer, eos: no chat markup to learn for a model that starts from nothing."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The Llama-shaped model trained from scratch: about 0.9M parameters with the ~150-character vocabulary."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    """Covers the packed rows (--max-seq-len) and the longest prompt plus its answer."""


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    out: Path
    """Everything goes here; OUT/mlruns is the embedded MLflow store (`make dashboard`)."""
    seed: int
    """Seeds the problems, the model init, the data order and sampling: the same seed gives the same numbers."""
    train_size: int
    """Training problems (distinct operand pairs)."""
    heldout_size: int
    """Held-out problems scored before and after training."""
    unseen_fraction: float
    """Share of held-out problems whose operand pair no training problem uses."""
    digits: int
    """Digits of each operand."""
    max_steps: int
    """Optimizer steps of each of the two runs."""
    max_seq_len: int
    """Tokens per packed row of the chain-of-thought data."""
    samples: int
    """Held-out problems shown side by side at the end."""
    overrides: tuple[str, ...]
    """Extra section.key=value overrides for both training runs."""
    command: str = "python -m sft_stack.demo"
    """How the demo was launched, for the runs' descriptions."""


STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"[demo {time.monotonic() - STARTED:5.0f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- steps 1-3


def write_data(opts: DemoOptions) -> dict[str, Path]:
    """The CSVs, reused when OUT/data/spec.json records the same generator options."""
    data = opts.out / "data"
    spec = {
        "seed": opts.seed,
        "train_size": opts.train_size,
        "heldout_size": opts.heldout_size,
        "unseen_fraction": opts.unseen_fraction,
        "digits": opts.digits,
        # A changed generator or tokenizer makes different data from the same options.
        "code": hashlib.sha256(b"".join(f.read_bytes() for f in GENERATOR_FILES)).hexdigest(),
    }
    paths = {
        name: data / f"{name}.csv" for name in ("train", "train_answer_only", "heldout", "heldout_unseen_operands")
    }
    spec_file = data / "spec.json"
    reusable = [*paths.values(), opts.out / "model" / "config.json"]
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec and all(p.is_file() for p in reusable):
        log(f"1/8 data: reusing {data} (same options)")
        log(f"2/8 tokenizer: reusing {opts.out / 'model'}")
        return paths
    shutil.rmtree(data, ignore_errors=True)
    train, heldout = generate_problems(
        train_size=opts.train_size,
        heldout_size=opts.heldout_size,
        unseen_fraction=opts.unseen_fraction,
        digits=opts.digits,
        seed=opts.seed,
    )
    write_csv(paths["train"], train)
    write_csv(paths["train_answer_only"], train, answer_only=True)
    write_csv(paths["heldout"], heldout)
    write_csv(paths["heldout_unseen_operands"], [p for p in heldout if p.unseen_operands])
    spec_file.write_text(json.dumps(spec))
    log(f"1/8 data: {len(train)} training and {len(heldout)} held-out problems in {data}, e.g.")
    show_problem(train[0])
    write_model_dir(opts.out / "model", train)
    return paths


def show_problem(p: Problem) -> None:
    print(f"    prompt: {p.prompt}\n    output: {p.output}\n    control output: {p.answer_only}", flush=True)


def write_model_dir(model_dir: Path, train: Sequence[Problem]) -> None:
    """OUT/model: the char tokenizer trained on the training corpus and a Llama config.json sized to it."""
    from transformers import LlamaConfig

    shutil.rmtree(model_dir, ignore_errors=True)
    # Each text with the template's newline between prompt and answer, so "\n" is in the vocabulary too.
    texts = [f"{text}\n" for text in corpus_text(train)]
    tokenizer_dir = train_char_tokenizer(texts, model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = ModelShape()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.save_pretrained(str(model_dir))
    log(f"2/8 tokenizer: {len(tokenizer)} tokens (one per character), saved with config.json in {model_dir}")


def prepare(source: Path, tokenizer_dir: Path, out: Path, *, max_seq_len: int, seed: int) -> Path:
    """``data_pipeline prepare`` (CSV, packed), skipped when OUT already holds a verified result of it."""
    if (out / "manifest.json").is_file() and data_cli(["verify", str(out)]) == 0:
        log(f"3/8 prepare: reusing {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    argv = [
        "prepare",
        *("--source", str(source), "--tokenizer", str(tokenizer_dir), "--template", TEMPLATE),
        *("--out", str(out), "--max-seq-len", str(max_seq_len), "--pack", "--workers", "2"),
        # Never truncate: a cut sample loses its answer and its end of turn (256-token rows once cut 14% of the
        # English problems, the ones with a thousands column); prepare fails instead, naming --max-seq-len.
        *("--overlong", "drop", "--max-dropped-fraction", "0"),
        *("--val-fraction", "0.02", "--seed", str(seed), "--no-progress"),
    ]
    log("3/8 prepare: python -m data_pipeline " + " ".join(argv))
    if data_cli(argv) != 0:
        raise SystemExit(f"prepare of {source} failed (see above)")
    return out


# ---------------------------------------------------------------------------------------------------- steps 4-7


def write_init_model(opts: DemoOptions, out: Path) -> Path:
    """The model exactly as training starts it (same config, same seed), saved for the 'before' evaluation."""
    cfg = load_config(CONFIG, [f"model.path={opts.out / 'model'}", f"train.seed={opts.seed}"])
    model = build_random_model(cfg)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out))
    shutil.copytree(opts.out / "model", out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("config.json"))
    return out


def evaluate(model: Path, prompts: Path, out: Path, *, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """``python -m sft_stack.cli.evaluate`` on held-out prompts (greedy, batched); returns its results JSON."""
    argv = [
        *("--model", str(model), "--template", TEMPLATE, "--prompts-file", str(prompts)),
        *("--preset", "greedy", "--max-new-tokens", str(max_new_tokens), "--batch-size", "100"),
        *("--seed", str(seed), "--out", str(out)),
    ]
    if evaluate_main(argv) != 0:
        raise SystemExit(f"evaluation of {model} failed (see above)")
    return dict(json.loads(out.read_text(encoding="utf-8")))


def log_scores(predictions: Path, out: Path, *, run: dict[str, str], prefix: str) -> float:
    """Score ``generate``/``evaluate`` rows with ``cli.evaluate --predictions`` into the run as prefix/*."""
    argv = [
        *("--predictions", str(predictions), "--out", str(out), "--metric-prefix", prefix),
        *("--tracking-uri", run["tracking_uri"], "--run-id", run["run_id"]),
    ]
    if evaluate_main(argv) != 0:
        raise SystemExit(f"scoring {predictions} failed (see above)")
    return float(json.loads(out.read_text(encoding="utf-8"))["generation"]["exact_match"])


def train(opts: DemoOptions, *, data: Path, output_dir: Path, run_name: str, extra: Sequence[str] = ()) -> str:
    """The real launcher: ``deepspeed --num_gpus 2 launcher/run.py`` on CPU ranks over gloo; returns the command."""
    shutil.rmtree(output_dir, ignore_errors=True)
    port = free_port()  # another launcher (a test, a second demo) may hold 29500
    import torch

    # CPU: 2 ranks over gloo. With GPUs: one rank per GPU, at most 2, so the step budget means the same.
    gpus = min(2, torch.cuda.device_count())
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        *("--num_gpus", str(gpus or 2), "--master_port", str(port)),
        *(str(ROOT / "launcher" / "run.py"), "--config", str(CONFIG)),
        f"model.path={opts.out / 'model'}",
        f"data.path={data}",
        f"train.output_dir={output_dir}",
        f"train.max_steps={opts.max_steps}",
        f"train.warmup_steps={max(1, opts.max_steps // 15)}",
        f"train.seed={opts.seed}",
        f"tracking.run_name={run_name}",
        *extra,
        *opts.overrides,
    ]
    log("deepspeed " + " ".join(command[1:]))
    # One thread per rank: two ranks of torch's default (all cores each) oversubscribe the cores, and OpenMP's
    # spinning threads then run several times slower, worse still when anything else shares the machine.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)}
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
    if subprocess.run(command, cwd=ROOT, env=env, check=False).returncode != 0:
        raise SystemExit(f"training into {output_dir} failed (see above)")
    return shlex.join(["deepspeed", *command[1:]])


def generate(model: Path, prompts: Path, out: Path, *, preset: str, max_new_tokens: int, seed: int) -> list[dict]:
    """``python -m sft_stack.cli.generate --prompts-file`` with one preset; returns its rows."""
    argv = [
        *("--model", str(model), "--template", TEMPLATE, "--prompts-file", str(prompts), "--preset", preset),
        *("--max-new-tokens", str(max_new_tokens), "--seed", str(seed), "--out", str(out)),
    ]
    if generate_main(argv) != 0:
        raise SystemExit(f"generation with {model} failed (see above)")
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def rows_for(prompts: set[str], generations: Path, out: Path) -> Path:
    """The rows of an evaluate generations file whose prompt is in ``prompts``."""
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["prompt"] in prompts))
    return out


def read_csv_prompts(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        return [row["prompt"] for row in csv.DictReader(f)]


def longest_answer_tokens(csv_path: Path, tokenizer_dir: Path) -> int:
    """Tokens of the longest reference output, the eos included: enough max_new_tokens for every problem."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with csv_path.open(encoding="utf-8", newline="") as f:
        return (
            max(len(tokenizer(row["output"], add_special_tokens=False)["input_ids"]) for row in csv.DictReader(f)) + 1
        )


def show_side_by_side(greedy: list[dict], seeded: list[dict]) -> None:
    for g, s in zip(greedy, seeded, strict=True):
        print(f"  prompt:    {g['prompt']}", flush=True)
        print(f"  reference: {g.get('reference', '')}")
        print(f"  greedy:    {g['output']}")
        print(f"  seed:      {s['output']}\n", flush=True)


# ---------------------------------------------------------------------------------------------------- the demo


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Every step; returns the summary (also printed as the last line)."""
    import torch

    started = time.monotonic()
    # Generation of a tiny model is many small matrix products: one thread does them as fast as two on a quiet
    # machine, and several times faster when another process competes for the cores.
    torch.set_num_threads(1)
    opts.out.mkdir(parents=True, exist_ok=True)
    # The demo keeps its own store, OUT/mlruns, for its prepare, training and evaluation processes alike
    # (they inherit this); a store the user chose with MLFLOW_TRACKING_URI wins.
    os.environ.setdefault("MLFLOW_TRACKING_URI", store_uri(opts.out / STORE_DIR))
    csvs = write_data(opts)
    model_dir = opts.out / "model"
    cot_data, control_data, control_len = prepare_both(opts, csvs, model_dir)

    evals = opts.out / "eval"
    shutil.rmtree(evals, ignore_errors=True)
    evals.mkdir()
    max_new = longest_answer_tokens(csvs["heldout"], model_dir)
    log(f"4/8 before training: exact match of the random-init model on {opts.heldout_size} held-out problems")
    init_dir = write_init_model(opts, opts.out / "init")
    before = evaluate(init_dir, csvs["heldout"], evals / "before.json", max_new_tokens=max_new, seed=opts.seed)
    log(f"accuracy before training: {before['generation']['exact_match']:.3f}")

    log(f"5/8 train with chain of thought: {opts.max_steps} steps on 2 CPU ranks")
    cot_dir, control_dir = opts.out / "cot", opts.out / "answer_only"
    sample_prompts = write_sample_prompts(csvs["heldout"], evals / "sample_prompts.csv", opts.samples)
    cot_command = train(
        opts,
        data=cot_data,
        output_dir=cot_dir,
        run_name="demo-cot",
        extra=[f"eval.prompts_file={sample_prompts}", f"eval.max_new_tokens={max_new}"],
    )
    log(f"5/8 control: the same model and step budget on the answers alone ({control_len}-token rows)")
    control_command = train(opts, data=control_data, output_dir=control_dir, run_name="demo-answer-only")

    log("6/8 after training: exact match on the held-out problems")
    run = json.loads((cot_dir / "mlflow_run.json").read_text(encoding="utf-8"))
    control_run = json.loads((control_dir / "mlflow_run.json").read_text(encoding="utf-8"))
    scores = score_runs(opts, csvs, evals, (run, control_run), cot_dir, control_dir, max_new)
    describe_runs(
        opts,
        scores,
        ("demo-cot", run, cot_dir, cot_command),
        ("demo-answer-only", control_run, control_dir, control_command),
    )

    log("7/8 a few held-out problems: greedy and the seed notes' sampling preset")
    show_samples(cot_dir / "final", sample_prompts, evals, run, max_new_tokens=max_new, seed=opts.seed)

    summary = {
        **{k: round(v, 4) for k, v in scores.items()},
        "mlflow_run_id": run["run_id"],
        "output_dir": str(opts.out),
        "seconds": round(time.monotonic() - started, 1),
    }
    log("8/8 done")
    store = Path(run["tracking_uri"].removeprefix("sqlite:///")).parent
    print(f"dashboard: make dashboard STORE={store}, then open")
    print(f"  the run:     {run_page_url(DASHBOARD, run['experiment_id'], run['run_id'])}")
    print(f"  both runs:   {compare_url(DASHBOARD, run['experiment_id'])}")
    print(json.dumps(summary), flush=True)
    return summary


def prepare_both(opts: DemoOptions, csvs: dict[str, Path], model_dir: Path) -> tuple[Path, Path, int]:
    """Prepared shards of the chain-of-thought corpus and of the answer-only control, and the control's row length."""
    cot_data = prepare(
        csvs["train"], model_dir, opts.out / "data" / "cot", max_seq_len=opts.max_seq_len, seed=opts.seed
    )
    # The control sees the same problems per optimizer step: its answers are about a third as long, so its
    # packed rows are a third as long too (the ratio of the two corpora's average sample length).
    control_len = max(64, round(opts.max_seq_len * _length_ratio(csvs["train_answer_only"], csvs["train"])))
    control_data = prepare(
        csvs["train_answer_only"], model_dir, opts.out / "data" / "answer_only", max_seq_len=control_len, seed=opts.seed
    )
    return cot_data, control_data, control_len


def write_sample_prompts(heldout: Path, path: Path, samples: int) -> Path:
    """The first ``samples`` held-out problems (with the CSV header) as a prompts file; returns ``path``."""
    with heldout.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[: samples + 1]
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def score_runs(
    opts: DemoOptions,
    csvs: dict[str, Path],
    evals: Path,
    runs: tuple[dict[str, str], dict[str, str]],
    cot_dir: Path,
    control_dir: Path,
    max_new: int,
) -> dict[str, float]:
    """Exact match before and after training (all held-out, unseen operand pairs), logged to the chain-of-thought
    run, and of the control, logged to the control's run: each run's own eval/*, so runs compare on one metric."""
    run, control_run = runs
    after = evaluate(cot_dir / "final", csvs["heldout"], evals / "after.json", max_new_tokens=max_new, seed=opts.seed)
    control = evaluate(
        control_dir / "final", csvs["heldout"], evals / "answer_only.json", max_new_tokens=max_new, seed=opts.seed
    )
    unseen = rows_for(
        set(read_csv_prompts(csvs["heldout_unseen_operands"])),
        evals / "after.generations.jsonl",
        evals / "after_unseen_operands.jsonl",
    )
    scores = {
        "accuracy_before": log_scores(
            evals / "before.generations.jsonl", evals / "before_scored.json", run=run, prefix="before"
        ),
        "accuracy_after": log_scores(
            evals / "after.generations.jsonl", evals / "after_scored.json", run=run, prefix="eval"
        ),
        "accuracy_unseen_operands": log_scores(
            unseen, evals / "after_unseen_operands_scored.json", run=run, prefix="eval_unseen_operands"
        ),
        "accuracy_answer_only": log_scores(
            evals / "answer_only.generations.jsonl", evals / "answer_only_scored.json", run=control_run, prefix="eval"
        ),
    }
    assert scores["accuracy_after"] == after["generation"]["exact_match"]
    assert scores["accuracy_answer_only"] == control["generation"]["exact_match"]
    return scores


def describe_runs(opts: DemoOptions, scores: dict[str, float], *runs: tuple[str, dict[str, str], Path, str]) -> None:
    """Each run's description (the MLflow note, shown at the top of its page): its headline numbers, the last
    losses, and the commands that launched it."""
    import mlflow

    headline = {
        "demo-cot": f"held-out exact match **{scores['accuracy_after']:.3f}** (random init "
        f"{scores['accuracy_before']:.3f}, answer-only control {scores['accuracy_answer_only']:.3f}); unseen "
        f"operand pairs {scores['accuracy_unseen_operands']:.3f}",
        "demo-answer-only": f"held-out exact match **{scores['accuracy_answer_only']:.3f}**, the control: the same "
        f"problems and steps, answers without the worked steps (chain of thought: {scores['accuracy_after']:.3f})",
    }
    for name, run, output_dir, command in runs:
        losses = last_losses(output_dir / "metrics.jsonl")
        note = "\n\n".join(
            [
                f"**{name}**: {headline[name]}",
                f"Last training loss {losses['loss']:.4f}, validation loss {losses['val_loss']:.4f}, after "
                f"{opts.max_steps} steps.",
                f"Launched by `{opts.command}`, which ran:",
                f"```\n{command}\n```",
            ]
        )
        mlflow.MlflowClient(run["tracking_uri"]).set_tag(run["run_id"], NOTE_TAG, note)


def last_losses(metrics_file: Path) -> dict[str, float]:
    """The last ``loss`` and ``val_loss`` of a run's metrics.jsonl (nan when it has none)."""
    last = {"loss": float("nan"), "val_loss": float("nan")}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        last.update({k: row[k] for k in last if row.get(k) is not None})
    return last


def show_samples(
    model_dir: Path, sample_prompts: Path, evals: Path, run: dict[str, str], *, max_new_tokens: int, seed: int
) -> None:
    """Greedy and the seed notes' sampling preset side by side, printed and logged to ``run``."""
    greedy = generate(
        model_dir,
        sample_prompts,
        evals / "samples_greedy.jsonl",
        preset="greedy",
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    seeded = generate(
        model_dir,
        sample_prompts,
        evals / "samples_seed.jsonl",
        preset="seed",
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    show_side_by_side(greedy, seeded)
    _log_side_by_side(run, greedy, seeded)


def _log_side_by_side(run: dict[str, str], greedy: list[dict], seeded: list[dict]) -> None:
    import mlflow

    client = mlflow.MlflowClient(run["tracking_uri"])
    table = {
        "prompt": [g["prompt"] for g in greedy],
        "reference": [g.get("reference", "") for g in greedy],
        "greedy": [g["output"] for g in greedy],
        "seed_preset": [s["output"] for s in seeded],
    }
    client.log_table(run["run_id"], table, "demo/side_by_side.json")


def _length_ratio(short: Path, long: Path) -> float:
    def total(path: Path) -> int:
        with path.open(encoding="utf-8", newline="") as f:
            return sum(len(row["prompt"]) + len(row["output"]) for row in csv.DictReader(f))

    return total(short) / total(long)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sft_stack.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_cot_out"), help="output folder (default demo_cot_out)")
    p.add_argument("--seed", type=int, default=0, help="problems, init, data order, sampling (default 0)")
    p.add_argument("--train-size", type=int, default=6000, help="training problems (default 6000)")
    p.add_argument("--heldout-size", type=int, default=400, help="held-out problems scored (default 400)")
    p.add_argument("--unseen-fraction", type=float, default=0.5, help="held-out share with unseen operand pairs")
    p.add_argument("--digits", type=int, default=3, help="digits of each operand (default 3)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps of each run (default 1000)")
    p.add_argument("--max-seq-len", type=int, default=384, help="tokens per packed chain-of-thought row")
    p.add_argument("--samples", type=int, default=3, help="held-out problems shown side by side (default 3)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for both training runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launched = shlex.join(["python", "-m", "sft_stack.demo", *(sys.argv[1:] if argv is None else argv)])
    opts = DemoOptions(**{**vars(args), "overrides": tuple(args.overrides), "command": launched})
    run_demo(opts)
    return 0
