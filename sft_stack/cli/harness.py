"""The ``evaluate --tasks`` flags: lm-evaluation-harness benchmarks on the loaded model, and ``--compare BASE``.

    python -m sft_stack.cli.evaluate --model OUT/final --tasks ceval-valid,cmmlu --limit 200 --num-fewshot 5
    python -m sft_stack.cli.evaluate --model BASE --adapter OUT/final --tasks tiny_mc \\
        --include-path tests/fixtures/harness --compare BASE --tracking-uri sqlite:///mlflow.db --run-id RUN

The library part (loading tasks offline, running the harness on our loaded model) is trainer/harness.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from sft_stack.cli.flags import template_from_args
from tracking.records import log_harness
from trainer.harness import HarnessOptions, HarnessResult, evaluate_tasks, load_tasks
from trainer.inference import Loaded, load_for_inference

log = logging.getLogger(__name__)


def add_harness_flags(parser: argparse.ArgumentParser) -> None:
    """--tasks and how to run them (the model flags and --batch-size come from the evaluate parser)."""
    group = parser.add_argument_group("benchmarks (lm-evaluation-harness)")
    group.add_argument("--tasks", help="comma-separated harness task names (mmlu,gsm8k,...) or task YAML paths")
    group.add_argument("--include-path", help="folder of your own task YAMLs (local data, no network)")
    group.add_argument("--limit", type=int, help="score only the first N documents of each task")
    group.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    group.add_argument(
        "--apply-chat-template", action="store_true", help="render prompts as chat turns with the run's template"
    )
    group.add_argument("--compare", metavar="BASE", help="also run the tasks on model BASE and print the differences")


def options_from_args(args: argparse.Namespace) -> HarnessOptions:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    return HarnessOptions(
        tasks=tasks,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template,
        seed=args.seed,
    )


def check_tasks(args: argparse.Namespace) -> list[Any]:
    """The tasks loaded with their data, before the model: a misspelt name or missing data fails in seconds."""
    # The harness logs each request phase at INFO and warns that a loaded model skips its loading arguments
    # (which is the point here); its errors still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    options = options_from_args(args)
    return load_tasks(options.tasks, options.include_path)


def run_tasks(loaded: Loaded, args: argparse.Namespace, tasks: list[Any]) -> dict[str, HarnessResult]:
    """``{"model": result}``, plus ``"base"`` with ``--compare``: the same tasks and settings on both."""
    options = options_from_args(args)
    template = template_from_args(loaded, args).template if options.apply_chat_template else None
    found = {"model": evaluate_tasks(loaded.model, loaded.tokenizer, options, template=template, tasks=tasks)}
    log.info("benchmarks: %s", json.dumps(found["model"].metrics))
    if args.compare:
        base = load_for_inference(
            args.compare, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
        )
        base_template = template_from_args(base, args).template if options.apply_chat_template else None
        found["base"] = evaluate_tasks(base.model, base.tokenizer, options, template=base_template)
        log.info("benchmarks of %s: %s", args.compare, json.dumps(found["base"].metrics))
        print(compare_table(found["base"].metrics, found["model"].metrics), file=sys.stderr)
    return found


def compare_table(base: dict[str, float], model: dict[str, float]) -> str:
    """A before/after table of every metric both runs have (stderrs left out), with the difference."""
    names = [n for n in model if n in base and "_stderr" not in n]
    width = max([len(n) for n in names] + [len("task/metric")])
    lines = [f"{'task/metric':<{width}}  {'base':>8}  {'model':>8}  {'diff':>8}"]
    lines += [f"{n:<{width}}  {base[n]:>8.4f}  {model[n]:>8.4f}  {model[n] - base[n]:>+8.4f}" for n in names]
    return "\n".join(lines)


def harness_summary(found: dict[str, HarnessResult]) -> dict[str, Any]:
    """What the results JSON records: per model, the flat metrics and the harness's results dict."""
    return {label: {"metrics": r.metrics, "params": r.params, "results": r.results} for label, r in found.items()}


def write_samples(found: dict[str, HarnessResult], out: Path) -> dict[str, Path]:
    """Per model, every scored document as JSON lines next to the results JSON (``<out>.harness_samples.<model>.jsonl``)."""
    written = {}
    for label, result in found.items():
        path = out.with_name(f"{out.stem}.harness_samples.{label}.jsonl")
        rows = (row for task_rows in result.samples.values() for row in task_rows)
        path.write_text(
            "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows), encoding="utf-8"
        )
        written[label] = path
    return written


def log_benchmarks(found: dict[str, HarnessResult], args: argparse.Namespace) -> str:
    """harness/<task>/<metric> (and harness_base/... with --compare) into --run-id, or one new run; its id."""
    run_id = args.run_id
    for label, result in found.items():
        run_id = log_harness(
            result.results,
            result.samples,
            result.metrics,
            result.params,
            tracking_uri=args.tracking_uri,
            run_id=run_id,
            experiment=args.experiment,
            prefix="harness" if label == "model" else f"harness_{label}",
        )
    return str(run_id)
