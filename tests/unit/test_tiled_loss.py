"""Tiled loss: same loss and gradients as the plain loss, and a loss step whose peak memory does not grow
with sequence x vocabulary."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM

from data_pipeline.schema import IGNORE_INDEX
from trainer.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from trainer.loss import loss_sum
from trainer.tiled_loss import forward_tiled_loss_sum, tiled_loss_sum

TINY_LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_llama"


class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among storages created by ops while the mode is open.

    Every op output's storage is counted when first seen and uncounted when Python's finalizer says it was
    freed; CPU torch has no allocator statistics, and tracemalloc does not see torch's allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if key in self.seen or nbytes == 0:
                continue
            self.seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def labels_with_ignored(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < 0.3] = IGNORE_INDEX  # prompt tokens, padding
    labels[0, : seq // 3] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("tile_tokens", [7, 49, 10_000])  # uneven tiles, even tiles, one tile
def test_tiled_loss_and_gradients_equal_the_plain_loss(tile_tokens: int) -> None:
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 3, 50, 16, 300
    head = torch.nn.Linear(hidden_size, vocab, bias=True)
    hidden = torch.randn(batch, seq, hidden_size)
    labels = labels_with_ignored(batch, seq, vocab, seed=1)

    def loss_and_grads(compute: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        head.zero_grad()
        states = hidden.clone().requires_grad_(True)
        loss = compute(states)
        (loss * 0.37).backward()  # an outer scale, as scale_for_backward applies
        assert states.grad is not None and head.weight.grad is not None and head.bias.grad is not None
        return loss.detach(), [states.grad, head.weight.grad.clone(), head.bias.grad.clone()]

    plain, plain_grads = loss_and_grads(lambda states: loss_sum(head(states), labels))
    tiled, tiled_grads = loss_and_grads(lambda states: tiled_loss_sum(states, head, labels, tile_tokens))
    assert tiled.dtype == torch.float32
    assert tiled.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(tiled_grads, plain_grads, strict=True):
        assert relative_error(got, want) <= 1e-6


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise: fp32 sums in another order differ by ~1e-7 of the gradient's scale, element by element."""
    return ((got - want).norm() / want.norm()).item()


def test_all_ignored_labels_give_zero() -> None:
    head = torch.nn.Linear(8, 20)
    labels = torch.full((2, 9), IGNORE_INDEX)
    assert tiled_loss_sum(torch.randn(2, 9, 8), head, labels, 4).item() == 0.0


@pytest.mark.parametrize("tied", [False, True])
def test_forward_tiled_loss_equals_the_plain_loss_through_a_real_model(tied: bool) -> None:
    """The head hook trims the model's own head call to one position and the tiles reproduce the loss and
    every parameter's gradient (tied embeddings: the head weight is also the input embedding)."""
    config = AutoConfig.from_pretrained(TINY_LLAMA, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, config.vocab_size, (2, 40), generator=generator)
    labels = input_ids.clone()
    labels[:, :10] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def loss_and_grads(compute: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = loss_and_grads(lambda: loss_sum(model(**inputs, use_cache=False).logits, labels))
    tiled, tiled_grads = loss_and_grads(lambda: forward_tiled_loss_sum(model, inputs, labels, 16))
    assert tiled == pytest.approx(plain, rel=1e-6)
    assert tiled_grads.keys() == plain_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():
        assert relative_error(tiled_grads[name], grad) <= 1e-6, name
    assert model.get_output_embeddings()._forward_pre_hooks == {}  # the trimming hook is gone afterwards


def loss_step_peak_bytes(seq: int, vocab: int, tile_tokens: int) -> int:
    """Peak bytes of a forward+backward of the loss on precomputed hidden states (the loss step only)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=False)
    hidden = torch.randn(1, seq, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    with PeakBytes() as meter:
        if tile_tokens:
            tiled_loss_sum(hidden, head, labels, tile_tokens).backward()
        else:
            loss_sum(head(hidden), labels).backward()
    return meter.peak


def test_tiled_loss_peak_memory_does_not_grow_with_sequence_times_vocab() -> None:
    vocab, tile = 4096, 256
    short, long = 512, 2048
    full_logits_long = long * vocab * 4  # fp32 logits of the long sequence: 32 MiB
    plain_short, plain_long = loss_step_peak_bytes(short, vocab, 0), loss_step_peak_bytes(long, vocab, 0)
    tiled_short, tiled_long = loss_step_peak_bytes(short, vocab, tile), loss_step_peak_bytes(long, vocab, tile)
    # The meter sees the plain loss grow with the sequence (logits, log-softmax and their gradient).
    assert plain_long > 3 * plain_short and plain_long > 2 * full_logits_long
    # Tiled: 4x the sequence adds only sequence x hidden terms (hidden states, their gradient), not x vocab.
    assert tiled_long - tiled_short < long * 32 * 4 * 4
    assert tiled_long < full_logits_long / 2
    assert tiled_long < 4 * tile * vocab * 4  # a few tile-sized tensors at most


def test_negative_tile_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.loss_tile_tokens=-1"):
        RunConfig(
            model=ModelConfig(path=str(TINY_LLAMA)),
            data=DataConfig(path=str(tmp_path)),
            train=TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, loss_tile_tokens=-1),
        )
