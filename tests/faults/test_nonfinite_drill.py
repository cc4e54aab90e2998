"""NaN on one rank of two (real launcher, ZeRO-2, fp32, grad_clip 1.0, train.on_nonfinite=skip).

Rank 1's first micro-batch loss of step 3 becomes NaN. Every rank learns it from the step's reduction and skips
the update together. A clean run that skips step 3 holds, after step 3, exactly the state it had after step 2;
so the step-3 checkpoint of the NaN run must equal its step-2 checkpoint: weights, Adam moments and step counts,
fp32 partitions, on both ranks. The run then continues normally to step 4.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.faults.conftest import drill_env, launch

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        found[prefix] = tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            found |= tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found |= tensors(value, f"{prefix}/{i}")
    return found


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer state of a 2-rank ZeRO-2 checkpoint (our own test output: a full unpickle is fine)."""
    model = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    out = tensors(model["module"], "module")
    for rank in (0, 1):
        optim = torch.load(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        out |= tensors(optim["optimizer_state_dict"], f"optim{rank}")
    return out


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory, drill_data: Path) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    result = launch(
        out,
        drill_data,
        "train.max_steps=4",
        "train.save_every_steps=1",
        "train.keep_last_checkpoints=4",
        "train.on_nonfinite=skip",
        "train.export=false",
        env=drill_env(SFT_TEST_FAULT="loss:3:1:nan"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_nan_on_one_rank_is_seen_by_all_and_skipped(nan_run: tuple[Path, Any]) -> None:
    out, result = nan_run
    assert "non-finite loss at step 3 on rank(s) [1]; optimizer step skipped" in result.stdout
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert rows[3]["loss"] is None and rows[3]["skipped_steps"] == 1
    assert all(rows[s]["loss"] is not None and rows[s]["skipped_steps"] == 0 for s in (1, 2, 4))


def test_state_after_the_skip_equals_a_clean_run_that_skips_the_step(nan_run: tuple[Path, Any]) -> None:
    out, _ = nan_run
    before, after, later = (state(out / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4))
    assert before.keys() == after.keys() and len(before) > 10
    for name in before:
        assert torch.equal(before[name], after[name]), name  # nothing moved: weights, moments, steps
    assert all(torch.isfinite(t).all() for t in after.values() if t.is_floating_point())
    assert any(not torch.equal(after[name], later[name]) for name in after)  # step 4 trained normally
