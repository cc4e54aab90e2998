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
    is_tag,
    latest_complete,
    lineage,
    prune,
    tag_for,
    tags_to_prune,
    universal_command,
    write_marker,
)
from trainer.config import dump_yaml, load_config
from trainer.data import DataCursor


def fake_checkpoint(root: Path, step: int, complete: bool, **parent: str | None) -> Path:
    """A one-file checkpoint; ``parent=TAG`` records its line (markers written before the key existed have none)."""
    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        files = hash_files(ckpt, ["mp_rank_00_model_states.pt"])
        write_marker(ckpt, files, step=step, world_size=1, run_id=None, **parent)
    return ckpt


def tags(*steps: int) -> list[str]:
    return [tag_for(step) for step in steps]


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
    prune(root, keep_last=2, written="step_00000006")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006", "step_00000008"]


def test_ranking_keeps_the_newest_of_the_line() -> None:
    line = tags(8, 6, 4, 2)
    doomed = tags_to_prune(tags(2, 4, 6, 8), tags(3), line=line, written=tag_for(8), pointed=tag_for(8), keep_last=2)
    assert doomed == tags(2, 3, 4)  # the partial step 3 is a killed save's leftover


def test_ranking_after_a_fallback_never_counts_the_damaged_tag() -> None:
    # 6 was damaged; the run fell back to 4 and a preemption saved 5 (parent 4). 6 is outside the line.
    complete = tags(2, 4, 5, 6)
    line = tags(5, 4, 2)
    assert tags_to_prune(complete, [], line=line, written=tag_for(5), pointed=tag_for(5), keep_last=2) == tags(2)
    # keep_last=1: the tag just written stays (the old ranking by step kept only the damaged 6 and deleted 5)
    assert tags_to_prune(complete, [], line=line, written=tag_for(5), pointed=tag_for(5), keep_last=1) == tags(2, 4)


def test_ranking_never_deletes_the_written_or_the_pointed_tag() -> None:
    line = tags(6, 4, 2)
    # A pointer that still names 4 (e.g. the pointer write is what failed) keeps 4 even with keep_last=1.
    doomed = tags_to_prune(tags(2, 4, 6), [], line=line, written=tag_for(6), pointed=tag_for(4), keep_last=1)
    assert doomed == tags(2)
    # The written tag is kept even when a (corrupt) line does not start with it.
    assert tag_for(6) not in tags_to_prune(tags(6), [], line=[], written=tag_for(6), pointed=None, keep_last=1)


def test_ranking_keeps_partial_tags_newer_than_the_written_one() -> None:
    doomed = tags_to_prune(tags(4), tags(2, 9), line=tags(4), written=tag_for(4), pointed=tag_for(4), keep_last=1)
    assert doomed == tags(2)  # 9: a save of another line (or in progress) is not this save's to delete


def test_lineage_follows_parents_and_skips_other_lines(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, complete=True)  # written before markers had a parent: the next older tag is its parent
    fake_checkpoint(root, 4, complete=True)
    fake_checkpoint(root, 6, complete=True, parent=tag_for(4))  # later damaged: not in 5's line
    fake_checkpoint(root, 5, complete=True, parent=tag_for(4))
    fake_checkpoint(root, 7, complete=True, parent="../../etc")  # an edited marker ends the line, never escapes
    assert lineage(root, tag_for(5)) == tags(5, 4, 2)
    assert lineage(root, tag_for(7)) == tags(7)


def test_prune_after_a_fallback_keeps_everything_usable(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, complete=True, parent=None)
    fake_checkpoint(root, 4, complete=True, parent=tag_for(2))
    fake_checkpoint(root, 6, complete=True, parent=tag_for(4))
    fake_checkpoint(root, 5, complete=True, parent=tag_for(4))
    (root / "latest_complete").write_text("step_00000005\n")
    prune(root, keep_last=1, written=tag_for(5))
    assert sorted(p.name for p in root.glob("step_*")) == tags(5, 6)
    assert latest_complete(tmp_path) == tag_for(5)


@pytest.mark.parametrize("text", ["../../outside", "/etc", "step_1/../../x", "step_", "step_4 ", ".."])
def test_a_pointer_that_is_not_a_plain_tag_is_refused(tmp_path: Path, text: str) -> None:
    assert not is_tag(text)
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4, complete=True)
    (root / "latest_complete").write_text(text)
    assert latest_complete(tmp_path) == tag_for(4)  # named in a warning; the newest verified tag is used


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


def test_a_failed_write_is_one_line_with_the_file_and_the_free_space(tmp_path: Path) -> None:
    import errno

    from trainer.write_errors import describe

    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.pt"))
    line = describe(enospc, tmp_path)
    assert line.startswith(f"No space left on device writing {tmp_path / 'a.pt'} (") and line.endswith(" MiB free)")
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0\nframe #0: ...")
    line = describe(torch_error, tmp_path / "missing" / "b.pt")  # free space of the nearest existing parent
    assert line.startswith("RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0 writing ")
    assert "\n" not in line and line.endswith(" MiB free)")
