"""Names and totals read from disk are checked: a shard name that leaves its folder (in a manifest or in a partial's
block record), a split whose rows are not its shards' sum, a split without shards, and a manifest that is not UTF-8
or whose ``splits`` is a list each end ``verify``/``merge``/the loader in one line, with nothing read or written
outside the output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data_pipeline.cli import main
from data_pipeline.prepare import BLOCKS_DIR
from data_pipeline.schema import DataError, is_plain_file_name, load_manifest, load_split
from sft_stack.common.errors import FAILURE, USER_ERROR
from tests.helpers.data import arithmetic_conversations, prepare_argv, write_jsonl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("names")
    source = write_jsonl(tmp / "src.jsonl", arithmetic_conversations(60))
    out = tmp / "out"
    assert main(prepare_argv(source, out, "--no-track", "--block-size", "20", "--max-seq-len", "128")) == 0
    return out


def edited_copy(prepared: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    raw = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (out / "manifest.json").write_text(json.dumps(edit(raw) or raw), encoding="utf-8")
    return out


def verify_error(out: Path, capsys: pytest.CaptureFixture[str], code: int = FAILURE) -> str:
    """The one line ``verify`` prints. Exit 1 (FAILURE) when the shards no longer match what the manifest
    claims; 2 (USER_ERROR) when the manifest itself cannot be used (README, "Exit status and errors")."""
    assert main(["verify", str(out)]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_plain_file_names() -> None:
    assert is_plain_file_name("data-00000.arrow")
    for bad in ("../x.arrow", "/etc/passwd", "a/b.arrow", "..", ".", "", "a\\b", "a\0b", 3, None):
        assert not is_plain_file_name(bad), bad


@pytest.mark.parametrize("name", ["../../outside.arrow", "/tmp/outside.arrow", "sub/x.arrow", ".."])
def test_a_manifest_shard_name_outside_its_folder_is_refused(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    def plant(raw: dict[str, Any]) -> None:
        raw["splits"]["train"]["shards"][0]["file"] = name

    out = edited_copy(prepared, tmp_path, plant)
    line = verify_error(out, capsys, USER_ERROR)
    assert "manifest.json" in line and repr(name) in line and "not a plain file name" in line
    with pytest.raises(DataError, match="not a plain file name"):
        load_split(out, "train")


def test_verify_checks_split_totals_and_refuses_a_split_without_shards(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def inflate(raw: dict[str, Any]) -> None:
        raw["splits"]["train"]["rows"] = 99_999

    line = verify_error(edited_copy(prepared, tmp_path / "a", inflate), capsys)
    assert "claims 99999 rows" in line and "'train'" in line

    def empty(raw: dict[str, Any]) -> None:
        raw["splits"]["val"]["shards"] = []
        raw["splits"]["val"]["rows"] = 0

    line = verify_error(edited_copy(prepared, tmp_path / "b", empty), capsys)
    assert "'val' lists no shards" in line


def test_malformed_manifests_are_one_line(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = edited_copy(prepared, tmp_path / "list", lambda raw: {**raw, "splits": list(raw["splits"].values())})
    line = verify_error(out, capsys, USER_ERROR)
    assert "'splits' is list" in line and "manifest.json" in line

    out = tmp_path / "latin1"
    shutil.copytree(prepared, out)
    (out / "manifest.json").write_bytes(b'{"schema_version": 1, "template": "caf\xe9"}')
    line = verify_error(out, capsys, USER_ERROR)
    assert "unreadable manifest" in line and "utf-8" in line.lower()


def test_merge_refuses_a_block_record_naming_a_shard_outside_the_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_jsonl(tmp_path / "src.jsonl", arithmetic_conversations(40))
    parts = []
    for index in range(2):
        part = tmp_path / f"part{index}"
        extra = ["--block-size", "10", "--num-tasks", "2", "--task-index", str(index), "--max-seq-len", "128"]
        assert main(prepare_argv(source, part, "--no-track", *extra)) == 0
        parts.append(part)
    # The crafted record: block 1 (task 1) names a shard two folders up, which merge would have linked outside --out.
    record_path = parts[1] / BLOCKS_DIR / "00001.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["splits"]["train"]["shard"]["file"] = "../../outside.arrow"
    record_path.write_text(json.dumps(record), encoding="utf-8")
    shutil.copy(parts[1] / "train" / "data-00001.arrow", tmp_path / "outside.arrow")
    merged = tmp_path / "deep" / "merged"
    assert main(["merge", *map(str, parts), "--out", str(merged), "--no-track"]) == USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "block 1" in lines[0] and "outside its folder" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "outside.arrow", "part0", "part1", "src.jsonl"]
    assert not (tmp_path / "deep" / "outside.arrow").exists()
    assert load_manifest(parts[0]).splits["train"].shards  # the good partial is untouched
