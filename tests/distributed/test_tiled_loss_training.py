"""The tiled loss in the real loop under the `deepspeed` launcher (2 gloo ranks): the same per-step and val
losses as the plain loss, for ZeRO-3 (every tensor partitioned, so each tile's head call gathers
its weight: ranks with rows of different lengths must still make the same number of calls) and LoRA on ZeRO-2.

One launch runs every case; model tests/fixtures/tiny_llama (random init, fp32), data the first 56 real BELLE
records (unpacked: rows of different lengths on the two ranks), 2 micro x 2 accum x 2 ranks, 6 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.test_training import BELLE, ROOT, launch, losses
from tests.helpers.data import make_prepared_dir

pytestmark = pytest.mark.slow

STEPS = 6
TILE = 48  # tokens per tile: rows are up to 256 tokens, so 1..11 tiles per micro-batch, different per rank
CASES = [(3, "full"), (2, "lora")]  # ZeRO-3 (partitioned head gathers per tile) and LoRA; ZeRO-2 full is the same path


def name(stage: int, method: str, tile: int) -> str:
    return f"z{stage}_{method}_tile{tile}"


def val_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiled")
    source = tmp / "belle56.jsonl"
    source.write_text("\n".join(BELLE.read_text(encoding="utf-8").splitlines()[:56]) + "\n", encoding="utf-8")
    data = make_prepared_dir(
        tmp / "data", max_seq_len=256, source=source, val_fraction=0.15, max_bad_fraction=0.5, max_dropped_fraction=0.5
    )
    zero3 = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3_partition_all.json").write_text(json.dumps(zero3))
    out = tmp / "runs"
    plan = []
    for stage, method in CASES:
        ds_json = tmp / "zero3_partition_all.json" if stage == 3 else ROOT / "ds_configs" / "zero2.json"
        for tile in (0, TILE):
            overrides = [
                f"data.path={data}",
                f"deepspeed.config={ds_json}",
                f"model.method={method}",
                f"train.max_steps={STEPS}",
                "train.micro_batch_size=2",
                "train.grad_accum_steps=2",
                f"train.loss_tile_tokens={tile}",
                f"eval.every_steps={STEPS // 2}",
                "train.save_every_steps=0",
                "train.export=false",
                "tracking.enabled=false",
            ]
            plan.append({"out": str(out / name(stage, method, tile)), "overrides": overrides})
    launch(2, plan, tmp)
    return out


@pytest.mark.parametrize(("stage", "method"), CASES)
def test_tiled_loss_trains_like_the_plain_loss(runs: Path, stage: int, method: str) -> None:
    # Only the order of fp32 additions differs (per tile, then over tiles), in the loss and in the head's
    # gradient; 1e-6 relative over 6 steps still catches a wrong scale (the loss-token normalization, or
    # DeepSpeed's 1/grad_accum_steps missed on the head weight, changes step 2 by ~1e-3).
    plain = losses(runs / name(stage, method, 0))
    tiled = losses(runs / name(stage, method, TILE))
    assert sorted(plain) == sorted(tiled) == list(range(1, STEPS + 1))
    for step in plain:
        assert tiled[step] == pytest.approx(plain[step], rel=1e-6), (step, tiled[step], plain[step])
    plain_val = val_losses(runs / name(stage, method, 0))
    tiled_val = val_losses(runs / name(stage, method, TILE))
    assert sorted(plain_val) == sorted(tiled_val) == [STEPS // 2, STEPS]
    for step in plain_val:
        assert tiled_val[step] == pytest.approx(plain_val[step], rel=1e-6), (step, tiled_val, plain_val)
