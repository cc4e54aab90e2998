"""Peak memory of one training micro-step against sequence length, plain loss vs tiled loss; prints JSON.

    python benchmarks/bench_long_context.py                         # seq 2k,4k,8k; Llama shape below; CPU or GPU
    python benchmarks/bench_long_context.py --seq 2048,4096,8192,16384 --out benchmarks/results/long_context.json

One row of ``seq`` tokens through a random-init Llama (``--layers`` x ``--hidden``, ``--vocab``, sdpa, gradient
checkpointing off), forward + loss + backward, once with the plain loss (``trainer.loop.loss_sum`` on the full
logits) and once with ``trainer.tiled_loss`` (``--tile`` tokens per tile). Each measurement runs in a fresh
child process: on CUDA the peak is ``torch.cuda.max_memory_allocated`` during the step, on CPU the growth of
the peak resident set (``ru_maxrss``) over the step, measured after a warm-up step at 128 tokens so allocator
and library start-up are not counted. Sequence parallelism (Ulysses) is not built yet: SP 1 only.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(seq: int, tile: int, layers: int, hidden: int, vocab: int) -> dict[str, Any]:
    """One micro-step in this process (the child)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from trainer.loss import loss_sum
    from trainer.tiled_loss import forward_tiled_loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    def step(length: int) -> float:
        ids = torch.randint(0, vocab, (1, length), device=device)
        inputs = {"input_ids": ids}
        if tile:
            loss = forward_tiled_loss_sum(model, inputs, ids, tile)
        else:
            loss = loss_sum(model(**inputs, use_cache=False).logits, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss) / (length - 1)

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
        "peak_step_bytes": peak,
        "peak_step_gib": round(peak / 2**30, 3),
        "full_fp32_logits_gib": round(seq * vocab * 4 / 2**30, 3),
        "step_s": round(time.perf_counter() - started, 2),
        "loss": round(loss, 5),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="2048,4096,8192", help="comma list of sequence lengths")
    parser.add_argument("--tile", type=int, default=1024, help="tokens per tile for the tiled runs")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        seq, tile = (int(x) for x in args.child.split(":"))
        print(json.dumps(measure(seq, tile, args.layers, args.hidden, args.vocab)))
        return
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    rows = []
    for seq in (int(s) for s in args.seq.split(",")):
        for tile in (0, args.tile):
            child = [sys.executable, __file__, "--child", f"{seq}:{tile}", *shape]
            result = subprocess.run(child, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                rows.append({"seq": seq, "tile": tile, "error": result.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = {
        "shape": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "rows": 1},
        "sequence_parallel_size": 1,
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
