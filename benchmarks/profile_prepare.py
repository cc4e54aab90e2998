"""Where ``prepare``'s time goes, stage by stage, for one worker on one core; prints one JSON object.

    python benchmarks/profile_prepare.py CORPUS.jsonl TOKENIZER_DIR [--template default] [--max-seq-len 2048]

It runs the pipeline's own functions in order (``prepare.process_block``'s steps, serially, in this process) and
charges the CPU time (``time.process_time``: this process, the tokenizer included, which runs on the calling thread
with TOKENIZERS_PARALLELISM=false) of each call to a stage:

- ``start_up``: importing data_pipeline, loading the tokenizer, the plan (hashing the sources), opening OUT;
- ``reading``: the main process reading lines and cutting blocks;
- ``transfer``: a block's records to a worker and back into records (wire form + pickle), what --workers >= 2 adds;
- ``parsing``: JSON lines into Conversations (checks included);
- ``rendering``: the chat template's layout of each conversation;
- ``tokenizer``: the Rust tokenizer's batch encode, ids into Python lists included;
- ``labels``: assembling ids and labels arrays, length fitting;
- ``routing``: the split hash, rejects file, counts;
- ``packing``: best-fit bins, concatenation, position ids;
- ``writing``: Arrow shards (fsync included), completion records, split metadata and manifest.

bench_prepare.py runs it as its ``profile`` child job; RESULTS.md holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = (
    "start_up",
    "reading",
    "transfer",
    "parsing",
    "rendering",
    "tokenizer",
    "labels",
    "routing",
    "packing",
    "writing",
)


def _charged(spent: Counter[str], stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, with the CPU time of each call added to ``spent[stage]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[stage] += time.process_time() - start

    return timed


def profile(corpus: Path, tokenizer_dir: Path, out: Path, template: str, max_seq_len: int) -> dict[str, Any]:
    """CPU seconds per stage of ``prepare`` with one worker (packing on), and the tokens written."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    spent: Counter[str] = Counter()
    start, wall = time.process_time(), time.perf_counter()
    import data_pipeline.prepare as prepare
    from data_pipeline.formats import Line, convert_line
    from data_pipeline.pool import WorkerState
    from data_pipeline.wire import from_wire, to_wire

    options = prepare.PrepareOptions(
        sources=(prepare.SourceSpec(path=str(corpus)),),
        tokenizer=str(tokenizer_dir),
        out=str(out),
        template=template,
        max_seq_len=max_seq_len,
        pack=True,
        val_fraction=0.01,
        max_bad_fraction=1.0,
        max_dropped_fraction=1.0,
        progress=False,
    )
    plan, templates = prepare.make_plan(options, prepare.load_tokenizer(options.tokenizer))
    prepare.open_out(out, plan)
    state = WorkerState(plan=plan, templates=templates, out=out)
    spent["start_up"] = time.process_time() - start
    startup_wall = time.perf_counter() - wall

    for chat in templates.values():
        chat._renderer.render = _charged(spent, "rendering", chat._renderer.render)  # type: ignore[method-assign]
        chat._encoder.encode = _charged(spent, "tokenizer", chat._encoder.encode)  # type: ignore[method-assign]
    write_shard = prepare.write_shard
    prepare.write_shard = _charged(spent, "writing", write_shard)  # type: ignore[assignment]
    blocks = _charged(spent, "reading", next)
    samples = prepare._blocks(prepare.iter_samples(plan), options.block_size)
    tokens, index = 0, 0
    try:
        while (block := blocks(samples, None)) is not None:
            block = _charged(spent, "transfer", lambda b: from_wire(pickle.loads(pickle.dumps(to_wire(b)))))(block)
            parse = _charged(
                spent, "parsing", lambda b: [(p, convert_line(r) if isinstance(r, Line) else r) for p, r in b]
            )
            records = parse(block)
            encoded = _charged(spent, "labels", prepare.encode)(plan, templates, records)
            positions = [position for position, _ in records]
            routed = _charged(spent, "routing", prepare._route)(state, index, positions, encoded)
            for split, sequences in routed.per_split.items():
                path = out / split / f"data-{index:05d}.arrow"
                written = _charged(spent, "packing", prepare._write_split)(
                    state, path, sequences, routed.samples[split]
                )
                tokens += written.tokens
            index += 1
    finally:
        prepare.write_shard = write_shard  # type: ignore[assignment]
    spent["labels"] -= spent["rendering"] + spent["tokenizer"]
    spent["packing"] -= spent["writing"]
    total = sum(spent.values())
    return {
        "tokens": tokens,
        "cpu_s": round(total, 3),
        "start_up_wall_s": round(startup_wall, 3),
        "stages_cpu_s": {stage: round(spent[stage], 3) for stage in STAGES},
        "stages_share": {stage: round(spent[stage] / total, 4) for stage in STAGES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("--template", default="default")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="profile_prepare_")) / "out"
    try:
        report = profile(args.corpus, args.tokenizer_dir, out, args.template, args.max_seq_len)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
