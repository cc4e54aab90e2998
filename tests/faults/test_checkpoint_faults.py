"""Damaged and hostile checkpoints, on copies of a real 2-rank DeepSpeed checkpoint directory.

Each damage is detected on resume (``latest_complete``, what trainer.loop.setup calls on every rank) with a
message naming the file, and the run falls back to the previous complete checkpoint, or stops when there is
none. A planted pickle never runs: the hashes in the COMPLETE marker refuse the file before anything loads
it, and our own RNG files are read with weights_only=True even when the marker is forged.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from sft_stack.cli.export import main as export_main
from tests.faults.conftest import ROOT
from trainer.checkpoint import (
    COMPLETE,
    CheckpointError,
    hash_files,
    latest_complete,
    restore_rng,
    verify,
    write_marker,
)
from trainer.run_dir import LATEST_FILE as LATEST

pytestmark = [pytest.mark.faults, pytest.mark.slow]

NEWEST, PREVIOUS = "step_00000006", "step_00000004"


@pytest.fixture
def run(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference run's output directory (checkpoints step 4 and 6, latest_complete -> 6)."""
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


def ckpt(run: Path, tag: str = NEWEST) -> Path:
    return run / "checkpoints" / tag


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_checkpoints_verify(run: Path) -> None:
    assert latest_complete(run) == NEWEST
    marker = json.loads((ckpt(run) / COMPLETE).read_text())
    assert marker["step"] == 6 and marker["world_size"] == 2
    assert set(marker["files"]) >= {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt"}


def test_truncated_file_falls_back_naming_it(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = ckpt(run) / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:1000])
    assert latest_complete(run) == PREVIOUS
    err = capsys.readouterr().err
    assert f"{model}: sha256 differs" in err and f"resuming from {ckpt(run, PREVIOUS)} instead" in err


def test_one_flipped_bit_falls_back(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optim = ckpt(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_byte(optim, optim.stat().st_size // 2)  # silent corruption: same size, still a valid zip maybe
    assert latest_complete(run) == PREVIOUS
    assert f"{optim}: sha256 differs" in capsys.readouterr().err


def test_missing_rank_file_falls_back(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt(run) / "rng_rank1.pt").unlink()
    assert latest_complete(run) == PREVIOUS
    assert f"{ckpt(run) / 'rng_rank1.pt'}: missing" in capsys.readouterr().err


def test_missing_complete_marker_falls_back(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt(run) / COMPLETE).unlink()
    assert latest_complete(run) == PREVIOUS
    assert f"points at '{NEWEST}', which is not a complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("garbage", [b"step_99999999\n", b"\xff\xfe\x00garbage", b""])
def test_pointer_at_garbage_falls_back_to_newest_verified(run: Path, garbage: bytes, capsys) -> None:  # type: ignore[no-untyped-def]
    (run / "checkpoints" / LATEST).write_bytes(garbage)
    assert latest_complete(run) == NEWEST
    assert f"{run / 'checkpoints' / LATEST}: points at" in capsys.readouterr().err


def test_every_checkpoint_damaged_stops(run: Path) -> None:
    for tag in (NEWEST, PREVIOUS):
        flip_byte(ckpt(run, tag) / "mp_rank_00_model_states.pt", 100)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint under .*mp_rank_00_model_states\.pt: sha256"):
        latest_complete(run)


def test_marker_not_ours_is_refused(run: Path) -> None:
    (ckpt(run) / COMPLETE).write_text('{"step": 6}')  # DeepSpeed-style or hand-made: no format, no hashes
    with pytest.raises(CheckpointError, match="not written by this trainer"):
        verify(ckpt(run))


def payload_pickle(target: Path) -> bytes:
    """A pickle that, when loaded by plain pickle, writes ``target``: what a hostile checkpoint would carry."""

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, (f"open({str(target)!r}, 'w').write('payload ran')",))

    return pickle.dumps(Payload())


def test_the_payload_is_live(tmp_path: Path) -> None:
    # Proof the planted file is dangerous: unpickled the unsafe way, it runs.
    target = tmp_path / "ran"
    pickle.loads(payload_pickle(target))
    assert target.read_text() == "payload ran"


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_pickle_in_a_deepspeed_file_is_refused_before_loading(run: Path, tmp_path: Path, name: str) -> None:
    target = tmp_path / "ran"
    (ckpt(run) / name).write_bytes(payload_pickle(target))
    (ckpt(run, PREVIOUS) / name).write_bytes(payload_pickle(target))
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: sha256 differs")):
        latest_complete(run)  # resume: the trainer would hand this directory to DeepSpeed's unsafe torch.load
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 2  # export refuses too
    assert not target.exists()


def test_planted_extra_file_is_refused(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "ran"
    (ckpt(run) / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(payload_pickle(target))
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_2_mp_rank_00_optim_states\.pt: not part of the checkpoint"
    ):
        verify(ckpt(run))
    assert not target.exists()


def test_rng_file_is_loaded_weights_only_even_with_a_forged_marker(run: Path, tmp_path: Path) -> None:
    target = tmp_path / "ran"
    tag_dir = ckpt(run)
    (tag_dir / "rng_rank0.pt").write_bytes(payload_pickle(target))
    files = json.loads((tag_dir / COMPLETE).read_text())["files"]
    write_marker(tag_dir, {**files, **hash_files(tag_dir, ["rng_rank0.pt"])}, step=6, world_size=2, run_id=None)
    verify(tag_dir)  # the forger rewrote the hashes: the marker is not a signature...
    with pytest.raises(CheckpointError, match="unreadable RNG state"):
        restore_rng(run, NEWEST, 0)  # ...but our own files are never unpickled beyond tensors and numbers
    assert not target.exists()


def test_intact_rng_state_restores_with_weights_only(run: Path) -> None:
    state = torch.load(ckpt(run) / "rng_rank1.pt", weights_only=True)
    assert set(state) >= {"python", "numpy", "torch"}
    assert restore_rng(run, NEWEST, 1)


def test_export_of_a_verified_checkpoint_works(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert sorted(p.suffix for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")) == [".safetensors"]


def test_malicious_weights_in_a_model_directory_are_refused(tmp_path: Path) -> None:
    from trainer.inference import load_for_inference

    target = tmp_path / "ran"
    model_dir = tmp_path / "model"
    shutil.copytree(ROOT / "tests" / "fixtures" / "tiny_llama", model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(payload_pickle(target))
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|weights_only"):
        load_for_inference(model_dir)
    assert not target.exists()


def test_export_does_not_follow_a_pointer_out_of_the_run(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A complete, verifying checkpoint outside the run folder, and a pointer edited to lead to it.
    outside = tmp_path / "elsewhere"
    shutil.copytree(ckpt(run), outside / NEWEST)
    (run / "checkpoints" / LATEST).write_text(f"../../elsewhere/{NEWEST}\n")
    assert latest_complete(run) == NEWEST  # the trainer names the pointer and uses its own newest tag
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / LATEST}: names '../../elsewhere/{NEWEST}', not a checkpoint tag" in err
    assert not (tmp_path / "exported").exists()
