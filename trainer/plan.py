"""Memory planner: will this model train on this hardware, and with which DeepSpeed config?

    python -m trainer.plan --model /models/llama-2-7b --gpus-per-node 8 --gpu-mem-gb 80 --nodes 2
    python -m trainer.plan --params 13e9 --gpus-per-node 8 --gpu-mem-gb 80
    python -m trainer.plan --params 7e9 --seq-len 32768 --sequence-parallel-size 4 --loss-tile-tokens 4096

Model states (weights, gradients, optimizer) of full tuning come from DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``; ZeRO-1 has none and is
computed here with the same terms: 2 B weights + 2 B gradients on every GPU, 16 B fp32 split over the GPUs). LoRA
and QLoRA states are computed here (see ``lora_states`` / ``qlora_states``). Activations are a rough
estimate with gradient checkpointing (``activation_bytes``); with sequence parallelism (Ulysses) each GPU
holds 1/SP of every row's tokens while ZeRO still partitions states over all GPUs. A configuration fits when states + activations
stay under ``HEADROOM`` of GPU memory and its CPU side fits ``--cpu-mem-gb`` per node. The recommendation
is the first that fits, fastest first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
HEADROOM = 0.9
"""Fraction of GPU memory the plan may fill; the rest goes to the CUDA context, NCCL buffers, fragmentation."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    params: int
    """Total parameters."""
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_ratio: float
    """num_key_value_heads / num_attention_heads (1.0 without grouped-query attention)."""
    gated_mlp: bool = True
    """Gate, up and down MLP matrices (Llama); False: two matrices and a fused QKV (ChatGLM-6B v1)."""
    mask_heads: int = 0
    """Heads of the dense [micro, heads, seq, seq] bf16 mask our own classes hold through the step: ALiBi
    (Baichuan-13B) carries its bias in it, one per head; the ChatGLM-6B v1 prefix mask has one. 0: none."""


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpus_per_node: int
    gpu_mem_gb: float
    nodes: int
    cpu_mem_gb: float
    """CPU memory per node available to the job."""

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, kw_only=True)
class Option:
    name: str
    """What to set: method and ds_configs file."""
    gpu_bytes: int
    """Model states per GPU."""
    cpu_bytes: int
    """CPU memory per node (offloaded states, or the load-time copy)."""
    activation_bytes: int
    """Estimated activations per GPU."""

    def fits(self, hw: Hardware) -> bool:
        gpu_ok = self.gpu_bytes + self.activation_bytes <= HEADROOM * hw.gpu_mem_gb * GIB
        return gpu_ok and self.cpu_bytes <= hw.cpu_mem_gb * GIB


def llama_shape(params: float, vocab: int = 32000) -> ModelShape:
    """A Llama-proportioned shape for a bare parameter count: hidden = 128 x layers, MLP 8/3 x hidden.

    Per layer 4h^2 (attention) + 3 * h * 8h/3 (MLP) = 12h^2; plus 2 * vocab * h for embeddings and head.
    Llama-2-7B: 32 layers, hidden 4096 -> 6.7e9; 13B: 40 layers, 5120 -> 13.0e9.
    """

    def count(layers: int) -> int:
        hidden = 128 * layers
        return 12 * layers * hidden**2 + 2 * vocab * hidden

    layers = min(range(1, 257), key=lambda n: abs(count(n) - params))
    hidden = 128 * layers
    return ModelShape(
        params=int(params), hidden=hidden, layers=layers, intermediate=8 * hidden // 3, vocab=vocab, kv_ratio=1.0
    )


def shape_from_config(model_dir: Path) -> ModelShape:
    """The shape from config.json (Llama/Qwen/Mistral/Baichuan keys, or GPT-2/MOSS n_embd/n_layer keys)."""
    # Here, not at the top: the registry imports torch and the model classes (about 10 s), which --params skips.
    from trainer.families import family_of_config

    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    hidden = raw.get("hidden_size", raw.get("n_embd"))
    layers = raw.get("num_hidden_layers", raw.get("n_layer", raw.get("num_layers")))
    if hidden is None or layers is None:
        raise SystemExit(f"{model_dir}/config.json: no hidden_size/num_hidden_layers; use --params instead")
    intermediate = raw.get(
        "intermediate_size",
        raw.get("n_inner") or raw.get("ffn_hidden_size") or raw.get("inner_hidden_size") or 4 * hidden,
    )
    vocab = raw.get("vocab_size", raw.get("padded_vocab_size", 32000))
    heads = raw.get("num_attention_heads", raw.get("n_head", 1))
    kv_heads = raw.get("num_key_value_heads", raw.get("multi_query_group_num", heads))
    # The family's facts (an original checkpoint counts as the family the converter turns it into): ChatGLM-6B v1
    # and Baichuan-13B/2-13B keep a dense float mask (ModelShape.mask_heads); ChatGLM-6B v1 has no gated MLP.
    family = family_of_config(raw)
    gated = "intermediate_size" in raw and family.gated_mlp  # Llama-style MLPs have gate, up and down matrices
    attention = hidden * hidden * (2 + 2 * kv_heads / heads)
    mlp = (3 if gated else 2) * hidden * intermediate
    head = 1 if raw.get("tie_word_embeddings", False) else 2
    params = layers * (attention + mlp) + head * vocab * hidden
    return ModelShape(
        params=int(params),
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        vocab=vocab,
        kv_ratio=kv_heads / heads,
        gated_mlp=gated,
        mask_heads={"none": 0, "one": 1, "per_head": heads}[family.dense_mask],
    )


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters with r on q,k,v,o,gate,up,down (or, without a gated MLP, on the fused QKV, the
    attention output and the two MLP matrices): r x (in + out) per matrix per layer."""
    h, i = shape.hidden, shape.intermediate
    kv = int(h * shape.kv_ratio)
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    if not shape.gated_mlp:
        per_layer = (h + h + 2 * kv) + (h + h) + (h + i) + (i + h)
    return shape.layers * r * per_layer


def activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, loss_tile_tokens: int = 0, sequence_parallel: int = 1
) -> int:
    """Rough activations per GPU with gradient checkpointing and flash/sdpa attention (no seq^2 term).

    Saved layer inputs: layers x tokens x hidden x 2 B; one layer recomputed: about 34 x tokens x hidden B
    (Korthikanti et al. 2022, without the attention-score term); fp32 logits and their gradient:
    2 x tokens x vocab x 4 B, or with the tiled loss (``train.loss_tile_tokens``) the same for one tile; the dense
    mask of our own classes: micro x mask_heads x seq^2 x 2 B. Sequence parallelism (``sequence_parallel`` ranks
    per row) divides the tokens per GPU: inside attention a GPU holds the whole row for 1/SP of the heads, the
    same bytes as its shard for all heads.
    """
    tokens = math.ceil(seq_len / sequence_parallel) * micro_batch
    logit_tokens = min(tokens, loss_tile_tokens) if loss_tile_tokens > 0 else tokens
    mask = micro_batch * shape.mask_heads * seq_len**2 * 2
    return (
        shape.layers * tokens * shape.hidden * 2
        + 34 * tokens * shape.hidden
        + 2 * logit_tokens * shape.vocab * 4
        + mask
    )


def largest_layer_params(shape: ModelShape) -> int:
    """The biggest single matrix ZeRO-3 gathers at once: the embedding or an MLP matrix."""
    return max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)


def zero1_states(params: int, gpus: int) -> int:
    """DeepSpeed's ZeRO-2 terms with the bf16 gradients unpartitioned: 2 B weights + 2 B gradients on every GPU,
    and 16 B (fp32 gradients, master weights, two Adam moments) split over the GPUs."""
    return 4 * params + math.ceil(16 * params / gpus)


def lora_states(shape: ModelShape, adapter: int) -> int:
    """Frozen bf16 base (2 B/param) + adapters with bf16 weights/grads and fp32 master + moments (16 B/param)."""
    return 2 * shape.params + 16 * adapter


def qlora_states(shape: ModelShape, adapter: int) -> int:
    """NF4 linear weights with double quantization, fp32 embeddings/head, adapters as in LoRA.

    NF4: 4 bits per weight + 8-bit absmax per 64 weights + fp32 absmax-of-absmax per 256 blocks
    = 4 + 8/64 + 32/(64*256) = 4.127 bits. prepare_model_for_kbit_training keeps the non-quantized
    embedding and head in fp32 (4 B/param).
    """
    embeddings = 2 * shape.vocab * shape.hidden
    linear = shape.params - embeddings
    return math.ceil(linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8) + 4 * embeddings + 16 * adapter


def options(
    shape: ModelShape,
    hw: Hardware,
    seq_len: int,
    micro_batch: int,
    lora_r: int,
    loss_tile_tokens: int = 0,
    sequence_parallel: int = 1,
) -> list[Option]:
    """Every configuration, fastest first (the order the recommendation scans)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p, gpn, nodes = shape.params, hw.gpus_per_node, hw.nodes
    act = activation_bytes(shape, seq_len, micro_batch, loss_tile_tokens, sequence_parallel)
    largest = largest_layer_params(shape)
    # Load-time copy on the CPU without zero.Init: every local rank holds fp32 weights (DeepSpeed's own term).
    load_cpu = int(p * 4 * gpn * 1.5)
    z2_cpu, z2_gpu = estimate_zero2_model_states_mem_needs(p, gpn, nodes, cpu_offload=False)
    z2o_cpu, z2o_gpu = estimate_zero2_model_states_mem_needs(p, gpn, nodes, cpu_offload=True)
    z3_cpu, z3_gpu, _ = estimate_zero3_model_states_mem_needs(p, largest, gpn, nodes, cpu_offload=False)
    z3o_cpu, z3o_gpu, _ = estimate_zero3_model_states_mem_needs(p, largest, gpn, nodes, cpu_offload=True)
    adapter = lora_params(shape, lora_r)
    return [
        Option(name="full ds_configs/zero1.json", gpu_bytes=zero1_states(p, hw.gpus), cpu_bytes=load_cpu,
               activation_bytes=act),
        Option(name="full ds_configs/zero2.json", gpu_bytes=z2_gpu, cpu_bytes=z2_cpu, activation_bytes=act),
        Option(name="full ds_configs/zero3.json", gpu_bytes=z3_gpu, cpu_bytes=z3_cpu, activation_bytes=act),
        Option(name="full ds_configs/zero2_offload.json", gpu_bytes=z2o_gpu, cpu_bytes=z2o_cpu,
               activation_bytes=act),
        Option(name="full ds_configs/zero3_offload.json", gpu_bytes=z3o_gpu, cpu_bytes=z3o_cpu,
               activation_bytes=act),
        Option(name=f"lora r={lora_r} ds_configs/zero2.json", gpu_bytes=lora_states(shape, adapter),
               cpu_bytes=int(2 * p * gpn), activation_bytes=act),
        Option(name=f"qlora r={lora_r} (one GPU or ds_configs/zero2.json)", gpu_bytes=qlora_states(shape, adapter),
               cpu_bytes=int(2 * p * gpn), activation_bytes=act),
    ]  # fmt: skip


def recommend(opts: list[Option], hw: Hardware) -> Option | None:
    return next((option for option in opts if option.fits(hw)), None)


def report(
    shape: ModelShape,
    hw: Hardware,
    seq_len: int,
    micro_batch: int,
    lora_r: int,
    loss_tile_tokens: int = 0,
    sequence_parallel: int = 1,
) -> str:
    opts = options(shape, hw, seq_len, micro_batch, lora_r, loss_tile_tokens, sequence_parallel)
    loss = f", tiled loss {loss_tile_tokens} tokens/tile" if loss_tile_tokens > 0 else ""
    if sequence_parallel > 1:
        loss += f", sequence parallel {sequence_parallel}: {math.ceil(seq_len / sequence_parallel)} tokens/GPU"
    lines = [
        f"model: {shape.params / 1e9:.2f}B params ({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}); "
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU x {hw.gpu_mem_gb:g} GiB, "
        f"{hw.cpu_mem_gb:g} GiB CPU/node",
        f"activations (checkpointed, seq {seq_len} x micro {micro_batch}{loss}): "
        f"{activation_bytes(shape, seq_len, micro_batch, loss_tile_tokens, sequence_parallel) / GIB:.1f} GiB/GPU",
        f"{'configuration':<52} {'states/GPU':>10} {'+act/GPU':>9} {'GPU/node':>9} {'CPU/node':>9}  fits",
    ]
    for o in opts:
        total = o.gpu_bytes + o.activation_bytes
        lines.append(
            f"{o.name:<52} {o.gpu_bytes / GIB:>9.1f}G {total / GIB:>8.1f}G "
            f"{total * hw.gpus_per_node / GIB:>8.1f}G {o.cpu_bytes / GIB:>8.1f}G  {'yes' if o.fits(hw) else 'no'}"
        )
    best = recommend(opts, hw)
    if best is None:
        hint = "" if loss_tile_tokens > 0 else ", set train.loss_tile_tokens (--loss-tile-tokens)"
        if sequence_parallel < hw.gpus:
            hint += ", raise train.sequence_parallel_size (--sequence-parallel-size)"
        lines.append(f"verdict: nothing fits; add GPUs or nodes, shorten sequences, or lower micro_batch_size{hint}")
    else:
        used = (best.gpu_bytes + best.activation_bytes) / GIB
        lines.append(f"verdict: {best.name} ({used:.1f} of {hw.gpu_mem_gb:g} GiB per GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="a local HF model directory (reads config.json only)")
    what.add_argument("--params", type=float, help="a parameter count such as 7e9 (Llama proportions assumed)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size, with --params")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU in GiB")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cpu-mem-gb", type=float, default=1024.0, help="CPU memory per node in GiB")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--micro-batch", type=int, default=1, help="train.micro_batch_size")
    parser.add_argument("--lora-r", type=int, default=16, help="lora.r for the LoRA/QLoRA rows")
    parser.add_argument(
        "--loss-tile-tokens", type=int, default=0, help="train.loss_tile_tokens (0: the plain loss over full logits)"
    )
    parser.add_argument(
        "--sequence-parallel-size",
        type=int,
        default=1,
        help="train.sequence_parallel_size: GPUs sharing each row (Ulysses); divides the GPU count and the heads",
    )
    args = parser.parse_args(argv)
    gpus = args.gpus_per_node * args.nodes
    if args.sequence_parallel_size < 1 or gpus % args.sequence_parallel_size:
        parser.error(f"--sequence-parallel-size {args.sequence_parallel_size} must divide the {gpus} GPUs")
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
