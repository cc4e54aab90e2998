"""The LR schedule and the loop's interval predicates: pure functions of the optimizer step."""

from __future__ import annotations

import itertools
import math

import pytest

from trainer.config import RunConfig, load_config
from trainer.loop import should_eval, should_log, should_save, should_stop, stop_step
from trainer.optim import choose_adam, lr_at


def cfg(*overrides: str) -> RunConfig:
    return load_config(None, ["model.path=m", "data.path=d", "train.output_dir=o", *overrides])


def test_warmup_then_cosine_to_the_floor() -> None:
    t = cfg("train.max_steps=10", "train.lr=1.0", "train.warmup_steps=2", "train.min_lr_ratio=0.1").train
    lrs = [lr_at(s, t) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0  # warmup: (step + 1) / warmup_steps
    assert lrs[2] == 1.0  # decay starts at the peak
    # step 6: progress (6-2)/8 = 0.5 -> halfway between peak and floor
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lr_at(10, t) == pytest.approx(0.1)
    assert lr_at(50, t) == pytest.approx(0.1)  # past max_steps: stays at the floor


def test_linear_and_constant() -> None:
    linear = cfg("train.max_steps=5", "train.lr=2.0", "train.lr_schedule=linear", "train.min_lr_ratio=0.0").train
    assert [lr_at(s, linear) for s in range(5)] == [2.0, 1.6, 1.2, pytest.approx(0.8), pytest.approx(0.4)]
    constant = cfg("train.max_steps=5", "train.lr=2.0", "train.lr_schedule=constant", "train.warmup_steps=1").train
    assert [lr_at(s, constant) for s in range(5)] == [2.0] * 5


def test_stop_at_step_does_not_change_the_schedule() -> None:
    full = cfg("train.max_steps=100", "train.warmup_steps=10").train
    stopped = cfg("train.max_steps=100", "train.warmup_steps=10", "train.stop_at_step=37").train
    assert [lr_at(s, full) for s in range(100)] == [lr_at(s, stopped) for s in range(100)]


def test_save_log_eval_stop_predicates() -> None:
    c = cfg("train.max_steps=10", "train.save_every_steps=4", "train.log_every_steps=3", "eval.every_steps=5")
    assert [s for s in range(1, 11) if should_save(s, c)] == [4, 8, 10]
    assert [s for s in range(1, 11) if should_log(s, c)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if should_eval(s, c)] == [5, 10]
    assert [s for s in range(0, 11) if should_stop(s, c)] == [10]
    c = cfg("train.max_steps=10", "train.save_every_steps=4", "train.stop_at_step=6")
    assert stop_step(c) == 6
    assert [s for s in range(1, 11) if should_save(s, c)] == [4, 6, 8, 10]
    assert should_stop(6, c) and not should_stop(5, c)
    assert not should_eval(6, c)  # eval.every_steps=0: only at max_steps
    c = cfg("train.max_steps=10")
    assert [s for s in range(1, 11) if should_save(s, c)] == [10]  # save_every_steps=0: only at the end


def test_adam_choice() -> None:
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    plain = {"zero_optimization": {"stage": 3}}
    assert choose_adam(offload, "cuda") == "cpu_adam"
    assert choose_adam(offload, "cpu") == "cpu_adam"
    assert choose_adam(plain, "cuda") == "fused_adam"
    assert choose_adam(plain, "cpu") == "torch_adamw"
