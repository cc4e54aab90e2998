"""Ulysses sequence parallelism (``train.sequence_parallel_size`` > 1): who shares a row, the shard each rank
trains on, and the attention that joins the shards.

Ranks form groups of ``size`` consecutive ranks (DeepSpeed's ``parallel_state_sp`` layout); a group reads one
data-parallel rank's micro-batches (data rank = rank // size) and each member keeps 1/size of every row's
positions. DeepSpeed's ``UlyssesSPAttentionHF`` turns each attention call into all-to-all (sequence shards ->
head shards), attention over the whole row for heads/size heads, and all-to-all back. It replaces transformers'
process-wide attention function for the model's implementation, so it is registered only when size > 1 and
undone by ``deactivate`` (tests run several trainings in one process).

What is ours, and why:
- The shard (``shard_batch``): labels are shifted on the whole row before it is split, so the last position
  of one shard keeps its target (the first token of the next shard). Every rank builds the group's batch from
  the same data order (a pure function of seed and step), so no rank sends rows to another.
- Packed rows stay isolated: Ulysses drops the attention mask and sdpa then attends causally over the whole
  row, across packed samples. ``_isolating_sdpa`` runs after the all-to-all, where each rank has the whole
  row's ``position_ids``, and builds the block-diagonal causal mask from where they restart at 0 (the mask
  transformers builds from position_ids without SP). flash_attention_2 needs nothing: transformers' varlen
  path derives the samples from position_ids itself.
- Padding positions continue counting from the row's last position, so only packed rows restart at 0 and
  unpadded or right-padded rows keep sdpa's maskless causal kernel; right padding is never attended by a
  real token under a causal mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from data_pipeline.schema import IGNORE_INDEX
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, RunConfig
from trainer.data import Batch
from trainer.families import resolve_family, sequence_parallel_families


def head_counts(hf_config: dict[str, Any]) -> tuple[int, int]:
    """(attention heads, KV heads) from a config.json: GPT-2-style configs name the heads ``n_head``, have no
    num_key_value_heads when every head has its own K/V, and gpt_bigcode says ``multi_query`` (one KV head)."""
    heads = int(hf_config.get("num_attention_heads", hf_config.get("n_head", 0)))
    if "num_key_value_heads" in hf_config:
        return heads, int(hf_config["num_key_value_heads"])
    multi_query = hf_config.get("model_type") == "gpt_bigcode" and hf_config.get("multi_query", True)
    return heads, 1 if multi_query else heads


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its sequence-parallel group and the data-parallel rank that group reads."""

    size: int
    """train.sequence_parallel_size: ranks per group (1: off)."""
    rank: int
    """This rank's index in its group: which slice of every row it keeps."""
    data_rank: int
    """The data-parallel rank whose micro-batches the group trains on."""
    data_world: int
    """Data-parallel degree: world size / size."""


def layout(rank: int, world_size: int, size: int) -> Layout:
    """Groups of consecutive ranks, as DeepSpeed's parallel_state_sp builds them (ranks i*size .. (i+1)*size-1)."""
    return Layout(size=size, rank=rank % size, data_rank=rank // size, data_world=world_size // size)


def check(cfg: RunConfig, world_size: int, hf_config: dict[str, Any]) -> None:
    """Refuse a sequence-parallel setting that cannot run, in one line naming the key; nothing when size is 1."""
    size = cfg.train.sequence_parallel_size
    if size == 1:
        return
    key = f"train.sequence_parallel_size={size}"
    model_type = str(hf_config.get("model_type", ""))
    family = resolve_family(cfg.model.family, model_type)
    if not family.sequence_parallel:
        why = f": {family.no_sequence_parallel_because}" if family.no_sequence_parallel_because else ""
        raise ConfigError(
            f"{key}: model family {family.name!r} ({cfg.model.path}/config.json model_type {model_type!r}) has no "
            f"Ulysses attention{why} (supported: {', '.join(sequence_parallel_families())}); "
            "set train.sequence_parallel_size=1"
        )
    if world_size % size:
        raise ConfigError(
            f"{key} does not divide the world size {world_size}; use a divisor of the number of ranks "
            "(the data-parallel degree is world size / train.sequence_parallel_size)"
        )
    heads, kv_heads = head_counts(hf_config)
    if heads % size or kv_heads % size:
        raise ConfigError(
            f"{key} does not divide the model's {heads} attention heads and {kv_heads} KV heads "
            f"({cfg.model.path}/config.json); each rank attends over whole heads, so pick a common divisor"
        )
    # A row is padded to a multiple of the size and its padding positions count on past the last token; with a
    # learned position table (GPT-2's wpe) that stays inside the table only when the size divides its length.
    table = int(hf_config.get("n_positions", 0)) if model_type == "gpt2" else 0
    if table % size:
        raise ConfigError(
            f"{key} does not divide the model's {table} learned positions (n_positions in {cfg.model.path}/config.json):"
            " a row padded to a multiple of the size could index past the position table; pick a divisor of it"
        )
    if cfg.eval.prompts_file:
        raise ConfigError(
            f"{key} with eval.prompts_file: sample generation would run through the split attention; "
            "unset eval.prompts_file and generate from OUT/final after training"
        )
    if cfg.model.attn_implementation == "eager":
        raise ConfigError(
            f"{key} with model.attn_implementation=eager: Ulysses needs sdpa or flash_attention_2 (eager needs the "
            "full 4D mask it drops); use model.attn_implementation=auto"
        )


def gradient_divisor(ds_config: dict[str, Any], world_size: int, size: int) -> int:
    """What DeepSpeed divides the gradient summed over all ranks by: ``loop.scale_for_backward`` multiplies by it.

    Without ZeRO and with ZeRO-1/2 it is the data-parallel degree, world size / SP size (the SP ranks' gradients
    are parts of one row's gradient and must add up). ZeRO-3's reduce-scatter (``reduce_scatter``, on by default)
    averages over every rank it partitions over, the whole world, with no SP correction (DeepSpeed 0.19), so
    there it is the world size; its other path corrects for SP only for buckets that fit, so it is refused."""
    zero = ds_config.get("zero_optimization", {})
    if size == 1 or zero.get("stage", 0) != 3:
        return world_size // size
    if not zero.get("reduce_scatter", True):
        raise ConfigError(
            f"train.sequence_parallel_size={size} with ZeRO-3 and zero_optimization.reduce_scatter=false: DeepSpeed "
            "then scales gradients per bucket inconsistently; remove reduce_scatter from the deepspeed.config JSON"
        )
    return world_size


def check_resume(checkpoint: Path, saved_world: int, cfg: RunConfig, world_size: int) -> None:
    """Refuse, in one line, moving a checkpoint to another world size when either side uses sequence parallelism.

    DeepSpeed records the sequence-parallel group as tensor parallelism in a checkpoint's metadata, so its
    universal-checkpoint converter (the path to another world size) refuses an SP checkpoint; the other way
    round is untested. Same world size: the ZeRO partitions are the same and the checkpoint loads as is."""
    if saved_world == world_size:
        return
    saved = yaml.safe_load((checkpoint / "run_config.yaml").read_text(encoding="utf-8"))
    saved_size = saved["train"].get("sequence_parallel_size", 1)  # checkpoints from before the key: 1
    if saved_size == 1 and cfg.train.sequence_parallel_size == 1:
        return
    raise CheckpointError(
        f"{checkpoint}: written on {saved_world} rank(s) with train.sequence_parallel_size={saved_size}; resuming "
        f"on {world_size} rank(s) with train.sequence_parallel_size={cfg.train.sequence_parallel_size} needs "
        f"a universal checkpoint, which DeepSpeed cannot make from or for sequence parallelism; resume on "
        f"{saved_world} rank(s) with train.sequence_parallel_size={saved_size}"
    )


# -- the shard each rank trains on --


def continued_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids with the trailing padding (zeros after a row's last non-zero position) counting on."""
    width = position_ids.shape[1]
    index = torch.arange(width).expand_as(position_ids)
    last = torch.where(position_ids != 0, index, torch.zeros_like(index)).max(dim=1, keepdim=True).values
    tail = index > last
    return torch.where(tail, position_ids.gather(1, last) + index - last, position_ids)


def shard_batch(batch: Batch, sp: Layout, *, pad_id: int, rows: int) -> Batch:
    """This rank's slice of the group's micro-batch, padded to ``rows`` rows and a width divisible by sp.size.

    ``rows``: DeepSpeed's Ulysses reshapes by a fixed batch size (train.micro_batch_size), so a short last
    validation batch gets loss-free rows. Real tokens are counted on the group's first rank only, so sums over
    ranks count each row once; loss tokens are exact per shard (the loss is summed over shards)."""
    n, width = batch.input_ids.shape
    extra_rows = rows - n
    full = -(-width // sp.size) * sp.size
    extra = full - width
    input_ids = F.pad(batch.input_ids, (0, extra, 0, extra_rows), value=pad_id)
    positions = continued_positions(F.pad(batch.position_ids, (0, extra, 0, extra_rows), value=0))
    # Position t's target is token t+1 of the whole row: shift before splitting, so no shard loses its last target.
    targets = F.pad(batch.labels[:, 1:], (0, extra + 1, 0, extra_rows), value=IGNORE_INDEX)
    chunk = full // sp.size
    window = slice(sp.rank * chunk, (sp.rank + 1) * chunk)
    targets = targets[:, window].contiguous()
    return replace(
        batch,
        input_ids=input_ids[:, window].contiguous(),
        labels=targets,
        position_ids=positions[:, window].contiguous(),
        attention_mask=None,  # Ulysses drops masks; the row's samples come from position_ids (module docstring)
        tokens=batch.tokens if sp.rank == 0 else 0,
        loss_tokens=int((targets != IGNORE_INDEX).sum()),
        # Each rank attends over the whole row for size-th of the heads: world x this sums to the group's FLOPs.
        sum_seq_sq=rows * full * full // sp.size,
        labels_shifted=True,
    )


def shard_batches(batches: list[Batch], sp: Layout, *, pad_id: int, rows: int) -> list[Batch]:
    """``shard_batch`` over a step's micro-batches; the batches unchanged when sequence parallelism is off."""
    if sp.size == 1:
        return batches
    return [shard_batch(b, sp, pad_id=pad_id, rows=rows) for b in batches]


# -- the attention --


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] bool, True where position i may attend to j: j <= i within the same packed sample
    (a sample starts where position_ids is 0)."""
    sample = torch.cumsum(position_ids == 0, dim=1)
    same = sample[:, :, None] == sample[:, None, :]
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def _isolating_sdpa(
    sdpa: Callable[..., Any],
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """transformers' sdpa over the whole row (after Ulysses' all-to-all), isolating packed samples."""
    positions = kwargs.get("position_ids")
    if attention_mask is None and positions is not None and bool((positions[:, 1:] == 0).any()):
        attention_mask = packed_causal_mask(positions)
    return sdpa(module, query, key, value, attention_mask, *args, **kwargs)


def _per_head_output(
    ulysses: Callable[..., Any], module: torch.nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """Ulysses' output as [batch, seq, heads, head_dim], the layout attention functions return.

    Ulysses returns [batch, seq, heads x head_dim]: Llama-style classes reshape it to their input's shape and do
    not notice, GPT-2's reshapes all but the last two dimensions and would flatten the sequence into one row."""
    output, weights = ulysses(module, query, *args, **kwargs)
    return output.view(*output.shape[:2], -1, query.shape[-1]), weights


_restore: list[Callable[[], None]] = []
"""What ``deactivate`` undoes: the attention function and DeepSpeed's group globals are process-wide."""


def activate(model: Any, size: int, micro_batch_size: int) -> Any:
    """Route ``model``'s attention through Ulysses over groups of ``size`` ranks (train.sequence_parallel_size);
    return the mpu for deepspeed.initialize (ZeRO then partitions and reduces over the sequence-data-parallel
    group), or None when size is 1. ``micro_batch_size``: rows per forward (Ulysses reshapes by it)."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from deepspeed.utils import groups
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = model.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[implementation]
    if implementation == "sdpa":
        # Registered first so that Ulysses wraps it as its core attention (it reads the current entry).
        ALL_ATTENTION_FUNCTIONS[implementation] = partial(_isolating_sdpa, original)
    text_config = model.config.get_text_config()
    lent = not hasattr(text_config, "num_key_value_heads")
    if lent:  # codegen, gpt2: every head has its own K/V; DeepSpeed reads the count only while registering
        text_config.num_key_value_heads = text_config.num_attention_heads
    try:
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model,
            core_attn_implementation=implementation,
            sequence_parallel_size=size,
            micro_batch_size=micro_batch_size,
            seq_length_is_variable=True,
        )
    finally:
        if lent:  # not left in the config: it would be saved into checkpoints' and exports' config.json
            del text_config.num_key_value_heads
    ALL_ATTENTION_FUNCTIONS[implementation] = partial(_per_head_output, ALL_ATTENTION_FUNCTIONS[implementation])

    def restore() -> None:
        ALL_ATTENTION_FUNCTIONS[implementation] = original
        if groups.mpu is mpu:  # deepspeed.initialize(mpu=...) stored it globally for every later engine
            groups.mpu = None
        parallel_state_sp._release_sequence_parallel_groups()

    _restore.append(restore)
    return mpu


def deactivate() -> None:
    """Undo ``activate`` (no-op when nothing is active)."""
    while _restore:
        _restore.pop()()
