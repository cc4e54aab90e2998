"""Checkpoint bookkeeping: what counts as complete, where `latest_complete` points, what is pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.checkpoint import (
    CheckpointError,
    TrainState,
    batch_change_note,
    checkpoints_dir,
    complete_tags,
    hash_files,
    latest_complete,
    prune,
    tag_for,
    universal_command,
    write_marker,
)
from trainer.config import dump_yaml, load_config
from trainer.data import DataCursor


def fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        write_marker(ckpt, hash_files(ckpt, ["mp_rank_00_model_states.pt"]), step=step, world_size=1, run_id=None)
    return ckpt


def test_state_round_trips_through_json() -> None:
    state = TrainState(step=7, cursor=DataCursor(epoch=2, position=16), tokens_seen=12345, world_size=2, run_id="abc")
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_latest_complete_and_pruning(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert latest_complete(tmp_path) is None  # fresh run
    for step in (2, 4, 6):
        fake_checkpoint(root, step, complete=True)
    fake_checkpoint(root, 3, complete=False)  # a crash mid-save, older than the newest complete one
    fake_checkpoint(root, 8, complete=False)  # a save in progress (or killed): never counted, never deleted here
    assert complete_tags(root) == ["step_00000002", "step_00000004", "step_00000006"]
    (root / "latest_complete").write_text("step_00000006\n")
    assert latest_complete(tmp_path) == "step_00000006"
    prune(root, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]


def test_pointer_to_an_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4, complete=False)
    (root / "latest_complete").write_text("step_00000004\n")
    with pytest.raises(CheckpointError, match="points at 'step_00000004', which is not a complete checkpoint"):
        latest_complete(tmp_path)


def test_universal_command_is_the_documented_converter(tmp_path: Path) -> None:
    command = universal_command(tmp_path, "step_00000004")
    assert command[1:3] == ["-m", "deepspeed.checkpoint.ds_to_universal"]
    assert command[-3:] == [
        str(tmp_path / "checkpoints" / "step_00000004"),
        "--output_folder",
        str(tmp_path / "checkpoints" / "universal" / "step_00000004"),
    ]


def test_resume_on_another_world_size_names_the_accumulation_that_keeps_the_global_batch(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    saved = load_config(root / "configs" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path}"])  # 4 x 2 accum
    ckpt = checkpoints_dir(tmp_path) / tag_for(3)
    ckpt.mkdir(parents=True)
    (ckpt / "run_config.yaml").write_text(dump_yaml(saved))
    state = TrainState(step=3, cursor=DataCursor(), tokens_seen=0, world_size=2)  # 4 x 2 x 2 = 16 rows

    note = batch_change_note(tmp_path, tag_for(3), state, saved, world=1)
    assert note == (
        "resuming a 2-rank checkpoint on 1 rank(s) changes the global batch from 16 to 8 rows per step; "
        "train.grad_accum_steps=4 keeps it"
    )
    kept = load_config(root / "configs" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path}", "train.grad_accum_steps=4"])
    assert batch_change_note(tmp_path, tag_for(3), state, kept, world=1) is None
    odd = load_config(root / "configs" / "tiny_cpu.yaml", [f"train.output_dir={tmp_path}", "train.micro_batch_size=3"])
    assert batch_change_note(tmp_path, tag_for(3), state, odd, world=1).endswith("no grad_accum_steps keeps it")
