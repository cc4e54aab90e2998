"""Packed-row isolation under Ulysses sequence parallelism, on 2 ranks (run by test_sp_training.py):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/distributed/sp_packing_script.py --data DIR --model PATH \
        [--model PATH ...] --out OUT.json

For each ``--model`` (tiny_cpu.yaml with that model.path), the model exactly as a random_init run builds it (same
seed on both ranks). First each sample of the packed
train row with the most samples runs alone, without SP; then sequence parallelism is activated and the packed
row runs split in two shards, one per rank. Each rank computes per-token losses of its shard; gathered, they are
summed per sample. Rank 0 writes, per model path, both lists of per-sample summed losses and where the samples
and the shard boundary lie.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.schema import IGNORE_INDEX, load_manifest  # noqa: E402
from trainer import sequence_parallel  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import collate, open_split, split_packed_row  # noqa: E402
from trainer.loss import loss_sum  # noqa: E402
from trainer.model import build_random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", action="append", required=True, help="model.path; repeat for several models")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rows = open_split(args.data, "train", load_manifest(args.data))
    assert rows is not None
    packed = [(r["input_ids"], r["labels"], r["position_ids"]) for r in rows]
    row = max(packed, key=lambda r: len(split_packed_row(*r)))
    results = {path: isolation(args.data, path, row) for path in args.model}
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def isolation(data: str, model_path: str, row: tuple[list[int], list[int], list[int]]) -> dict[str, object]:
    """One model's per-sample summed losses alone and in the packed row under SP 2, and where samples lie."""
    cfg = load_config(
        ROOT / "configs" / "tiny_cpu.yaml",
        [
            f"data.path={data}",
            f"model.path={model_path}",
            "train.output_dir=unused",
            "train.micro_batch_size=1",
            "train.sequence_parallel_size=2",
        ],
    )
    model = build_random_model(cfg)
    model.config.use_cache = False
    pad_id = 0

    with torch.no_grad():
        alone = []
        for sample in split_packed_row(*row):
            batch = collate([sample], pad_id=pad_id, packed=False, isolate=True)
            logits = model(**batch.model_inputs("cpu"), use_cache=False).logits
            alone.append(float(loss_sum(logits, batch.labels)))

        sp = sequence_parallel.layout(dist.get_rank(), dist.get_world_size(), 2)
        whole = collate([row], pad_id=pad_id, packed=True, isolate=True)
        shard = sequence_parallel.shard_batch(whole, sp, pad_id=pad_id, rows=1)
        sequence_parallel.activate(model, 2, 1)
        try:
            logits = model(**shard.model_inputs("cpu"), use_cache=False).logits
        finally:
            sequence_parallel.deactivate()
        per_token = F.cross_entropy(logits[0].float(), shard.labels[0], ignore_index=IGNORE_INDEX, reduction="none")
        gathered = [torch.empty_like(per_token) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, per_token)
        row_losses = torch.cat(gathered)[: whole.position_ids.shape[1]]
        sample_of = torch.cumsum(whole.position_ids[0] == 0, dim=0) - 1
        in_sp = [float(row_losses[sample_of == k].sum()) for k in range(len(alone))]

    starts = [i for i, p in enumerate(row[2]) if p == 0]
    return {"alone": alone, "packed": in_sp, "starts": starts, "shard_width": shard.input_ids.shape[1]}


if __name__ == "__main__":
    main()
