"""A NaN/Inf loss is reported with step and rank, then stops or relies on DeepSpeed having skipped the step."""

from __future__ import annotations

import pytest

from trainer.config import RunConfig, load_config
from trainer.loop import NonFiniteLossError, check_finite


class Engine:
    def __init__(self, applied: bool) -> None:
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


def cfg(mode: str) -> RunConfig:
    return load_config(
        None, ["model.path=m", "data.path=d", "train.output_dir=o", "train.max_steps=9", f"train.on_nonfinite={mode}"]
    )


def reduced(bad: list[int]) -> dict:
    return {"loss_sum": 0.0, "loss_tokens": 10.0, "tokens": 20.0, "bad_ranks": bad}


def test_finite_steps_pass() -> None:
    check_finite(reduced([]), 3, Engine(applied=True), cfg("stop"), 0)


def test_stop_names_step_and_ranks() -> None:
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 on rank\(s\) \[1\]; stopping"):
        check_finite(reduced([1]), 3, Engine(applied=False), cfg("stop"), 0)


def test_skip_refuses_an_update_deepspeed_applied_anyway() -> None:
    with pytest.raises(NonFiniteLossError, match=r"applied the update anyway.*train\.grad_clip > 0"):
        check_finite(reduced([0, 1]), 5, Engine(applied=True), cfg("skip"), 0)


def test_skip_reports_a_skipped_step(capsys: pytest.CaptureFixture[str]) -> None:
    check_finite(reduced([1]), 7, Engine(applied=False), cfg("skip"), 0)
    assert "non-finite loss at step 7 on rank(s) [1]; optimizer step skipped" in capsys.readouterr().out
