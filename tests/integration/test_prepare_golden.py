"""prepare's output is byte-for-byte what it was before the speed work (issue 22): golden digests.

Each case runs ``prepare`` on real corpora (tests/fixtures/real) with a template, worker count and packing choice;
its digest covers every output file (shards, split metadata, rejects, block records) and the manifest less what
names this machine (paths, timings). The digests were computed from main at 7a60db5, before any change to the
pipeline; ``python -m tests.integration.test_prepare_golden`` prints the current ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from data_pipeline.schema import MANIFEST_FILE
from tests.helpers.data import ALPACA, BELLE, FIREFLY_MOSS_FLAT, MOSS_003, REAL, REPO, TINY_LLAMA

GLAIVE = REAL / "toolcall" / "glaive_toolcall_zh_demo.json"
LLAMA2 = REPO / "tests" / "fixtures" / "tokenizers" / "llama2_sentencepiece"

CASES: dict[str, dict[str, Any]] = {
    "belle_default_w1": {"sources": [BELLE], "template": "default", "max_seq_len": 512, "block_size": 256},
    "belle_default_pack_w2": {
        "sources": [BELLE],
        "template": "default",
        "max_seq_len": 512,
        "pack": True,
        "workers": 2,
        "block_size": 300,
    },
    "mixed_qwen_pack_w1": {
        "sources": [ALPACA, FIREFLY_MOSS_FLAT, GLAIVE],
        "template": "qwen",
        "max_seq_len": 1024,
        "pack": True,
        "block_size": 200,
        "last_turn_only": True,
    },
    "moss_truncate_w2": {
        "sources": [SourceSpec(path=str(MOSS_003), template="moss"), FIREFLY_MOSS_FLAT],
        "max_seq_len": 600,
        "overlong": "truncate",
        "workers": 2,
        "block_size": 4,
    },
    "belle_llama2_sp_pack_w2": {
        "sources": [BELLE, ALPACA],
        "tokenizer": str(LLAMA2),
        "template": "llama2",
        "max_seq_len": 1024,
        "pack": True,
        "workers": 2,
        "block_size": 512,
    },
}

GOLDEN = {
    "belle_default_w1": "196b524fd2fb0bb12a87221ff68af935ce885a2bfac1c1123c6a5febe357328b",
    "belle_default_pack_w2": "54b8d5c6a27a4367179b2fa8ff749a780d0e3f9819c41254835c35c292e38d1d",
    "mixed_qwen_pack_w1": "1112c32b406883cd21d164066fc46de65e1186b26cd2270b4e8ee1fe8389a482",
    "moss_truncate_w2": "6061a86aa7ca3c086f6309c16ceb8a2559ebc92d658f17b5b6b3b87dd2778688",
    "belle_llama2_sp_pack_w2": "354f96297c372e551dbdb4117d3ef21093f8134f706fb098f1cc56fa9afae1de",
}


def run_case(name: str, out: Path) -> None:
    case = dict(CASES[name])
    sources = tuple(s if isinstance(s, SourceSpec) else SourceSpec(path=str(s)) for s in case.pop("sources"))
    case.setdefault("tokenizer", str(TINY_LLAMA))
    case.setdefault("val_fraction", 0.1)
    prepare(
        PrepareOptions(
            sources=sources, out=str(out), progress=False, max_bad_fraction=1.0, max_dropped_fraction=1.0, **case
        )
    )


def output_digest(out: Path) -> str:
    """sha256 over every output file's path and bytes; the manifest and plan less paths and timings."""
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        body = path.read_bytes()
        if relative == MANIFEST_FILE:
            body = _portable(json.loads(body), ("timings", "tokenizer_path"))
        elif relative == ".blocks/plan.json":
            body = _portable(json.loads(body), ("tokenizer_path",))
        digest.update(relative.encode() + b"\0" + hashlib.sha256(body).digest())
    return digest.hexdigest()


def _portable(raw: dict[str, Any], drop: tuple[str, ...]) -> bytes:
    """The JSON without the keys in ``drop`` and with every path (sources, specs, tokenizer) cut to its name."""
    for key in drop:
        raw.pop(key, None)
    for entry in [*raw.get("sources", []), *raw.get("specs", []), *raw.get("options", {}).get("sources", [])]:
        entry["path"] = Path(entry["path"]).name
    if "tokenizer" in raw.get("options", {}):
        raw["options"]["tokenizer"] = Path(raw["options"]["tokenizer"]).name
    return json.dumps(raw, sort_keys=True).encode()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_output_matches_golden_digest(tmp_path: Path, name: str) -> None:
    run_case(name, tmp_path / "out")
    assert output_digest(tmp_path / "out") == GOLDEN[name]


if __name__ == "__main__":
    for case in sys.argv[1:] or sorted(CASES):
        with tempfile.TemporaryDirectory() as work:
            run_case(case, Path(work) / "out")
            print(f'    "{case}": "{output_digest(Path(work) / "out")}",')
