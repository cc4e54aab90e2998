"""prepare's output is byte-for-byte what it was before the speed work (issue 22): golden digests.

Each case runs ``prepare`` on real corpora (tests/fixtures/real) with a template, worker count and packing choice;
its digest covers every output file (shards, split metadata, rejects, block records) and the manifest less what
names this machine (paths, timings). The digests were computed from main at 7a60db5, before any change to the
pipeline, in another checkout than the one they were first checked in (so nothing in them depends on where the
repository is); ``python -m tests.integration.test_prepare_golden`` prints the current ones.
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
    "belle_default_w1": "bb4655fccfd0995e011523043c13471f9b9b42a4bd4e398af9938a2c3ba0644d",
    "belle_default_pack_w2": "1a152e505494d434bd5f9c666a7e06a7631a953f32bf4aa0c3b6fbe48615ce12",
    "mixed_qwen_pack_w1": "6211a705ff4733450b5dc661d0ddcd57c0066a0500616ea00090fa6a647a9612",
    "moss_truncate_w2": "f5e75f2875e02212afd947c9b2f29ccaa476fda706422b7235c01de3c57abf9f",
    "belle_llama2_sp_pack_w2": "46bacf8ece4689ec2807d8fe9dd6d736a61d277f85ce3a7dc3c2bd6b565212cb",
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
    """sha256 over every output file's path and bytes, with what names the checkout left out: the repository's
    path becomes ``REPO`` (rejects name their source file), the manifest and plan lose paths and timings, and the
    plan's fingerprint (a hash over the sources' paths) is dropped where the plan and each block record keep it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = path.relative_to(out).as_posix()
        body = path.read_bytes().replace(str(REPO).encode(), b"REPO")
        if relative == MANIFEST_FILE:
            body = _portable(json.loads(body), ("timings", "tokenizer_path"))
        elif relative == ".blocks/plan.json":
            body = _portable(json.loads(body), ("tokenizer_path", "fingerprint"))
        elif relative.startswith(".blocks/") and relative.endswith(".json"):
            body = _portable(json.loads(body), ("plan",))
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
