"""Several training runs in one `deepspeed` launch, so the distributed tests pay the start-up cost once.

    DS_ACCELERATOR=cpu deepspeed --num_gpus N tests/distributed/scenarios.py --plan plan.json

plan.json: a list of runs ``{"out": DIR, "overrides": [...], "copy_from": DIR?}``, executed in order on every
rank, each one ``trainer.loop.train`` on configs/tiny_cpu.yaml + overrides (train.output_dir=out is added).
``copy_from`` copies a finished run's output directory first (e.g. to resume it on another world size).
The tests read each run's metrics.jsonl and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.ds_config import build_ds_config  # noqa: E402
from trainer.loop import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    for run in json.loads(Path(args.plan).read_text()):
        if run.get("copy_from") and dist.get_rank() == 0:
            shutil.rmtree(run["out"], ignore_errors=True)
            shutil.copytree(run["copy_from"], run["out"])
        dist.barrier()
        cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*run["overrides"], f"train.output_dir={run['out']}"])
        train(cfg, build_ds_config(cfg, dist.get_world_size()))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
