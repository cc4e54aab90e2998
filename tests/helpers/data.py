"""Prepared data directories for tests: ``make_prepared_dir`` runs the real ``prepare`` on a small corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare

REPO = Path(__file__).resolve().parents[2]
TINY_LLAMA = REPO / "tests" / "fixtures" / "tiny_llama"
"""2-layer Llama config + the tiny byte-level BPE tokenizer (vocab 2000)."""
REAL = REPO / "tests" / "fixtures" / "real"
BELLE = REAL / "belle" / "Belle_open_source_1k.json"
ALPACA = REAL / "alpaca" / "alpaca_en_demo.json"
FIREFLY_MOSS_FLAT = REAL / "firefly_moss_flat" / "dummy_data.jsonl"
MOSS_003 = REAL / "moss_003"


def arithmetic_conversations(n: int = 200, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` short, deterministic, learnable conversations in ``messages`` format (some multi-turn, some Chinese)."""
    records = []
    for i in range(n):
        a, b = (i * 7 + seed) % 50, (i * 13 + 3 * seed) % 50
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?" if i % 3 else f"{a} 加 {b} 等于多少？"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        if i % 4 == 0:
            messages += [
                {"role": "user", "content": f"And {a} - {b}?"},
                {"role": "assistant", "content": f"{a} - {b} = {a - b}."},
            ]
        records.append({"messages": messages})
    return records


def prepare_argv(source: Path, out: Path, *extra: str) -> list[str]:
    """``prepare`` on the command line (``data_pipeline.cli.main``'s argv): ``source`` with the tiny tokenizer into
    ``out``, no progress bar, then ``extra``."""
    return [
        *("prepare", "--source", str(source), "--tokenizer", str(TINY_LLAMA), "--out", str(out), "--no-progress"),
        *extra,
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_prepared_dir(
    out: Path,
    *,
    pack: bool = False,
    max_seq_len: int = 128,
    source: Path | None = None,
    tokenizer_dir: Path = TINY_LLAMA,
    val_fraction: float = 0.1,
    **kw: Any,
) -> Path:
    """Run ``prepare`` into ``out`` and return it; a prepared dir the trainer reads (manifest.json, train/, val/).

    Without ``source``, 200 arithmetic conversations (``arithmetic_conversations``) are written beside ``out``
    (``<out>_source.jsonl``). ``kw`` goes to PrepareOptions (e.g. ``template="qwen"``, ``max_bad_fraction=1.0``).
    """
    out = Path(out)
    if source is None:
        source = write_jsonl(out.with_name(out.name + "_source.jsonl"), arithmetic_conversations())
    kw.setdefault("progress", False)
    options = PrepareOptions(
        sources=(SourceSpec(path=str(source)),),
        tokenizer=str(tokenizer_dir),
        out=str(out),
        pack=pack,
        max_seq_len=max_seq_len,
        val_fraction=val_fraction,
        **kw,
    )
    prepare(options)
    return out
