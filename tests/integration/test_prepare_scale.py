"""Multi-process prepare: byte-identical output for any worker count, and a killed run that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare
from tests.helpers.data import BELLE, FIREFLY_MOSS_FLAT, REPO, TINY_LLAMA


def _tree(out: Path) -> dict[str, bytes]:
    """Every output file's bytes (train/, val/, rejects.jsonl), the manifest without its timings."""
    files = {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".blocks" not in p.parts and p.name != "manifest.json"
    }
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("timings")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def _run(out: Path, *extra: Path, **kw: Any) -> None:
    options = PrepareOptions(
        sources=tuple(SourceSpec(path=str(p)) for p in (BELLE, FIREFLY_MOSS_FLAT, *extra)),
        tokenizer=str(TINY_LLAMA),
        out=str(out),
        max_seq_len=512,
        pack=True,
        val_fraction=0.1,
        max_bad_fraction=0.05,
        block_size=128,
        progress=False,
        **kw,
    )
    prepare(options)


@pytest.mark.slow
def test_one_and_two_workers_write_identical_bytes(tmp_path: Path) -> None:
    # A source with a malformed line and a text record: every kind of record crosses to the workers.
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "plain text for pre-training"}\n{broken\n{"text": "more text"}\n', encoding="utf-8")
    _run(tmp_path / "w1", odd, workers=1)
    _run(tmp_path / "w2", odd, workers=2)
    one, two = _tree(tmp_path / "w1"), _tree(tmp_path / "w2")
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name] == two[name], name
    assert len([n for n in one if n.endswith(".arrow")]) >= 16  # 8+ blocks, train and val each
    rejects = one["rejects.jsonl"].decode().splitlines()
    assert any('"malformed_json"' in line for line in rejects)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path: Path) -> None:
    config = tmp_path / "prep.yaml"
    out = tmp_path / "out"
    # weight 4: 4,000 BELLE samples in 80 blocks of 50, long enough to be killed in the middle.
    config.write_text(
        f"sources:\n  - path: {BELLE}\n    weight: 4\ntokenizer: {TINY_LLAMA}\nout: {out}\n"
        "max_seq_len: 512\npack: true\nval_fraction: 0.1\nblock_size: 50\nmax_bad_fraction: 0.05\n",
        encoding="utf-8",
    )
    command = [sys.executable, "-m", "data_pipeline", "prepare", "--config", str(config), "--no-track", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / ".blocks" / "00005.json").exists():
        assert process.poll() is None, "prepare ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill; nothing was resumed"
    finished = sorted(p.name for p in (out / ".blocks").glob("0*.json"))
    assert 6 <= len(finished) < 80

    subprocess.run([*command[:-1], "--no-progress"], cwd=REPO, check=True, timeout=600, stderr=subprocess.DEVNULL)
    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference)], cwd=REPO, check=True, timeout=600, stderr=subprocess.DEVNULL)
    assert _tree(out) == _tree(reference)
