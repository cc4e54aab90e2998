"""The CLI: prepare from flags and YAML, inspect, verify, merge, and one clear line for each user error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.inspect import render_row
from data_pipeline.schema import IGNORE_INDEX, load_manifest
from tests.helpers.data import (
    BELLE,
    FIREFLY_MOSS_FLAT,
    REPO,
    TINY_LLAMA,
    arithmetic_conversations,
    prepare_argv,
    write_jsonl,
)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "packed"
    assert main(prepare_argv(BELLE, out, "--max-seq-len", "512", "--pack", "--val-fraction", "0.1")) == 0
    return out


def test_prepare_prints_summary(packed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = load_manifest(packed)
    assert manifest.packed and manifest.max_seq_len == 512
    assert manifest.options["val_fraction"] == 0.1


def test_inspect_marks_trained_spans_and_sample_boundaries(packed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = load_manifest(packed).splits["train"].rows - 1  # best-fit decreasing: the last rows hold many samples
    assert main(["inspect", str(packed), "--index", str(last)]) == 0
    text = capsys.readouterr().out
    assert "samples: read 1000, written" in text
    assert "packing efficiency 0.9" in text
    assert f"train row {last}" in text
    assert "--- sample 0 of " in text and "--- sample 1 of " in text  # a packed row shows its samples
    assert "[[" in text and "]]" in text and "\x1b[" not in text  # brackets, not colour, off a terminal
    assert "### Assistant:\n[[" in text  # the trained span starts right after the assistant header
    assert main(["inspect", str(packed), "--split", "val", "--index", "99999"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_render_row_exact() -> None:
    text = render_row(
        [1, 2, 3, 4, 5, 6],
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX, 6],
        [0, 1, 2, 0, 1, 2],
        lambda ids: "".join(chr(ord("a") + i) for i in ids),
        False,
    )
    assert text.splitlines() == [
        "--- sample 0 of 2: tokens 0..2 (3 tokens, 2 trained) ---",
        "b[[cd]]",
        "--- sample 1 of 2: tokens 3..5 (3 tokens, 1 trained) ---",
        "ef[[g]]",
    ]
    coloured = render_row([1, 2], [IGNORE_INDEX, 2], [0, 1], lambda ids: "x" * len(ids), True)
    assert "\x1b[1;32mx\x1b[0m" in coloured


def test_verify_passes_then_catches_a_flipped_byte(
    tmp_path: Path, packed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    assert main(prepare_argv(BELLE, out, "--max-seq-len", "512", "--pack", "--val-fraction", "0.1")) == 0
    assert main(["verify", str(out)]) == 0
    assert "match the manifest" in capsys.readouterr().out
    shard = out / "val" / load_manifest(out).splits["val"].shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "sha256" in err[0]


def test_yaml_config_with_per_source_options(tmp_path: Path) -> None:
    messages = write_jsonl(tmp_path / "m.jsonl", arithmetic_conversations(30))
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"""
sources:
  - path: {BELLE}
    format: alpaca
    samples: 100
  - path: {messages}
    weight: 2
  - {FIREFLY_MOSS_FLAT}
tokenizer: {TINY_LLAMA}
out: {tmp_path / "out"}
max_seq_len: 256
val_fraction: 0.0
max_bad_fraction: 0.5
pack: true
""",
        encoding="utf-8",
    )
    assert main(["prepare", "--config", str(config), "--max-seq-len", "1024", "--no-progress", "--no-track"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest.max_seq_len == 1024  # the flag overrides the YAML
    assert manifest.packed
    assert [s.records for s in manifest.sources] == [100, 60, 33]
    assert [s.format for s in manifest.sources] == ["alpaca", "messages", "conversation"]


def test_merge_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parts = []
    for index in range(2):
        part = tmp_path / f"part{index}"
        args = prepare_argv(BELLE, part, "--block-size", "300", "--num-tasks", "2", "--task-index", str(index))
        assert main([*args, "--max-seq-len", "512"]) == 0
        parts.append(str(part))
    assert main(["merge", *parts, "--out", str(tmp_path / "merged"), "--no-track"]) == 0
    assert load_manifest(tmp_path / "merged").counts["samples_read"] == 1000
    assert main(["verify", str(tmp_path / "merged")]) == 0


def _bad_tokenizer(tmp: Path) -> Path:
    directory = tmp / "broken_tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("{not a tokenizer", encoding="utf-8")
    return directory


ERROR_CASES = {
    "missing_source": (["--source", "nope.jsonl"], "nope.jsonl"),
    "unknown_format": (["--format", "parquet"], "parquet"),
    "tokenizer_not_a_dir": (["--tokenizer", "no/such/dir"], "no/such/dir"),
    "tokenizer_does_not_load": (["--tokenizer", "BROKEN"], "does not load"),
    "unknown_template": (["--template", "gpt5"], "gpt5"),
    "template_does_not_fit": (["--template", "tokenizer"], "chat_template"),
    "bad_option_value": (["--val-fraction", "1.5"], "val_fraction"),
    "task_index_out_of_range": (["--num-tasks", "2", "--task-index", "2"], "task_index"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_are_one_line_before_any_work(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra, needle = ERROR_CASES[case]
    extra = [str(_bad_tokenizer(tmp_path)) if x == "BROKEN" else x for x in extra]
    out = tmp_path / "out"
    args = prepare_argv(BELLE, out)
    # The later flag wins for single-valued options; a second --source is appended (and is the bad one).
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sft: error: ") and needle in err[0]
    assert not out.exists()


def test_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"sources: [{BELLE}]\ntokenizer: {TINY_LLAMA}\nout: {tmp_path / 'o'}\nmax_len: 5\n")
    assert main(["prepare", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key(s) max_len" in err[0] and "max_seq_len" in err[0]
    assert main(["prepare", "--source", str(BELLE), "--tokenizer", str(TINY_LLAMA)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_too_many_rejects_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps(r) for r in arithmetic_conversations(10)] + ["{broken", "{broken again"]
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert main(prepare_argv(source, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 12 records rejected" in err[0] and "malformed_json 2" in err[0]
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 2


def test_module_entry_point_exit_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "verify", str(tmp_path / "absent")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2  # a user error (sft_stack/common/errors.py); 1 is kept for a failed verify
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("sft: error: ")
    assert "no manifest" in result.stderr
