"""Peak memory per rank of one training micro-step against sequence length: plain vs tiled loss, SP 1 vs 2.

    python benchmarks/bench_long_context.py                         # seq 2k,4k,8k; Llama shape below; CPU or GPU
    python benchmarks/bench_long_context.py --seq 2048,4096,8192,16384 --sp 1,2 --out benchmarks/results/long_context.json

One row of ``seq`` tokens through a random-init Llama (``--layers`` x ``--hidden``, ``--vocab``, sdpa, gradient
checkpointing off), forward + loss + backward, once with the plain loss (``trainer.loop.loss_sum`` on the full
logits) and once with ``trainer.tiled_loss`` (``--tile`` tokens per tile). Each measurement runs in a fresh
child process: on CUDA the peak is ``torch.cuda.max_memory_allocated`` during the step, on CPU the growth of
the peak resident set (``ru_maxrss``) over the step, measured after a warm-up step at 128 tokens so allocator
and library start-up are not counted. With ``--sp 2`` the row is split over 2 processes (Ulysses, through
``trainer.sequence_parallel`` exactly as the loop uses it; gloo on CPU, NCCL on GPUs) and the row reports
the larger of the ranks' peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(seq: int, tile: int, sp: int, layers: int, hidden: int, vocab: int) -> dict[str, Any]:
    """One micro-step in this process (the child; with sp > 1 one of sp ranks started by ``run_children``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # The trainer (and torch) in the measuring child only: the parent just starts the ranks and reads their JSON.
    sys.path.insert(0, str(ROOT))
    from trainer import sequence_parallel
    from trainer.data import collate
    from trainer.loss import loss_sum
    from trainer.tiled_loss import forward_tiled_loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = 0
    if sp > 1:
        import deepspeed

        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=vocab,
        max_position_embeddings=max(seq, 128),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    sequence_parallel.activate(model, sp, 1)
    layout = sequence_parallel.layout(rank, sp, sp)

    def step(length: int) -> float:
        ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        batch = collate([(ids, ids, list(range(length)))], pad_id=0, packed=True, isolate=True)
        batch = sequence_parallel.shard_batches([batch], layout, pad_id=0, rows=1)[0]
        inputs, labels = batch.model_inputs(device), batch.labels.to(device)
        if tile:
            loss = forward_tiled_loss_sum(model, inputs, labels, tile, batch.labels_shifted)
        else:
            loss = loss_sum(model(**inputs, use_cache=False).logits, labels, batch.labels_shifted)
        loss.backward()
        model.zero_grad(set_to_none=True)
        total = loss.detach().double()
        if sp > 1:
            torch.distributed.all_reduce(total)  # each rank's loss covers its shard's tokens
        return float(total) / (length - 1)

    step(128)  # warm-up: allocator, kernels, lazy imports
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = step(seq)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "seq": seq,
        "tile": tile,
        "sp": sp,
        "rank": rank,
        "peak_step_bytes": peak,
        "peak_step_gib": round(peak / 2**30, 3),
        "full_fp32_logits_gib": round(seq * vocab * 4 / 2**30, 3),
        "step_s": round(time.perf_counter() - started, 2),
        "loss": round(loss, 5),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }


def run_children(seq: int, tile: int, sp: int, shape: list[str]) -> dict[str, Any]:
    """Measure in fresh processes (sp of them, one per rank of a sequence-parallel group); the largest peak."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    children = []
    for rank in range(sp):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(sp)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        child = [sys.executable, __file__, "--child", f"{seq}:{tile}:{sp}", *shape]
        children.append(subprocess.Popen(child, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [child.communicate() for child in children]
    if any(child.returncode != 0 for child in children):
        errors = [err.strip().splitlines()[-1:] for _, err in outputs]
        return {"seq": seq, "tile": tile, "sp": sp, "error": errors}
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    worst = max(rows, key=lambda row: row["peak_step_bytes"])
    return {**worst, "rank_peaks_gib": [row["peak_step_gib"] for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="2048,4096,8192", help="comma list of sequence lengths")
    parser.add_argument("--tile", type=int, default=1024, help="tokens per tile for the tiled runs")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sp", default="1", help="comma list of sequence-parallel sizes (processes per row)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seq, tile, sp = (int(x) for x in args.child.split(":"))
        print(json.dumps(measure(seq, tile, sp, args.layers, args.hidden, args.vocab)))
        return
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    rows = []
    sizes = [int(s) for s in args.sp.split(",")]
    for seq in (int(s) for s in args.seq.split(",")):
        for sp in sizes:
            for tile in (0, args.tile):
                rows.append(run_children(seq, tile, sp, shape))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {
        "shape": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "rows": 1},
        "sequence_parallel_sizes": sizes,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
