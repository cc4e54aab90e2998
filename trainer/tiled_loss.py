"""The summed next-token loss computed in tiles of the sequence, so the full logits never exist at once.

At 32k tokens and a 152k vocabulary one row's fp32 logits are 19 GB; the plain loss (``loop.loss_sum``)
holds them, their fp32 upcast and their gradient. Here the model runs with its output head on the last
position only (a forward pre-hook trims the head's input and keeps the full hidden states), and the loss
applies the head to ``tile_tokens`` positions at a time under non-reentrant activation checkpointing:
forward keeps only each tile's scalar loss, backward recomputes one tile's logits at a time. Peak memory
of the loss is one tile's logits (tile_tokens x vocab), whatever the sequence length.

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it runs each tile's backward inside forward with an assumed
incoming gradient of 1 and scales only the hidden-state gradient by the real one afterwards, so the head's
weight gradient would miss ``loop.scale_for_backward``'s factor (our global loss-token normalization) and
DeepSpeed's own 1/grad_accum_steps. Checkpointing keeps one autograd graph, so every parameter's gradient
is accumulated once and scaled correctly (also for ZeRO's gradient hooks, which must fire once).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_pipeline.schema import IGNORE_INDEX


@contextmanager
def head_input_captured(model: Any) -> Iterator[list[torch.Tensor]]:
    """While open, the output head sees only the last position; the full hidden states land in the list."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def keep_last_position(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        captured.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(keep_last_position)
    try:
        yield captured
    finally:
        handle.remove()


def tile_count(positions: int, tile_tokens: int) -> int:
    """Tiles for this micro-batch, the same on every rank: under ZeRO-3 each head call gathers its weight
    (a collective), so ranks with shorter rows run empty tiles rather than fewer calls."""
    tiles = torch.tensor(max(1, math.ceil(positions / tile_tokens)))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tiles, op=dist.ReduceOp.MAX)
    return int(tiles.item())


def _tile_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def tiled_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, tile_tokens: int, shifted: bool = False
) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over labels != IGNORE_INDEX, equal to ``loop.loss_sum`` of
    ``head(hidden)`` up to summation order. ``hidden`` is [batch, seq, hidden]; position t predicts labels[t+1],
    or labels[t] when ``shifted`` (a sequence-parallel shard, see ``data.Batch.labels_shifted``)."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"tiled loss: the output head's input has shape {tuple(hidden.shape)}, labels {tuple(labels.shape)}; "
            "this model does not feed its head batch-first [batch, seq, hidden] states: set train.loss_tile_tokens=0"
        )
    states = (hidden if shifted else hidden[:, :-1]).flatten(0, 1)
    targets = (labels if shifted else labels[:, 1:]).flatten().to(states.device)
    tiles = tile_count(targets.numel(), tile_tokens)
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    for h, y in zip(torch.tensor_split(states, tiles), torch.tensor_split(targets, tiles), strict=True):
        total = total + checkpoint(_tile_loss_sum, head, h, y, use_reentrant=False)
    return total


def forward_tiled_loss_sum(
    model: Any, inputs: dict[str, Any], labels: torch.Tensor, tile_tokens: int, shifted: bool = False
) -> torch.Tensor:
    """Run ``model`` (the DeepSpeed engine or a plain HF model) and return the tiled summed loss."""
    with head_input_captured(getattr(model, "module", model)) as captured:
        model(**inputs, use_cache=False)
    if len(captured) != 1:
        raise ValueError(
            f"tiled loss: the output head ran {len(captured)} times in one forward (expected once); "
            "set train.loss_tile_tokens=0 for this model"
        )
    head = getattr(model, "module", model).get_output_embeddings()
    return tiled_loss_sum(captured[0], head, labels, tile_tokens, shifted)
