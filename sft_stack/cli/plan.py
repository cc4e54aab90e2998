"""``sft plan``: will this model train on this hardware, and with which DeepSpeed config?

    sft plan --model /models/llama-2-7b --gpus-per-node 8 --gpu-mem-gb 80 --nodes 2
    sft plan --params 13e9 --gpus-per-node 8 --gpu-mem-gb 80

The command only; the memory arithmetic and the recommendation are trainer/plan.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_stack.common.errors import user_error
from trainer.plan import Hardware, llama_shape, report, shape_from_config


def build_parser(prog: str = "python -m sft_stack.cli.plan") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="A local Hugging Face model directory (only config.json is read).")
    what.add_argument("--params", type=float, help="A parameter count such as 7e9 (a Llama's proportions are assumed).")
    parser.add_argument("--vocab", type=int, default=32000, help="The vocabulary size, with --params. Default: 32000.")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs on each node. Default: 8.")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="Memory of each GPU in GiB. Default: 80.")
    parser.add_argument("--nodes", type=int, default=1, help="Nodes. Default: 1.")
    parser.add_argument(
        "--cpu-mem-gb", type=float, default=1024.0, help="CPU memory of each node in GiB. Default: 1024."
    )
    parser.add_argument("--seq-len", type=int, default=4096, help="Tokens per row. Default: 4096.")
    parser.add_argument(
        "--micro-batch", type=int, default=1, help="Rows per GPU per micro-step (train.micro_batch_size). Default: 1."
    )
    parser.add_argument(
        "--lora-r", type=int, default=16, help="The LoRA rank (lora.r) of the LoRA and QLoRA rows. Default: 16."
    )
    parser.add_argument(
        "--loss-tile-tokens",
        type=int,
        default=0,
        help="train.loss_tile_tokens: compute the loss in tiles of this many tokens (0: the plain loss over the "
        "full logits). Default: 0.",
    )
    parser.add_argument(
        "--sequence-parallel-size",
        type=int,
        default=1,
        help="train.sequence_parallel_size: GPUs sharing each row (Ulysses); it divides the GPU count and the "
        "attention heads. Default: 1.",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.plan") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    gpus = args.gpus_per_node * args.nodes
    if args.sequence_parallel_size < 1 or gpus % args.sequence_parallel_size:
        parser.error(f"--sequence-parallel-size {args.sequence_parallel_size} must divide the {gpus} GPUs")
    if args.model is not None and not (args.model / "config.json").is_file():
        return user_error(f"--model {args.model}: no config.json there; pass a model directory, or --params N")
    shape = shape_from_config(args.model) if args.model is not None else llama_shape(args.params, args.vocab)
    hw = Hardware(
        gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb, nodes=args.nodes, cpu_mem_gb=args.cpu_mem_gb
    )
    print(
        report(
            shape, hw, args.seq_len, args.micro_batch, args.lora_r, args.loss_tile_tokens, args.sequence_parallel_size
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
