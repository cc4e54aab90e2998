"""A NaN loss in the real loop (one rank, gloo, ZeRO-2, fp32): `skip` drops that update, `stop` stops."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.loop as loop
from sft_stack.common.ports import free_port
from tests.helpers.data import make_prepared_dir
from trainer.config import load_config
from trainer.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    import deepspeed
    import torch.distributed as dist

    port = free_port()  # not the default port: another launcher may hold it
    saved = dict(os.environ)
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu"
    )
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def run(tmp: Path, data: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    original = loop.forward_loss_sum
    calls = {"n": 0}

    def poisoned(engine: Any, batch: Any, tile_tokens: int = 0) -> torch.Tensor:
        calls["n"] += 1
        loss = original(engine, batch, tile_tokens)
        return loss * float("nan") if calls["n"] == 5 else loss  # 2 micro-batches per step: step 3

    monkeypatch.setattr(loop, "forward_loss_sum", poisoned)
    out = tmp / mode
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"data.path={data}",
            f"train.output_dir={out}",
            "train.max_steps=4",
            f"train.on_nonfinite={mode}",
            f"deepspeed.config={ROOT / 'ds_configs/zero2.json'}",
            "tracking.enabled=false",
            "train.export=false",
            "eval.every_steps=0",
        ],
    )
    loop.train(cfg, build_ds_config(cfg, 1))
    return out


def test_skip_and_stop(one_rank_group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    data = make_prepared_dir(tmp_path / "data")
    out = run(tmp_path, data, "skip", monkeypatch)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "grad_norm" in r}
    assert "non-finite loss at step 3 on rank(s) [0]; optimizer step skipped" in capsys.readouterr().out
    assert train_rows[3]["loss"] is None and train_rows[3]["skipped_steps"] == 1
    assert train_rows[3]["grad_norm"] == float("inf")  # DeepSpeed saw the non-finite gradients and skipped
    assert all(train_rows[s]["loss"] < 8 for s in (1, 2, 4))  # the weights stayed finite

    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 3 on rank\(s\) \[0\]; stopping"):
        run(tmp_path, data, "stop", monkeypatch)
    assert not (tmp_path / "stop" / "checkpoints" / "latest_complete").exists()
