"""Evaluate a trained model: loss and perplexity on a prepared split, and generation metrics on references.

    sft evaluate --model OUT/final --data DATA --split val --out eval.json
    sft evaluate --model OUT/final --prompts-file gsm8k_test.jsonl --out eval.json
    sft evaluate --predictions gen.jsonl --out eval.json            # score `sft generate --out` rows
    sft evaluate ... --tracking-uri sqlite:///mlflow.db --run-id RUN   # also log to MLflow
    sft evaluate --predictions gen.jsonl --run-id RUN --metric-prefix before  # before/* metrics
    sft evaluate --model OUT/final --tasks ceval-valid,gsm8k --limit 100 --compare BASE  # benchmarks

Loss is the training loop's validation loss (trainer/loss.py: one function for both), token-weighted over
every label that is not IGNORE_INDEX, on batches built and padded exactly as the loop builds them.
Generation metrics (trainer/answers.py): exact match of the final answer, sacrebleu corpus BLEU and mean
ROUGE-L F, CJK scored per character. Benchmarks (``--tasks``, sft_stack/cli/harness.py): lm-evaluation-harness
tasks, offline, logged as harness/<task>/<metric>. Results go to a JSON file; generated rows (with a per-row exact-match
flag) go next to it as ``<out stem>.generations.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from data_pipeline.schema import DataError
from sft_stack.cli.flags import (
    add_decoding_flags,
    add_model_flags,
    decoding_from_args,
    load_from_args,
    setup_logging,
    template_from_args,
)
from sft_stack.cli.harness import (
    add_harness_flags,
    check_tasks,
    harness_summary,
    log_benchmarks,
    run_tasks,
    write_samples,
)
from sft_stack.common.errors import user_error
from tracking.records import log_evaluation
from trainer.answers import is_exact_match, score_generations
from trainer.data import open_checked_split, pad_id_for
from trainer.generation import GenerateError, generate_rows, json_lines, read_prompts
from trainer.harness import HarnessResult
from trainer.inference import Loaded
from trainer.loss import evaluate_loss

log = logging.getLogger(__name__)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows with string ``output`` and ``reference`` (``generate --out`` files with references)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: predictions file not found")
    rows = []
    for where, row in json_lines(path, path.read_text(encoding="utf-8")):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("output", "reference")):
            raise GenerateError(f"{where}: expected an object with string 'output' and 'reference'")
        rows.append(row)
    if not rows:
        raise GenerateError(f"{path}: no rows")
    return rows


def score_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics over rows that have a reference, and the rows with a per-row ``exact_match`` flag added."""
    scored = [r for r in rows if isinstance(r.get("reference"), str)]
    if not scored:
        raise GenerateError("no row has a 'reference'; generation metrics need references")
    metrics = score_generations([r["output"] for r in scored], [r["reference"] for r in scored])
    flagged = [
        {**r, "exact_match": is_exact_match(r["output"], r["reference"])} if isinstance(r.get("reference"), str) else r
        for r in rows
    ]
    summary = dataclasses.asdict(metrics)
    stopped = [r["finish_reason"] == "stop" for r in rows if "finish_reason" in r]
    if stopped:
        # The share of outputs that ended at the template's end of turn: a model that never stops shows here.
        summary["stopped_fraction"] = sum(stopped) / len(stopped)
    return summary, flagged


def build_parser(prog: str = "python -m sft_stack.cli.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_flags(parser, required=False)
    parser.add_argument("--data", help="A prepared data directory (sft prepare) to score loss and perplexity on.")
    parser.add_argument("--split", default="val", help="The split of --data to score. Default: val.")
    parser.add_argument(
        "--batch-size", type=int, default=2, help="Rows per forward pass (loss), prompts per batch. Default: 2."
    )
    parser.add_argument(
        "--max-batches", type=int, default=0, help="Score only this many loss batches (0: all). Default: 0."
    )
    parser.add_argument("--no-verify", action="store_true", help="Skip re-hashing the split's shards.")
    parser.add_argument(
        "--prompts-file",
        help="Prompts with references to generate and score: JSON lines {prompt, reference} (GSM8K's own "
        "{question, answer} rows too) or a CSV with a prompt,output header.",
    )
    parser.add_argument(
        "--predictions", help="JSON lines with 'output' and 'reference' to score without a model (sft generate --out)."
    )
    add_decoding_flags(parser)
    add_harness_flags(parser)
    parser.add_argument("--out", default="eval_results.json", help="The results JSON file. Default: eval_results.json.")
    parser.add_argument(
        "--tracking-uri", help="Log to MLflow at this URI. Default: $MLFLOW_TRACKING_URI when --run-id is given."
    )
    parser.add_argument("--run-id", help="The MLflow run to add the eval metrics to (e.g. the training run).")
    parser.add_argument(
        "--experiment",
        default="sft-eval",
        help="The MLflow experiment of a new run (without --run-id). Default: sft-eval.",
    )
    parser.add_argument("--metric-prefix", default="eval", help="The MLflow metric and artifact prefix. Default: eval.")
    return parser


def run(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, HarnessResult]]:
    """Everything the CLI computes: (results, generated or scored rows, benchmark results by model)."""
    if args.compare and not args.tasks:
        raise GenerateError("--compare BASE runs the --tasks benchmarks on BASE too: pass --tasks")
    if not (args.data or args.prompts_file or args.predictions or args.tasks):
        raise GenerateError("nothing to evaluate: pass --data DIR, --prompts-file F, --predictions F and/or --tasks T")
    if (args.data or args.prompts_file or args.tasks) and not args.model:
        raise GenerateError("--data, --prompts-file and --tasks need --model")
    if args.prompts_file and args.predictions:
        raise GenerateError("pass --prompts-file or --predictions, not both")
    results: dict[str, Any] = {"model": args.model, "adapter": args.adapter}
    rows: list[dict[str, Any]] | None = None
    harness: dict[str, HarnessResult] = {}
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    tasks = check_tasks(args) if args.tasks else []
    if args.model and (args.data or args.prompts_file or args.tasks):
        loaded = load_from_args(args)
        results |= {"model": str(loaded.model_dir), "adapter": loaded.adapter_dir and str(loaded.adapter_dir)}
        if args.data:
            results["loss"] = score_loss(loaded, args)
        if prompts is not None:
            rows = generate_for_scoring(loaded, prompts, args, results)
        if args.tasks:
            harness = run_tasks(loaded, args, tasks)
            results["harness"] = harness_summary(harness)
    if args.predictions:
        rows = read_predictions(args.predictions)
    if rows is not None:
        summary, rows = score_rows(rows)
        results["generation"] = {"file": args.prompts_file or args.predictions, **summary}
        log.info("generation: %s", json.dumps(summary))
    return results, rows, harness


def score_loss(loaded: Loaded, args: argparse.Namespace) -> dict[str, Any]:
    """The split's loss and perplexity, refusing data prepared with another tokenizer."""
    split, packed = open_checked_split(
        args.data, args.split, loaded.tokenizer, loaded.model_dir, verify=not args.no_verify
    )
    loss = evaluate_loss(
        loaded.model,
        split,
        packed=packed,
        pad_id=pad_id_for(loaded.tokenizer),
        batch_size=args.batch_size,
        max_batches=args.max_batches,
    )
    log.info(
        "%s/%s: loss %.4f, perplexity %.3f over %d tokens",
        args.data,
        args.split,
        loss.loss,
        loss.perplexity,
        loss.loss_tokens,
    )
    return {"data": str(args.data), "split": args.split, **dataclasses.asdict(loss)}


def generate_for_scoring(
    loaded: Loaded, prompts: list[dict[str, str]], args: argparse.Namespace, results: dict[str, Any]
) -> list[dict[str, Any]]:
    """Generate for every prompt with the training template; records template and decoding in ``results``."""
    choice = template_from_args(loaded, args)
    log.info("template: %s (from %s)", choice.template.name, choice.source)
    decoding = decoding_from_args(args)
    rows = generate_rows(
        loaded.model,
        loaded.tokenizer,
        choice.template,
        prompts,
        decoding,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
    )
    results["template"] = choice.template.name
    results["decoding"] = {**dataclasses.asdict(decoding), "preset": args.preset, "seed": args.seed}
    return rows


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging()
    try:
        results, rows, harness = run(args)
    except (GenerateError, DataError) as exc:
        return user_error(str(exc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        generations = out.with_name(out.stem + ".generations.jsonl")
        generations.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        results["generations_file"] = str(generations)
    for label, path in write_samples(harness, out).items():
        results["harness"][label]["samples_file"] = str(path)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    run_id = args.run_id
    if (args.tracking_uri or args.run_id) and harness:
        run_id = log_benchmarks(harness, args)
        print(f"logged benchmarks to MLflow run {run_id}", file=sys.stderr)
    if (args.tracking_uri or args.run_id) and (args.data or args.prompts_file or args.predictions):
        run_id = log_evaluation(
            results,
            rows,
            tracking_uri=args.tracking_uri,
            run_id=run_id,
            experiment=args.experiment,
            prefix=args.metric_prefix,
        )
        print(f"logged to MLflow run {run_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
