"""Checkpoints that describe themselves, count only when complete, and resume exactly.

Layout under ``OUT/checkpoints/``::

    step_00000010/              a DeepSpeed tag directory written by engine.save_checkpoint on every rank
        mp_rank_00_model_states.pt, *optim_states.pt    (DeepSpeed's files; client_state inside)
        rng_rank{R}.pt          python/numpy/torch RNG state of rank R
        trainer_state.json      step, data cursor, tokens seen, world size, tracking run id
        run_config.yaml, ds_config.json
        COMPLETE                written by rank 0 after every rank finished saving
    latest_complete             the tag of the newest COMPLETE checkpoint, replaced atomically
    universal/step_.../         ds_to_universal output, made when resuming on another world size

DeepSpeed's own ``latest`` file is not written (save_latest=False) and never read: it can point at a
checkpoint some rank has not finished. Only ``latest_complete`` decides where a run resumes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from trainer.config import RunConfig
from trainer.data import DataCursor

CHECKPOINTS = "checkpoints"
LATEST = "latest_complete"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
KILL_HOOK_ENV = "SFT_TEST_SIGKILL_IN_SAVE_AT_STEP"
"""Test hook: rank 0 SIGKILLs itself after DeepSpeed wrote a checkpoint at this step, before COMPLETE."""


class CheckpointError(Exception):
    """A checkpoint directory that cannot be resumed from; the message says what to do."""


@dataclass(frozen=True)
class TrainState:
    """Everything besides model/optimizer tensors that the next step depends on."""

    step: int
    """Optimizer steps completed."""
    cursor: DataCursor
    tokens_seen: int
    """Real tokens trained on so far, all ranks."""
    world_size: int
    run_id: str | None = None
    """Tracking run id, so a resumed run keeps logging into the same run."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        return cls(**{**raw, "cursor": DataCursor(**raw["cursor"])})


def batch_change_note(output_dir: str | Path, tag: str, state: TrainState, cfg: RunConfig, world: int) -> str | None:
    """A warning when resuming ``tag`` on another world size changes the global batch (rows per step), or None.

    The run continues correctly either way (data cursor and LR schedule are in steps and rows), but a different
    global batch changes the optimization; the note says which grad_accum_steps keeps it.
    """
    saved = yaml.safe_load((checkpoints_dir(output_dir) / tag / "run_config.yaml").read_text(encoding="utf-8"))
    before = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum_steps"] * state.world_size
    after = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world
    if before == after:
        return None
    keep, exact = divmod(before, cfg.train.micro_batch_size * world)
    remedy = f"train.grad_accum_steps={keep} keeps it" if keep and not exact else "no grad_accum_steps keeps it"
    return (
        f"resuming a {state.world_size}-rank checkpoint on {world} rank(s) changes the global batch from "
        f"{before} to {after} rows per step; {remedy}"
    )


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, fsync, then rename over ``path``: readers see the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save(
    engine: Any,
    output_dir: str | Path,
    state: TrainState,
    *,
    run_config_yaml: str,
    ds_config_json: str,
    keep_last: int,
) -> Path:
    """Save on every rank; mark COMPLETE and move ``latest_complete`` only once all ranks finished."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = checkpoints_dir(output_dir)
    tag = tag_for(state.step)
    rank = dist.get_rank()
    client_state = {
        "trainer_state": state.to_dict(),
        "rng_rank0": rng_state() if rank == 0 else None,
        # Present (even empty) so ds_to_universal accepts the checkpoint for resuming on another world size.
        UNIVERSAL_CHECKPOINT_INFO: {},
    }
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    ckpt = root / tag
    torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    if rank == 0:
        (ckpt / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2) + "\n", encoding="utf-8")
        (ckpt / "run_config.yaml").write_text(run_config_yaml, encoding="utf-8")
        (ckpt / "ds_config.json").write_text(ds_config_json, encoding="utf-8")
        if os.environ.get(KILL_HOOK_ENV) == str(state.step):
            os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        _write_atomic(ckpt / COMPLETE, json.dumps({"step": state.step, "world_size": state.world_size}) + "\n")
        _write_atomic(root / LATEST, tag + "\n")
        prune(root, keep_last)
    dist.barrier()
    return ckpt


def complete_tags(root: Path) -> list[str]:
    """Tags with a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.glob("step_*") if (p / COMPLETE).is_file())


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and partial ones older than the newest."""
    complete = complete_tags(root)
    if not complete:
        return
    doomed = set(complete[:-keep_last])
    newest = step_of(complete[-1])
    doomed |= {p.name for p in root.glob("step_*") if not (p / COMPLETE).is_file() and step_of(p.name) < newest}
    for name in sorted(doomed):
        shutil.rmtree(root / name, ignore_errors=True)
        shutil.rmtree(root / "universal" / name, ignore_errors=True)


def latest_complete(output_dir: str | Path) -> str | None:
    """The tag to resume from, or None for a fresh run."""
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not (root / tag / COMPLETE).is_file():
        raise CheckpointError(
            f"{pointer}: points at {tag} which has no {COMPLETE} marker; delete {pointer} to resume from scratch"
        )
    return tag


def read_state(output_dir: str | Path, tag: str) -> TrainState:
    path = checkpoints_dir(output_dir) / tag / STATE_FILE
    return TrainState.from_dict(json.loads(path.read_text(encoding="utf-8")))


def restore_rng(output_dir: str | Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (other world size)."""
    path = checkpoints_dir(output_dir) / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    try:
        set_rng_state(torch.load(path, weights_only=False))
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable RNG state ({exc})") from exc
    return True


def universal_command(output_dir: str | Path, tag: str) -> list[str]:
    root = checkpoints_dir(output_dir)
    return [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(root / tag),
        "--output_folder",
        str(root / "universal" / tag),
    ]


def make_universal(output_dir: str | Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` with ds_to_universal (rank 0, once) and return the directory to load from.

    Called on every rank; the others wait at the barrier.
    """
    universal_root = checkpoints_dir(output_dir) / "universal"
    done = universal_root / tag / COMPLETE
    error: list[str | None] = [None]
    if dist.get_rank() == 0 and not done.is_file():
        command = universal_command(output_dir, tag)
        shutil.rmtree(universal_root / tag, ignore_errors=True)
        universal_root.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            error[0] = (
                f"converting {checkpoints_dir(output_dir) / tag} to a universal checkpoint failed "
                f"({' | '.join(tail)}); run `{' '.join(command)}` by hand, or resume on the saved world size"
            )
        else:
            _write_atomic(universal_root / "latest_universal", tag + "\n")
            _write_atomic(done, tag + "\n")
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(error[0])
    return universal_root
