"""Evaluate a trained model: loss and perplexity on a prepared split, and generation metrics on references.

    python -m trainer.evaluate --model OUT/final --data DATA --split val --out eval.json
    python -m trainer.evaluate --model OUT/final --prompts-file gsm8k_test.jsonl --out eval.json
    python -m trainer.evaluate --predictions gen.jsonl --out eval.json            # score `generate --out` rows
    python -m trainer.evaluate ... --tracking-uri sqlite:///mlflow.db --run-id RUN   # also log to MLflow
    python -m trainer.evaluate --predictions gen.jsonl --run-id RUN --metric-prefix before  # before/* metrics

Loss is token-weighted: summed next-token cross-entropy over every label that is not IGNORE_INDEX, divided
by the number of such labels (not a mean of per-batch means), exactly as the training loop's val loss.
Generation metrics (trainer/answers.py): exact match of the final answer, sacrebleu corpus BLEU and mean
ROUGE-L F, CJK scored per character. Results go to a JSON file; generated rows (with a per-row exact-match
flag) go next to it as ``<out stem>.generations.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from data_pipeline.schema import IGNORE_INDEX, DataError, load_manifest, load_split, tokenizer_fingerprint, verify_split
from tracking.records import log_evaluation
from trainer.answers import is_exact_match, score_generations
from trainer.generate import (
    PRESETS,
    GenerateError,
    decoding_for,
    generate_rows,
    json_lines,
    load_from_args,
    model_device,
    read_prompts,
    resolve_run_template,
    setup_logging,
)

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LossResult:
    loss: float
    """Summed cross-entropy / loss_tokens (nats per token)."""
    perplexity: float
    """exp(loss); inf when loss >= 50."""
    loss_tokens: int
    """Tokens scored: labels that are not IGNORE_INDEX, the first token of each sample excluded."""
    rows: int
    """Rows of the split evaluated (packed rows count once)."""


@torch.no_grad()
def evaluate_loss(
    model: Any, rows: datasets.Dataset, *, packed: bool, pad_id: int, batch_size: int = 2, max_batches: int = 0
) -> LossResult:
    """Token-weighted loss of ``model`` over prepared ``rows``; batches are built like the training loop's."""
    from trainer.data import val_batches
    from trainer.families import resolve_family
    from trainer.metrics import perplexity

    isolate = resolve_family("auto", getattr(model.config, "model_type", "")).supports_packed_positions
    batches = val_batches(
        rows,
        packed=packed,
        isolate=isolate,
        pad_id=pad_id,
        micro_batch_size=batch_size,
        rank=0,
        world_size=1,
        max_batches=max_batches,
    )
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        logits = model(**batch.model_inputs(device), use_cache=False).logits
        labels = batch.labels.to(device)
        # Row by row: fp32 logits of a whole batch (rows x length x vocab) can be gigabytes for big vocabularies.
        for i in range(logits.shape[0]):
            total += (
                F.cross_entropy(logits[i, :-1].float(), labels[i, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
                .double()
                .cpu()
            )
        tokens += batch.loss_tokens
    if tokens == 0:
        raise DataError("the split has no loss tokens (every label is IGNORE_INDEX); nothing to evaluate")
    loss = float(total) / tokens
    used = len(rows) if max_batches <= 0 else min(len(rows), max_batches * batch_size)
    return LossResult(loss=loss, perplexity=perplexity(loss), loss_tokens=tokens, rows=used)


def open_eval_split(data_dir: str | Path, split: str, tokenizer: Any, *, verify: bool = True) -> tuple[Any, bool]:
    """(rows, packed) of a prepared split, refusing a tokenizer or shard mismatch in one line."""
    manifest = load_manifest(data_dir)
    where = Path(data_dir) / "manifest.json"
    if manifest.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        raise DataError(
            f"{where}: prepared with another tokenizer ({manifest.tokenizer_path}); the model's token ids would "
            "not match. Re-run prepare with the model's tokenizer"
        )
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise DataError(f"{where}: no {split!r} split (has {', '.join(manifest.splits)}); prepare with --val-fraction")
    if verify:
        problems = verify_split(data_dir, split, manifest)
        if problems:
            raise DataError("; ".join(problems))
    return load_split(data_dir, split, manifest), manifest.packed


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model directory, or an exported adapter directory")
    parser.add_argument("--adapter", help="PEFT adapter directory to load on top of --model")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the weights after loading")
    parser.add_argument("--data", help="prepared data directory (python -m data_pipeline prepare) for loss/ppl")
    parser.add_argument("--split", default="val", help="split of --data to score (default val)")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per forward pass (loss) / prompts per batch")
    parser.add_argument("--max-batches", type=int, default=0, help="score only this many loss batches (0: all)")
    parser.add_argument("--no-verify", action="store_true", help="skip re-hashing the split's shards")
    parser.add_argument("--prompts-file", help="prompts with references (JSON lines or CSV) to generate and score")
    parser.add_argument("--predictions", help="JSON lines with 'output' and 'reference' to score without a model")
    parser.add_argument("--template", help="chat template name; overrides what the export/manifest recorded")
    parser.add_argument("--preset", default="greedy", choices=list(PRESETS))
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="eval_results.json", help="results JSON (default eval_results.json)")
    parser.add_argument("--tracking-uri", help="log to MLflow at this URI (else $MLFLOW_TRACKING_URI with --run-id)")
    parser.add_argument("--run-id", help="MLflow run to add the eval metrics to (e.g. the training run)")
    parser.add_argument("--experiment", default="sft-eval", help="MLflow experiment for a new run (no --run-id)")
    parser.add_argument("--metric-prefix", default="eval", help="MLflow metric and artifact prefix (default eval)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in NF4 as QLoRA training did")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own modeling code")
    return parser


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Everything the CLI computes: (results, generated or scored rows)."""
    if not (args.data or args.prompts_file or args.predictions):
        raise GenerateError("nothing to evaluate: pass --data DIR, --prompts-file F and/or --predictions F")
    if (args.data or args.prompts_file) and not args.model:
        raise GenerateError("--data and --prompts-file need --model")
    results: dict[str, Any] = {"model": args.model, "adapter": args.adapter}
    rows: list[dict[str, Any]] | None = None
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    if args.model and (args.data or args.prompts_file):
        loaded = load_from_args(args)
        results |= {"model": str(loaded.model_dir), "adapter": loaded.adapter_dir and str(loaded.adapter_dir)}
        if args.data:
            split, packed = open_eval_split(args.data, args.split, loaded.tokenizer, verify=not args.no_verify)
            pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
            loss = evaluate_loss(
                loaded.model,
                split,
                packed=packed,
                pad_id=pad_id,
                batch_size=args.batch_size,
                max_batches=args.max_batches,
            )
            results["loss"] = {"data": str(args.data), "split": args.split, **dataclasses.asdict(loss)}
            log.info(
                "%s/%s: loss %.4f, perplexity %.3f over %d tokens",
                args.data,
                args.split,
                loss.loss,
                loss.perplexity,
                loss.loss_tokens,
            )
        if prompts is not None:
            choice = resolve_run_template(
                loaded.tokenizer,
                model_dir=loaded.model_dir,
                adapter_dir=loaded.adapter_dir,
                data_dir=args.data,
                name=args.template,
            )
            log.info("template: %s (from %s)", choice.template.name, choice.source)
            decoding = decoding_for(args.preset, max_new_tokens=args.max_new_tokens)
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
    if args.predictions:
        if rows is not None:
            raise GenerateError("pass --prompts-file or --predictions, not both")
        rows = read_predictions(args.predictions)
    if rows is not None:
        summary, rows = score_rows(rows)
        results["generation"] = {"file": args.prompts_file or args.predictions, **summary}
        log.info("generation: %s", json.dumps(summary))
    return results, rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        results, rows = run(args)
    except (GenerateError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        generations = out.with_name(out.stem + ".generations.jsonl")
        generations.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        results["generations_file"] = str(generations)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    if args.tracking_uri or args.run_id:
        run_id = log_evaluation(
            results,
            rows,
            tracking_uri=args.tracking_uri,
            run_id=args.run_id,
            experiment=args.experiment,
            prefix=args.metric_prefix,
        )
        print(f"logged to MLflow run {run_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
