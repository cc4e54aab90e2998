"""Loss: summed CE by hand, and the backward scaling that undoes DeepSpeed's accumulation and DP means."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.schema import IGNORE_INDEX
from trainer.loop import scale_for_backward
from trainer.loss import loss_sum


def test_loss_sum_matches_a_hand_computation() -> None:
    # one row, 3 positions, vocab 2; position t predicts labels[t + 1]
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    # target 1 at position 0: p = 3/4; target 0 at position 1: p = 4/5; position 2 has no target
    expected = -math.log(3 / 4) - math.log(4 / 5)
    assert loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert loss_sum(logits, torch.full((1, 3), IGNORE_INDEX)).item() == 0.0


def test_scaled_micro_losses_give_the_gradient_of_the_global_token_mean() -> None:
    """2 ranks x 2 micro-batches with 1, 5, 2 and 9 loss tokens: simulate DeepSpeed (divide by accum in
    backward, average gradients over ranks) and compare with one token-weighted mean over all 17 tokens."""
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    world, accum = 2, 2
    batches = []
    for n_tokens in (1, 5, 2, 9):  # rank = index // accum
        labels = torch.full((1, 10), IGNORE_INDEX)
        labels[0, 1 : 1 + n_tokens] = torch.randint(0, 8, (n_tokens,))
        batches.append((torch.randn(1, 10, 8), labels))
    total_tokens = torch.tensor(17.0)

    def logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w

    # reference: one mean over every loss token
    w = weight.clone().requires_grad_(True)
    (sum(loss_sum(logits(x, w), y) for x, y in batches) / total_tokens).backward()
    reference = w.grad.clone()

    rank_grads = []
    for rank in range(world):
        w = weight.clone().requires_grad_(True)
        for x, y in batches[rank * accum : (rank + 1) * accum]:
            loss = scale_for_backward(loss_sum(logits(x, w), y), accum, world, total_tokens)
            (loss / accum).backward()  # engine.backward divides by gradient_accumulation_steps
        rank_grads.append(w.grad)
    averaged = sum(rank_grads) / world  # the data-parallel all-reduce averages
    torch.testing.assert_close(averaged, reference, rtol=1e-6, atol=1e-7)

    # The per-micro-batch mean (what transformers#35203 fixed) gives a different gradient here.
    w = weight.clone().requires_grad_(True)
    per_batch = sum(loss_sum(logits(x, w), y) / (y[:, 1:] != IGNORE_INDEX).sum() for x, y in batches) / 4
    per_batch.backward()
    assert not torch.allclose(w.grad, reference, rtol=1e-3)
