"""Launched by test_zero3_init.py under `deepspeed --num_gpus 2` (CPU, gloo). Writes RESULTS/rank{R}.json.

1. full, ZeRO-3, random_init: each rank holds half of every partitioned parameter; 3 steps; export.
2. lora, ZeRO-3: 3 steps; export the adapter.
3. qlora, ZeRO-2, data-parallel over 2 ranks: NF4 base + adapters train through the engine; export.
Each case saves the trained engine's logits on BATCH next to its export (OUT/<method>/expected_logits.pt);
the test reloads the exports in its own process, where no HfDeepSpeedConfig is alive.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch

from trainer.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from trainer.export import export_final
from trainer.model import load_model, param_groups

TINY_LLAMA = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_llama"
BATCH = torch.randint(3, 2000, (2, 12), generator=torch.Generator().manual_seed(0))


def run_config(root: Path, method: str, dtype: str) -> RunConfig:
    return RunConfig(
        model=ModelConfig(path=str(TINY_LLAMA), random_init=True, method=method, dtype=dtype),  # type: ignore[arg-type]
        data=DataConfig(path=str(root / "no_data")),
        train=TrainConfig(output_dir=str(root / method), max_steps=3, seed=5),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
    )


def ds_config(stage: int, dtype: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == "bf16"},
    }


def train_and_export(cfg: RunConfig, config: dict[str, Any], loaded: Any) -> tuple[Any, list[float], Path]:
    engine, *_ = deepspeed.initialize(
        model=loaded.model, model_parameters=param_groups(loaded.model, 0.0), config=config
    )
    # Each rank trains on its own rows, as data parallelism does.
    rows = BATCH.roll(torch.distributed.get_rank(), dims=0)
    losses = []
    for _ in range(3):
        loss = engine(input_ids=rows, labels=rows).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.module.eval()
    final = export_final(engine, loaded, cfg, Path(cfg.train.output_dir) / "final")
    return engine, losses, final


def engine_logits(engine: Any) -> torch.Tensor:
    with torch.no_grad():  # a ZeRO-3 forward is collective: every rank runs it
        return engine(input_ids=BATCH).logits.float()


def full_zero3(root: Path) -> dict[str, Any]:
    cfg = run_config(root, "full", "fp32")
    loaded = load_model(cfg, ds_config(3, "fp32"))
    params = list(loaded.model.parameters())
    result: dict[str, Any] = {
        "held": sum(p.ds_tensor.numel() for p in params),
        "whole": sum(p.ds_numel for p in params),
        "visible": sum(p.numel() for p in params),
    }
    engine, result["losses"], final = train_and_export(cfg, ds_config(3, "fp32"), loaded)
    torch.save(engine_logits(engine), final.parent / "expected_logits.pt")
    return result


def lora_zero3(root: Path) -> dict[str, Any]:
    cfg = run_config(root, "lora", "fp32")
    loaded = load_model(cfg, ds_config(3, "fp32"))
    engine, losses, final = train_and_export(cfg, ds_config(3, "fp32"), loaded)
    torch.save(engine_logits(engine), final.parent / "expected_logits.pt")
    return {"losses": losses}


def qlora_zero2(root: Path) -> dict[str, Any]:
    cfg = run_config(root, "qlora", "bf16")
    loaded = load_model(cfg, ds_config(2, "bf16"))
    engine, losses, final = train_and_export(cfg, ds_config(2, "bf16"), loaded)
    torch.save(engine_logits(engine), final.parent / "expected_logits.pt")
    return {"losses": losses}


def main() -> None:
    root = Path(sys.argv[-1])  # the launcher puts --local_rank=R before our own argument
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results = {}
    for name, case in (("full_zero3", full_zero3), ("lora_zero3", lora_zero3), ("qlora_zero2", qlora_zero2)):
        results[name] = case(root)
        gc.collect()  # drop the previous case's HfDeepSpeedConfig before the next model is built
    (root / f"rank{rank}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
