"""The loss, one home: summed next-token cross-entropy over label tokens, one micro-batch's forward, and the
validation loss that the training loop and ``python -m sft_stack.cli.evaluate`` both report.

Validation loss is token-weighted: the summed cross-entropy over every label that is not IGNORE_INDEX,
divided by the number of such labels (not a mean of per-batch means). The loop sums over its ranks with one
all-reduce of ``validation_totals``; a single process (evaluate) divides the same totals directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from data_pipeline.schema import IGNORE_INDEX, DataError
from trainer.data import Batch, val_batches
from trainer.metrics import perplexity
from trainer.tiled_loss import forward_tiled_loss_sum

if TYPE_CHECKING:
    import datasets


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over tokens whose label is not IGNORE_INDEX (fp32); ``shifted``: labels[t]
    is already position t's target (a sequence-parallel shard, see data.Batch.labels_shifted)."""
    return F.cross_entropy(
        (logits if shifted else logits[:, :-1]).flatten(0, 1).float(),
        (labels if shifted else labels[:, 1:]).flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def forward_loss_sum(
    model: Any, batch: Batch, tile_tokens: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """The micro-batch's summed loss through ``model`` (a DeepSpeed engine, or a plain module on ``device``);
    with tile_tokens > 0 the full logits never exist (trainer/tiled_loss)."""
    device = model.device if device is None else device
    if tile_tokens > 0:
        return forward_tiled_loss_sum(
            model, batch.model_inputs(device), batch.labels, tile_tokens, batch.labels_shifted
        )
    outputs = model(**batch.model_inputs(device), use_cache=False)
    return loss_sum(outputs.logits, batch.labels.to(device), batch.labels_shifted)


@torch.no_grad()
def validation_totals(model: Any, batches: Iterable[Batch], device: torch.device, tile_tokens: int = 0) -> torch.Tensor:
    """[summed loss, loss tokens] (float64, on ``device``) over ``batches``: the validation loss before the
    division, so ranks can add theirs with one all-reduce. The model is in eval mode for the pass and put
    back in the mode it was in."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            totals[0] += forward_loss_sum(model, batch, tile_tokens, device).double()
            totals[1] += batch.loss_tokens
    finally:
        model.train(was_training)
    return totals


@dataclass(frozen=True, kw_only=True)
class LossResult:
    loss: float
    """Summed cross-entropy / loss_tokens (nats per token)."""
    perplexity: float
    """exp(loss); inf when loss >= 50."""
    loss_tokens: int
    """Tokens scored: labels that are not IGNORE_INDEX, the first token of each sample excluded."""
    rows: int
    """Rows of the split evaluated (packed rows count once)."""


def evaluate_loss(
    model: Any, rows: datasets.Dataset, *, packed: bool, pad_id: int, batch_size: int = 2, max_batches: int = 0
) -> LossResult:
    """Token-weighted loss of ``model`` over prepared ``rows`` in one process; batches are built like the loop's."""
    from trainer.families import resolve_family  # here: the registry imports the model classes (transformers)

    isolate = resolve_family("auto", getattr(model.config, "model_type", "")).supports_packed_positions
    batches = val_batches(
        rows,
        packed=packed,
        isolate=isolate,
        pad_id=pad_id,
        micro_batch_size=batch_size,
        rank=0,
        world_size=1,
        max_batches=max_batches,
    )
    totals = validation_totals(model, batches, next(model.parameters()).device)
    tokens = int(totals[1])
    if tokens == 0:
        raise DataError("the split has no loss tokens (every label is IGNORE_INDEX); nothing to evaluate")
    loss = float(totals[0]) / tokens
    used = len(rows) if max_batches <= 0 else min(len(rows), max_batches * batch_size)
    return LossResult(loss=loss, perplexity=perplexity(loss), loss_tokens=tokens, rows=used)
