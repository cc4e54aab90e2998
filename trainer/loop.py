"""The training loop: our own loop over the DeepSpeed engine, readable top to bottom.

``train(cfg, ds_config)`` runs on every rank inside an initialized process group (launcher/run.py does that).
A *micro-step* is one forward/backward of one micro-batch; a *step* is one optimizer update over
grad_accum_steps micro-batches on every rank. Every interval (log, eval, save, stop) counts steps.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.schema import Manifest
from sft_stack.chat.templates import resolve_template
from sft_stack.common.atomic import write_text_atomic
from sft_stack.common.memory import peak_rss_mib
from trainer import checkpoint, preemption, progress, sequence_parallel
from trainer import model as model_lib
from trainer.config import RunConfig, dump_yaml
from trainer.data import Batch, DataCursor, TrainData, check_data_on_rank0, open_split, pad_id_for, val_batches
from trainer.dist import device_name
from trainer.ds_config import dump_ds_config, with_universal_load
from trainer.export import export_final
from trainer.generation import generate_samples, read_prompts
from trainer.harness import HarnessOptions, evaluate_at_save
from trainer.loss import forward_loss_sum, validation_totals
from trainer.metrics import MetricsLog, eta_s, mfu, peak_flops, perplexity, train_flops
from trainer.optim import build_optimizer, choose_adam, lr_at, set_lr
from trainer.run_dir import RunDir
from trainer.run_record import open_tracker


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss with train.on_nonfinite=stop."""


# -- pure predicates: what happens after optimizer step ``step`` (1-based count of completed steps) --


def stop_step(cfg: RunConfig) -> int:
    """The step after which this session ends: train.stop_at_step if set, else train.max_steps."""
    return cfg.train.stop_at_step if cfg.train.stop_at_step is not None else cfg.train.max_steps


def should_log(step: int, cfg: RunConfig) -> bool:
    return step % cfg.train.log_every_steps == 0 or step == stop_step(cfg)


def should_eval(step: int, cfg: RunConfig) -> bool:
    every = cfg.eval.every_steps
    return (every > 0 and step % every == 0) or step == cfg.train.max_steps


def should_save(step: int, cfg: RunConfig) -> bool:
    every = cfg.train.save_every_steps
    return (every > 0 and step % every == 0) or step in (stop_step(cfg), cfg.train.max_steps)


def should_stop(step: int, cfg: RunConfig) -> bool:
    return step >= stop_step(cfg)


# -- loss (loss_sum, forward_loss_sum and the validation loss live in trainer/loss.py) --


def scale_for_backward(
    micro_loss_sum: torch.Tensor, grad_accum_steps: int, grad_divisor: int, global_loss_tokens: torch.Tensor
) -> torch.Tensor:
    """The loss to hand to engine.backward so the step's gradient is that of the global token mean."""
    # We want d/dθ of sum(CE over every loss token of the step, all ranks) / global loss tokens.
    # engine.backward divides by grad_accum_steps and the gradient reduction sums over all ranks and divides by
    # grad_divisor: the world size, or under sequence parallelism what sequence_parallel.gradient_divisor says
    # (each SP rank's loss covers only its shard's tokens, and the shards' gradients must add up, not average);
    # multiplying by both undoes those divisions, leaving one token-weighted mean per optimizer step.
    return micro_loss_sum * (grad_accum_steps * grad_divisor) / global_loss_tokens


def global_loss_tokens(batches: list[Batch], device: torch.device) -> torch.Tensor:
    """Loss tokens of this step's micro-batches on all ranks (one all_reduce, no host sync)."""
    count = torch.tensor(sum(b.loss_tokens for b in batches), dtype=torch.float32, device=device)
    dist.all_reduce(count)
    return count.clamp(min=1.0)


@dataclass
class Meter:
    """Sums since the last log line (host numbers only; filled from the per-step reduction)."""

    loss_sum: float = 0.0
    loss_tokens: float = 0.0
    tokens: float = 0.0
    flops: float = 0.0
    skipped_steps: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Run:
    """What setup() builds and the loop uses."""

    engine: Any
    loaded: Any
    data: TrainData
    manifest: Manifest
    val: Any
    tracker: Any
    log: MetricsLog
    rank: int
    world_size: int
    sp: sequence_parallel.Layout
    grad_divisor: int
    """What DeepSpeed divides the all-rank gradient sum by (sequence_parallel.gradient_divisor)."""
    run_config_yaml: str
    ds_config_json: str


def train(cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    """Train (or resume) until train.stop_at_step / train.max_steps; save and export at the end."""
    run, state = setup(cfg, ds_config)
    engine, t, sp = run.engine, cfg.train, run.sp
    session_start, session_steps, meter = time.monotonic(), 0, Meter()
    status, exported = "FAILED", False
    try:
        while not should_stop(state.step, cfg):
            progress.mark(state.step + 1, "start", run.rank)  # what a collective timeout reports (trainer/progress)
            batches, cursor = run.data.next_step(state.cursor)
            batches = sequence_parallel.shard_batches(batches, sp, pad_id=run.data.pad_id, rows=t.micro_batch_size)
            progress.mark(state.step + 1, "data", run.rank)
            set_lr(engine.optimizer, lr_at(state.step, t))
            loss_tokens = global_loss_tokens(batches, engine.device)
            step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
            for batch in batches:  # micro-steps
                micro_loss = forward_loss_sum(engine, batch, t.loss_tile_tokens)
                if progress.fault_hook("loss", state.step + 1, run.rank) and batch is batches[0]:  # NaN drill
                    micro_loss = micro_loss * float("nan")
                step_loss += micro_loss.detach()
                engine.backward(scale_for_backward(micro_loss, t.grad_accum_steps, run.grad_divisor, loss_tokens))
                engine.step()
            progress.mark(state.step + 1, "update", run.rank)
            reduced = reduce_step(step_loss, batches, run.rank, run.world_size)
            check_finite(reduced, state.step + 1, engine, cfg, run.rank)
            state = dataclasses.replace(
                state, step=state.step + 1, cursor=cursor, tokens_seen=state.tokens_seen + int(reduced["tokens"])
            )
            session_steps += 1
            accumulate(meter, reduced, batches, run)
            if should_log(state.step, cfg):
                meter = log_step(run, cfg, state, meter, lr_at(state.step - 1, t), session_start, session_steps)
            if should_eval(state.step, cfg):
                evaluate(run, cfg, state.step)
            preempted = preemption.is_preemption_requested()  # SIGUSR1/SIGTERM on any rank (slurm time limit, scancel)
            if should_save(state.step, cfg) or preempted:
                state = save(run, cfg, state)
            if preempted:
                break
            progress.mark(state.step, "done", run.rank)
        exported = state.step >= t.max_steps and t.export
        if exported:
            export(run, cfg)
        # KILLED: stopped early (stop_at_step or a signal) with a checkpoint; rerunning resumes the same run.
        status = "FINISHED" if state.step >= t.max_steps else "KILLED"
    except RuntimeError as exc:
        if progress.is_timeout(exc):  # a rank stopped: name it and the step instead of a gloo/NCCL traceback
            message = progress.describe_timeout(state.step + 1, run.rank, t.collective_timeout_s)
            raise progress.CollectiveTimeoutError(message) from exc
        raise
    finally:
        preemption.uninstall()
        sequence_parallel.deactivate()
        run.tracker.close(status, RunDir.of(t.output_dir).final if status == "FINISHED" and exported else None)


# -- set-up --


def setup(cfg: RunConfig, ds_config: dict[str, Any]) -> tuple[Run, checkpoint.TrainState]:
    """Everything the loop needs, in order: the resume point, the configs on disk, model, data, engine, tracker."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    sp = sequence_parallel.layout(rank, world, cfg.train.sequence_parallel_size)
    out = RunDir.of(cfg.train.output_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    preemption.install()

    tag, state, ds_config = resume_point(cfg, ds_config, out, rank, world)
    run_config_yaml, ds_config_json = write_run_configs(cfg, ds_config, out, rank)
    model_lib.validate_method(cfg, ds_config)
    sequence_parallel.check(cfg, world, model_lib.read_hf_config(Path(cfg.model.path)))
    grad_divisor = sequence_parallel.gradient_divisor(ds_config, world, sp.size)
    loaded = model_lib.load_model(cfg, ds_config)
    manifest, data = open_train_data(cfg, loaded, rank, sp)
    optimizer = build_optimizer(
        model_lib.param_groups(loaded.model, cfg.train.weight_decay),
        cfg.train,
        choose_adam(ds_config, get_accelerator().device_name()),
    )
    mpu = sequence_parallel.activate(loaded.model, cfg.train.sequence_parallel_size, cfg.train.micro_batch_size)
    engine, *_ = deepspeed.initialize(model=loaded.model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if tag:
        restore(engine, cfg, out, tag, state, rank, world)

    tracker = open_tracker(
        cfg=cfg,
        ds_config=ds_config,
        output_dir=out.root,
        rank=rank,
        world_size=world,
        device=device_name() or "cpu",
        manifest=manifest,
        data_dir=cfg.data.path,
        resume_run_id=state.run_id,
    )
    state = dataclasses.replace(state, world_size=world, run_id=getattr(tracker, "run_id", None) or state.run_id)
    run = Run(
        engine=engine,
        loaded=loaded,
        data=data,
        manifest=manifest,
        val=open_split(cfg.data.path, "val", manifest),
        tracker=tracker,
        log=MetricsLog(out.metrics, enabled=rank == 0),
        rank=rank,
        world_size=world,
        sp=sp,
        grad_divisor=grad_divisor,
        run_config_yaml=run_config_yaml,
        ds_config_json=ds_config_json,
    )
    return run, state


def resume_point(
    cfg: RunConfig, ds_config: dict[str, Any], out: RunDir, rank: int, world: int
) -> tuple[str | None, checkpoint.TrainState, dict[str, Any]]:
    """(tag to resume from or None, the state to start at, the DeepSpeed config to use).

    Resuming on another world size loads a universal checkpoint, which the DeepSpeed config must say.
    """
    tag = checkpoint.latest_complete(out.root) if cfg.train.resume == "auto" else None
    if not tag:
        return None, checkpoint.TrainState(step=0, cursor=DataCursor(), tokens_seen=0, world_size=world), ds_config
    state = dataclasses.replace(checkpoint.read_state(out.root, tag), last_checkpoint=tag)
    if state.world_size != world:
        sequence_parallel.check_resume(out.checkpoint(tag), state.world_size, cfg, world)
        ds_config = with_universal_load(ds_config)
        note = checkpoint.batch_change_note(out.root, tag, state, cfg, world)
        if note and rank == 0:
            warnings.warn(note, stacklevel=1)
    return tag, state, ds_config


def write_run_configs(cfg: RunConfig, ds_config: dict[str, Any], out: RunDir, rank: int) -> tuple[str, str]:
    """The resolved run config and merged DeepSpeed config as text, written into the output folder by rank 0."""
    run_config_yaml, ds_config_json = dump_yaml(cfg), dump_ds_config(ds_config)
    if rank == 0:
        write_text_atomic(out.run_config, run_config_yaml)
        write_text_atomic(out.ds_config, ds_config_json)
    return run_config_yaml, ds_config_json


def open_train_data(cfg: RunConfig, loaded: Any, rank: int, sp: sequence_parallel.Layout) -> tuple[Manifest, TrainData]:
    """The checked manifest (rank 0 hashes, every rank agrees) and this rank's training data."""
    manifest = check_data_on_rank0(
        cfg.data.path, loaded.tokenizer, cfg.model.path, verify_shards=cfg.data.verify_shards
    )
    if manifest.packed and not loaded.supports_packed_positions and rank == 0:
        warnings.warn(
            f"{cfg.data.path}: packed rows, but family {loaded.family!r} cannot isolate samples with position_ids; "
            "training on the rows split back into samples (unpacked)",
            stacklevel=1,
        )
    data = TrainData(
        open_split(cfg.data.path, "train", manifest),
        packed=manifest.packed,
        isolate=loaded.supports_packed_positions,
        pad_id=pad_id_for(loaded.tokenizer),
        seed=cfg.train.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        rank=sp.data_rank,  # a sequence-parallel group reads one data-parallel rank's rows
        world_size=sp.data_world,
        source=str(Path(cfg.data.path) / "train"),
    )
    return manifest, data


def restore(
    engine: Any, cfg: RunConfig, out: RunDir, tag: str, state: checkpoint.TrainState, rank: int, world: int
) -> None:
    """Load checkpoint ``tag`` into the engine (via a universal checkpoint on another world size) and the RNGs."""
    load_dir = checkpoint.make_universal(out.root, tag) if state.world_size != world else out.checkpoints
    load_checkpoint(engine, load_dir, tag)
    if not checkpoint.restore_rng(out.root, tag, rank):
        seed_everything(cfg.train.seed + 1000 * state.step + rank)
    if rank == 0:
        print(f"resumed from {out.checkpoint(tag)} at step {state.step}", flush=True)


def load_checkpoint(engine: Any, load_dir: Path, tag: str) -> None:
    """Load weights and optimizer state, undoing two things DeepSpeed's ZeRO-3 universal load gets wrong.

    It copies param group 0's settings (weight_decay included) onto every group, which would decay norms and
    biases; and it gives every sub-group's Adam state the same ``step`` tensor, which torch's Adam increments
    in place, so each sub-group would advance the shared count (wrong bias correction after resume).
    """
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    engine.load_checkpoint(str(load_dir), tag=tag)
    for group, settings in zip(engine.optimizer.param_groups, groups, strict=True):
        group.update(settings)
    base_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base_optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- per-step bookkeeping --


def reduce_step(step_loss: torch.Tensor, batches: list[Batch], rank: int, world: int) -> dict[str, Any]:
    """One all_reduce of [loss sum, loss tokens, tokens, non-finite flag per rank]: the step's one host sync.

    The flag is needed on the host every step (skip or stop); DeepSpeed's step syncs anyway for the norm.
    """
    vector = torch.zeros(3 + world, dtype=torch.float64, device=step_loss.device)
    finite = torch.isfinite(step_loss)
    vector[0] = torch.where(finite, step_loss, torch.zeros_like(step_loss))
    vector[1] = sum(b.loss_tokens for b in batches)
    vector[2] = sum(b.tokens for b in batches)
    vector[3 + rank] = (~finite).to(torch.float64)
    dist.all_reduce(vector)
    values = vector.tolist()
    return {
        "loss_sum": values[0],
        "loss_tokens": values[1],
        "tokens": values[2],
        "bad_ranks": [r for r in range(world) if values[3 + r] > 0],
    }


def check_finite(reduced: dict[str, Any], step: int, engine: Any, cfg: RunConfig, rank: int) -> None:
    """Report a NaN/Inf loss with step and rank; stop, or make sure the update was skipped."""
    if not reduced["bad_ranks"]:
        return
    where = f"non-finite loss at step {step} on rank(s) {reduced['bad_ranks']}"
    if cfg.train.on_nonfinite == "stop":
        raise NonFiniteLossError(f"{where}; stopping (train.on_nonfinite=stop; last complete checkpoint is kept)")
    if engine.was_step_applied():
        raise NonFiniteLossError(
            f"{where}: DeepSpeed applied the update anyway (it skips non-finite gradients only with bf16/fp16 "
            "or train.grad_clip > 0); set train.grad_clip > 0 or train.on_nonfinite=stop"
        )
    if rank == 0:
        print(f"WARNING {where}; optimizer step skipped (train.on_nonfinite=skip)", flush=True)


def accumulate(meter: Meter, reduced: dict[str, Any], batches: list[Batch], run: Run) -> None:
    loaded = run.loaded
    config = loaded.model.config
    if reduced["bad_ranks"]:  # a skipped step: its loss is not part of the mean
        meter.skipped_steps += 1
    else:
        meter.loss_sum += reduced["loss_sum"]
        meter.loss_tokens += reduced["loss_tokens"]
    meter.tokens += reduced["tokens"]
    # Attention term from this rank's rows, times world size (ranks see rows of similar length).
    meter.flops += train_flops(
        n_params=loaded.total_params,
        n_trainable=loaded.trainable_params,
        n_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        hidden=int(getattr(config, "hidden_size", 0) or 0),
        tokens=int(reduced["tokens"]),
        sum_seq_sq=run.world_size * sum(b.sum_seq_sq for b in batches),
    )


def log_step(
    run: Run,
    cfg: RunConfig,
    state: checkpoint.TrainState,
    meter: Meter,
    lr: float,
    session_start: float,
    session_steps: int,
) -> Meter:
    """Print and record one metrics row (rank 0); return a fresh meter."""
    now = time.monotonic()
    interval = max(now - meter.started, 1e-9)
    elapsed = now - session_start
    grad_norm = run.engine.get_global_grad_norm()
    row = {
        "step": state.step,
        "loss": meter.loss_sum / meter.loss_tokens if meter.loss_tokens else None,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "loss_tokens": int(meter.loss_tokens),
        "tokens_per_s": meter.tokens / interval,
        "mfu": mfu(meter.flops, interval, run.world_size, peak_flops(device_name())),
        "mem_gb": memory_gb(),
        "elapsed_s": elapsed,
        "eta_s": eta_s(elapsed, session_steps, stop_step(cfg) - state.step),
        "epoch": state.cursor.epoch,
        "tokens_seen": state.tokens_seen,
        "skipped_steps": meter.skipped_steps,
    }
    run.log.write(row)
    run.tracker.log_metrics(tracked_metrics(row), state.step)
    return Meter()


TRACKED_NAMES = {"loss": "_loss/train", "val_loss": "_loss/val"}
"""The MLflow names of the loop's two losses; metrics.jsonl keeps the loop's own names. MLflow's run page charts
its metrics section by section, the prefixed sections (``eval/``, ``before/``) sorted by name before the
unprefixed "Model metrics": ``_`` sorts before every letter, so the loss section is the first a run page shows."""


def tracked_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row as MLflow gets it: the numbers only, the losses under TRACKED_NAMES, each metric once."""
    return {TRACKED_NAMES.get(k, k): v for k, v in row.items() if isinstance(v, (int, float))}


def memory_gb() -> float:
    """Peak accelerator memory of this rank (GiB); on CPU the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_mib() / 1024


# -- evaluation, saving, export --


def evaluate(run: Run, cfg: RunConfig, step: int) -> None:
    """Token-weighted val loss over all ranks, then sample generations if eval.prompts_file is set."""
    engine = run.engine
    if run.val is not None:
        batches = val_batches(
            run.val,
            packed=run.manifest.packed,
            isolate=run.loaded.supports_packed_positions,
            pad_id=run.data.pad_id,
            micro_batch_size=cfg.train.micro_batch_size,
            rank=run.sp.data_rank,
            world_size=run.sp.data_world,
            max_batches=cfg.eval.max_batches,
        )
        batches = sequence_parallel.shard_batches(
            batches, run.sp, pad_id=run.data.pad_id, rows=cfg.train.micro_batch_size
        )
        totals = validation_totals(engine, batches, engine.device, cfg.train.loss_tile_tokens)
        dist.all_reduce(totals)
        val_loss = (totals[0] / totals[1].clamp(min=1)).item()
        row = {"step": step, "val_loss": val_loss, "val_ppl": perplexity(val_loss), "val_loss_tokens": int(totals[1])}
        run.log.write(row)
        run.tracker.log_metrics(tracked_metrics(row), step)
    if cfg.eval.prompts_file:
        generate(run, cfg, step)


def generate(run: Run, cfg: RunConfig, step: int) -> None:
    """Sample generations on every rank (ZeRO-3 forwards are collective); rank 0 records them."""
    assert cfg.eval.prompts_file is not None
    samples = generate_samples(
        run.engine.module,
        run.loaded.tokenizer,
        resolve_template(run.manifest.template, run.loaded.tokenizer),
        read_prompts(cfg.eval.prompts_file),
        max_new_tokens=cfg.eval.max_new_tokens,
        seed=cfg.train.seed,
        synced_gpus=run.world_size > 1,
    )
    run.tracker.log_table(samples, f"samples/step_{step:08d}.json")


def save(run: Run, cfg: RunConfig, state: checkpoint.TrainState) -> checkpoint.TrainState:
    """Save a checkpoint of ``state``; the state to continue with (its ``last_checkpoint`` is the new tag)."""
    started = time.monotonic()
    path = checkpoint.save(
        run.engine,
        cfg.train.output_dir,
        state,
        run_config_yaml=run.run_config_yaml,
        ds_config_json=run.ds_config_json,
        keep_last=cfg.train.keep_last_checkpoints,
    )
    if run.rank == 0:
        print(f"saved {path} in {time.monotonic() - started:.1f}s", flush=True)
    if cfg.eval.harness_tasks and run.rank == 0:  # the other ranks go on and wait at the next collective
        benchmark(run, cfg, state.step)
    return dataclasses.replace(state, last_checkpoint=path.name)


def benchmark(run: Run, cfg: RunConfig, step: int) -> None:
    """eval.harness_tasks on the just-saved weights (rank 0, ZeRO-0/1/2), logged as harness/<task>/<metric>."""
    tasks, limit, include = cfg.eval.harness_tasks, cfg.eval.harness_limit, cfg.eval.harness_include_path
    options = HarnessOptions(tasks=tasks, limit=limit, include_path=include, seed=cfg.train.seed)
    metrics = evaluate_at_save(run.engine.module, run.loaded.tokenizer, options).metrics
    row = {"step": step, **{f"harness/{k}": v for k, v in metrics.items()}}
    run.log.write(row)
    run.tracker.log_metrics(row, step)


def export(run: Run, cfg: RunConfig) -> None:
    path = export_final(run.engine, run.loaded, cfg, RunDir.of(cfg.train.output_dir).final)
    if run.rank == 0:
        print(f"exported {path}", flush=True)
