"""Checkpoints that describe themselves, count only when complete, and resume exactly.

Layout under ``OUT/checkpoints/``::

    step_00000010/              a DeepSpeed tag directory written by engine.save_checkpoint on every rank
        mp_rank_00_model_states.pt, *optim_states.pt    (DeepSpeed's files; client_state inside)
        rng_rank{R}.pt          python/numpy/torch RNG state of rank R (tensors and numbers only)
        trainer_state.json      step, data cursor, tokens seen, world size, tracking run id
        run_config.yaml, ds_config.json
        COMPLETE                written by rank 0 after every rank finished saving: JSON with the step, the
                                run id and the sha256 of every file of the checkpoint (the marker)
    latest_complete             the tag of the newest COMPLETE checkpoint, replaced atomically
    universal/step_.../         ds_to_universal output, made when resuming on another world size (same marker)

DeepSpeed's own ``latest`` file is not written (save_latest=False) and never read: it can point at a
checkpoint some rank has not finished. Only ``latest_complete`` decides where a run resumes, and only after
``verify`` found every file of that checkpoint with the hash its marker records. A checkpoint that fails
(truncated or flipped bytes, a missing rank file, no marker, a pointer at garbage) is named in a warning and
the run falls back to the previous complete one; with none left it stops.

Security: DeepSpeed loads its model and optimizer files with ``torch.load(weights_only=False)`` (they hold
Python objects), which runs any pickle code in them. We let that happen only on a directory whose marker we
wrote and whose every file matches the recorded hashes, so a file planted or swapped in later is refused
before anything unpickles it; our own RNG files are read with ``weights_only=True``. The marker is not a
signature: someone who can rewrite the checkpoint directory can rewrite the marker too (docs/RELIABILITY.md).
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

from data_pipeline.schema import sha256_file
from sft_stack.common.atomic import write_text_atomic
from trainer import progress
from trainer.config import RunConfig
from trainer.data import DataCursor
from trainer.run_dir import DS_CONFIG_FILE, LATEST_FILE, RUN_CONFIG_FILE, UNIVERSAL_DIR, RunDir

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
KILL_HOOK_ENV = "SFT_TEST_SIGKILL_IN_SAVE_AT_STEP"
"""Test hook: rank 0 SIGKILLs itself after DeepSpeed wrote a checkpoint at this step, before COMPLETE (any
rank and point: trainer.progress.FAULT_ENV)."""
MARKER_FORMAT = "sft-stack checkpoint v1"
"""The ``format`` of a COMPLETE marker; a COMPLETE file without it was not written by this trainer."""


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
    saved = yaml.safe_load((RunDir.of(output_dir).checkpoint(tag) / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    # A sequence-parallel group shares its rows (checkpoints written before that key existed had none).
    saved_sp = saved["train"].get("sequence_parallel_size", 1)
    before = saved["train"]["micro_batch_size"] * saved["train"]["grad_accum_steps"] * state.world_size // saved_sp
    data_parallel = world // cfg.train.sequence_parallel_size
    after = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * data_parallel
    if before == after:
        return None
    keep, exact = divmod(before, cfg.train.micro_batch_size * data_parallel)
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
    return RunDir.of(output_dir).checkpoints


def rng_state() -> dict[str, Any]:
    """Python/numpy/torch RNG state as tensors, numbers and strings: loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any,
    output_dir: str | Path,
    state: TrainState,
    *,
    run_config_yaml: str,
    ds_config_json: str,
    keep_last: int,
) -> Path:
    """Save on every rank; mark COMPLETE (with hashes) and move ``latest_complete`` once all ranks finished.

    A failed write (a full disk: ENOSPC) on any rank raises CheckpointError on every rank, naming the file; the
    previous checkpoint and ``latest_complete`` are untouched, so rerunning the same command resumes from it.
    """
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    root = checkpoints_dir(output_dir)
    tag = tag_for(state.step)
    ckpt = root / tag
    rank = dist.get_rank()
    if rank == 0:  # a tag left by an earlier attempt (killed, or damaged and fallen back from): start it afresh
        shutil.rmtree(ckpt, ignore_errors=True)
    dist.barrier()
    client_state = {
        "trainer_state": state.to_dict(),
        # Present (even empty) so ds_to_universal accepts the checkpoint for resuming on another world size.
        UNIVERSAL_CHECKPOINT_INFO: {},
    }
    failure: str | None = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
        if rank == 0:
            (ckpt / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2) + "\n", encoding="utf-8")
            (ckpt / RUN_CONFIG_FILE).write_text(run_config_yaml, encoding="utf-8")
            (ckpt / DS_CONFIG_FILE).write_text(ds_config_json, encoding="utf-8")
    except OSError as exc:  # ENOSPC, EDQUOT, EIO: the same on every rank that shares the file system
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        failure = f"rank {rank}: {reason} writing {exc.filename or ckpt}"
    if os.environ.get(KILL_HOOK_ENV) == str(state.step) and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    progress.fault_hook("save", state.step, rank)
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if any(failures):
        previous = latest_tag_text(root)
        raise CheckpointError(
            f"saving {ckpt} failed ({'; '.join(f for f in failures if f)}); "
            f"{LATEST_FILE} still points at {previous or 'nothing (no earlier checkpoint)'}, which is intact: "
            "free space (or set train.output_dir elsewhere) and rerun the same command to resume from it"
        )
    files = hash_files(ckpt, sorted(_checkpoint_files(ckpt)))
    if rank == 0:
        write_marker(ckpt, files, step=state.step, world_size=state.world_size, run_id=state.run_id)
        write_text_atomic(root / LATEST_FILE, tag + "\n")
        prune(root, keep_last)
    dist.barrier()
    return ckpt


def write_marker(ckpt: Path, files: dict[str, str], **fields: Any) -> None:
    """Write ``ckpt/COMPLETE``: our format tag, ``fields`` (step, world size, run id) and the file hashes."""
    write_text_atomic(ckpt / COMPLETE, json.dumps({"format": MARKER_FORMAT, **fields, "files": files}, indent=1) + "\n")


def _checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of a checkpoint directory (relative paths) except the marker itself."""
    return [str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE]


def hash_files(ckpt: Path, names: list[str], *, local: bool = False) -> dict[str, str]:
    """sha256 of ``names`` under ``ckpt``; under a process group each rank hashes every world-th file.

    Every rank must call it with the same names (unless ``local``: this process hashes all). Missing files
    hash to "missing".
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() and not local else (0, 1)
    mine = {name: sha256_file(ckpt / name) if (ckpt / name).is_file() else "missing" for name in names[rank::world]}
    if world == 1:
        return mine
    parts: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(parts, mine)
    merged = {name: digest for part in parts if part for name, digest in part.items()}
    return {name: merged[name] for name in names}


def read_marker(ckpt: Path) -> dict[str, Any]:
    """The COMPLETE marker of ``ckpt``; CheckpointError naming the file when absent or not ours."""
    path = ckpt / COMPLETE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the save never finished on every rank)")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a checkpoint marker ({exc})") from exc
    if (
        not isinstance(marker, dict)
        or marker.get("format") != MARKER_FORMAT
        or not isinstance(marker.get("files"), dict)
    ):
        raise CheckpointError(f"{path}: not written by this trainer (no {MARKER_FORMAT!r} marker with file hashes)")
    return marker


def verify(ckpt: Path) -> None:
    """Check ``ckpt`` against its marker: every recorded file present with its sha256, no unrecorded file.

    Raises CheckpointError naming the first bad file. Under a process group every rank must call it (the hashing
    is split over ranks); all ranks reach the same verdict.
    """
    marker = read_marker(ckpt)
    recorded: dict[str, str] = marker["files"]
    unrecorded = sorted(set(_checkpoint_files(ckpt)) - set(recorded)) if ckpt.is_dir() else []
    actual = hash_files(ckpt, sorted(recorded))
    for name, digest in sorted(recorded.items()):
        if actual[name] == "missing":
            raise CheckpointError(f"{ckpt / name}: missing (listed in {ckpt / COMPLETE})")
        if actual[name] != digest:
            raise CheckpointError(f"{ckpt / name}: sha256 differs from {ckpt / COMPLETE} (truncated or altered)")
    if unrecorded:
        raise CheckpointError(f"{ckpt / unrecorded[0]}: not part of the checkpoint its {COMPLETE} describes")


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
        shutil.rmtree(root / UNIVERSAL_DIR / name, ignore_errors=True)


def latest_tag_text(root: Path) -> str | None:
    """What ``latest_complete`` says (stripped), or None without the file."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    return pointer.read_bytes().decode("utf-8", errors="replace").strip()


def latest_complete(output_dir: str | Path) -> str | None:
    """The tag to resume from, or None for a fresh run: the newest verified complete checkpoint.

    Starts from ``latest_complete`` (a pointer at garbage, or at a checkpoint without a marker, is reported and
    the newest complete tag is tried instead), verifies it, and falls back to the previous complete one while a
    checkpoint fails; each failure is warned about naming the file. No checkpoint at all: None. Checkpoints that
    all fail: CheckpointError (nothing is deleted; move checkpoints/ away to start from scratch).
    """
    root = checkpoints_dir(output_dir)
    pointed = latest_tag_text(root)
    candidates = list(reversed(complete_tags(root)))
    if pointed is None and not candidates:
        return None
    problems: list[str] = []
    if pointed is not None and pointed not in candidates:
        problems.append(f"{root / LATEST_FILE}: points at {pointed[:80]!r}, which is not a complete checkpoint")
    elif pointed is not None:
        # Newer complete tags than the pointer are from a save that died between COMPLETE and the pointer.
        candidates = candidates[candidates.index(pointed) :]
    for tag in candidates:
        try:
            verify(root / tag)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            _warn(f"{problem}; resuming from {root / tag} instead")
        return tag
    raise CheckpointError(
        "no usable checkpoint under "
        f"{root}: {'; '.join(problems)}. Repair or move {root} away (a fresh start), or set train.resume=never"
    )


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"WARNING checkpoint: {message}", file=sys.stderr, flush=True)


def read_state(output_dir: str | Path, tag: str) -> TrainState:
    path = checkpoints_dir(output_dir) / tag / STATE_FILE
    return TrainState.from_dict(json.loads(path.read_text(encoding="utf-8")))


def restore_rng(output_dir: str | Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (other world size)."""
    path = checkpoints_dir(output_dir) / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    try:
        set_rng_state(torch.load(path, weights_only=True))
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
        str(root / UNIVERSAL_DIR / tag),
    ]


def make_universal(output_dir: str | Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` with ds_to_universal (rank 0, once) and return the directory to load from.

    Called on every rank; the others wait at the barrier.
    """
    universal_root = RunDir.of(output_dir).universal
    try:  # on every rank: verify splits the hashing over ranks
        verify(universal_root / tag)
        reusable = True
    except CheckpointError:
        reusable = False
    error: list[str | None] = [None]
    if dist.get_rank() == 0 and not reusable:
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
            write_text_atomic(universal_root / "latest_universal", tag + "\n")
            files = hash_files(universal_root / tag, sorted(_checkpoint_files(universal_root / tag)), local=True)
            write_marker(universal_root / tag, files, step=step_of(tag), universal_of=tag)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CheckpointError(error[0])
    return universal_root
