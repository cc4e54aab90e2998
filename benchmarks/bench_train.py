"""Training throughput, MFU and peak memory of the project's own trainer on one GPU; prints JSON.

    python benchmarks/bench_train.py --case full_1b            # one case on the GPU, writes results/full_1b.json
    python benchmarks/bench_train.py --case qlora_7b --dry-run # tiny shape, a few steps, CPU is fine (CI)
    python benchmarks/bench_train.py --case full_1b --liger --compile --name full_1b_liger_compile

Each case builds a random-weight Llama from a config (nothing is downloaded), prepares a synthetic corpus with a
realistic length distribution through data_pipeline (packed), and trains it with ``launcher/run.py`` in a
subprocess: the numbers are the product's, read back from its metrics.jsonl. The first ``--warmup`` steps are
left out of the measured window. MFU goes through trainer.metrics (train_flops, mfu), the functions the training
log uses, with the step's tokens and attention term replayed from trainer.data.TrainData; the time-weighted MFU
the trainer itself logged over the same window is recorded beside it as ``mfu_logged``.

Cases (issue 6): full_1b (full bf16, 22 layers x 2048, seq 4096), qlora_7b (NF4 + LoRA r=16 on all linear layers,
seq 2048, against HF Trainer + PEFT + bitsandbytes on the same model, data, batch and checkpointing),
full_7b_offload (full 7B, ZeRO-2 with the optimizer on the CPU), lora_7b (bf16 base + LoRA r=16).

Levers are flags so that each can be measured on its own: --liger, --compile, --grad-ckpt/--no-grad-ckpt,
--attn, --ds-set (bucket sizes, overlap), --log-every (host syncs for logging), --micro-batch/--grad-accum.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import random
import runpy
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare  # noqa: E402
from data_pipeline.schema import load_manifest  # noqa: E402
from sft_stack.common.memory import peak_rss_mib  # noqa: E402
from sft_stack.common.tokenizer import load_tokenizer  # noqa: E402
from trainer.data import DataCursor, TrainData, collate, open_split, pad_id_for  # noqa: E402
from trainer.families import resolve_family  # noqa: E402
from trainer.metrics import mfu, peak_flops, train_flops  # noqa: E402
from trainer.model import count_params as trainer_count  # noqa: E402
from trainer.model import quantization_config  # noqa: E402

LLAMA2_TOKENIZER = REPO / "tests" / "fixtures" / "tokenizers" / "llama2_sentencepiece"
WORDS_SOURCE = REPO / "tests" / "fixtures" / "real" / "alpaca" / "alpaca_en_demo.json"
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000  # the Llama 2 tokenizer's


@dataclass(frozen=True)
class Case:
    name: str
    shape: Shape
    method: str
    """full | lora | qlora (model.method)."""
    seq: int
    micro_batch_size: int
    grad_accum_steps: int
    ds_config: str
    gradient_checkpointing: bool
    steps: int
    warmup: int
    """Leading steps left out of the measurement (allocator warm-up, JIT, compile)."""
    baseline: bool = False
    """Also run HF Trainer + PEFT + bitsandbytes with the same model, data and batch."""


TINYLLAMA_1B = Shape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4)
LLAMA2_7B = Shape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32)
DRY_RUN_SHAPE = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2)

CASES = {
    case.name: case
    for case in (
        # 4 rows x 4096 = 16k tokens per step; activations without checkpointing fit in 80 GB at 1.1B.
        Case("full_1b", TINYLLAMA_1B, "full", 4096, 4, 1, "ds_configs/zero2.json", False, steps=25, warmup=5),
        Case("qlora_7b", LLAMA2_7B, "qlora", 2048, 4, 1, "ds_configs/zero2.json", True, steps=20, warmup=4,
             baseline=True),
        # bf16 weights + grads on the GPU (27 GB), fp32 master + Adam moments on the CPU (84 GB of host memory).
        Case("full_7b_offload", LLAMA2_7B, "full", 2048, 2, 1, "ds_configs/zero2_offload.json", True, steps=8,
             warmup=2),
        Case("lora_7b", LLAMA2_7B, "lora", 2048, 4, 1, "ds_configs/zero2.json", True, steps=20, warmup=4),
    )
}  # fmt: skip


def dry_run(case: Case) -> Case:
    """The same case at a tiny shape and a few steps: exercises every code path in seconds on a CPU."""
    return dataclasses.replace(
        case, shape=DRY_RUN_SHAPE, seq=128, micro_batch_size=2, grad_accum_steps=1, steps=3, warmup=1
    )


# -- model and data --


def write_model_dir(path: Path, shape: Shape, seq: int) -> Path:
    """config.json of a Llama of ``shape`` + the Llama 2 tokenizer: what model.path with random_init needs."""
    from transformers import LlamaConfig, LlamaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = LlamaTokenizerFast.from_pretrained(LLAMA2_TOKENIZER)
    tokenizer.save_pretrained(path)
    LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(seq, 4096),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return path


def sample_lengths(n: int, seed: int, max_len: int) -> list[int]:
    """Conversation lengths in tokens: log-normal, median 300, sigma 0.9 (mean ~450, p99 ~2400), like a mix of
    Alpaca-style (~150 tokens) and ShareGPT-style (~1000+) SFT data; clipped to [32, max_len]."""
    rng = random.Random(seed)
    return [min(max_len, max(32, int(rng.lognormvariate(math.log(300), 0.9)))) for _ in range(n)]


def write_corpus(path: Path, n_records: int, seed: int, max_len: int) -> Path:
    """Alpaca-format JSON lines of English words drawn from the Alpaca sample; 30% prompt, 70% response."""
    words = sorted({w for rec in json.loads(WORDS_SOURCE.read_text(encoding="utf-8")) for w in rec["output"].split()})
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for length in sample_lengths(n_records, seed, max_len):
            n_words = max(4, int(length / 1.4))  # ~1.4 Llama 2 tokens per English word
            prompt = max(1, int(n_words * 0.3))
            text = rng.choices(words, k=n_words)
            record = {"instruction": " ".join(text[:prompt]), "input": "", "output": " ".join(text[prompt:])}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def prepare_data(work: Path, model_dir: Path, case: Case) -> Path:
    """A packed prepared directory with enough rows for every step of the case (reused when present)."""
    rows_needed = case.steps * case.micro_batch_size * case.grad_accum_steps
    # Packed rows fill ~95% of seq; 450 tokens per record on average; 20% spare.
    n_records = int(rows_needed * case.seq * 0.95 / 450 * 1.2) + 64
    out = work / f"data_seq{case.seq}_n{n_records}"
    if (out / "manifest.json").is_file():
        return out
    corpus = write_corpus(work / f"corpus_n{n_records}.jsonl", n_records, seed=0, max_len=case.seq)
    prepare(
        PrepareOptions(
            sources=(SourceSpec(path=str(corpus)),),
            tokenizer=str(model_dir),
            out=str(out),
            pack=True,
            max_seq_len=case.seq,
            val_fraction=0.01,
            workers=max(1, min(8, (os.cpu_count() or 1) // 2)),
            progress=False,
        )
    )
    return out


# -- the run --


@dataclass(frozen=True)
class Levers:
    liger: bool
    compile: bool
    attn: str
    log_every: int
    ds_set: tuple[str, ...]


def write_ds_config(work: Path, case: Case, ds_set: tuple[str, ...]) -> Path:
    """The case's ds_configs JSON with --ds-set KEY.PATH=JSON overrides (e.g. zero_optimization.reduce_bucket_size=2e8)."""
    ds = json.loads((REPO / case.ds_config).read_text(encoding="utf-8"))
    for item in ds_set:
        dotted, _, text = item.partition("=")
        node = ds
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(text)
    path = work / "ds_config.json"
    path.write_text(json.dumps(ds, indent=2) + "\n", encoding="utf-8")
    return path


def run_config(case: Case, model_dir: Path, data_dir: Path, out: Path, ds_config: Path, levers: Levers) -> dict:
    return {
        "model": {
            "path": str(model_dir),
            "random_init": True,
            "method": case.method,
            "dtype": "bf16",
            "attn_implementation": levers.attn,
            "gradient_checkpointing": case.gradient_checkpointing,
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(data_dir), "verify_shards": False},
        "train": {
            "output_dir": str(out),
            "max_steps": case.steps,
            "micro_batch_size": case.micro_batch_size,
            "grad_accum_steps": case.grad_accum_steps,
            "lr": 1.0e-5,
            "log_every_steps": levers.log_every,
            "resume": "never",
            "export": False,
        },
        "deepspeed": {"config": str(ds_config)},
        "eval": {"every_steps": 0, "max_batches": 1},
        "tracking": {"enabled": False},
    }


def run_logged(argv: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a subprocess with its output in ``log``; on failure raise with the log's tail."""
    with log.open("w", encoding="utf-8") as handle:
        result = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {result.returncode}; {log} ends with:\n{tail}")


def pad_token_id(model_dir: Path) -> int:
    """The padding id the trainer uses (trainer.data.pad_id_for) for the tokenizer in ``model_dir``."""
    return pad_id_for(load_tokenizer(model_dir))


def train_rows(metrics: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if "loss" in row]


# -- measurement --


def replay_steps(data_dir: Path, case: Case, pad_id: int, steps: int) -> list[tuple[int, int]]:
    """(tokens, sum_seq_sq) of each optimizer step, from the trainer's own data order (world size 1)."""
    manifest = load_manifest(data_dir)
    data = TrainData(
        open_split(data_dir, "train", manifest),
        packed=manifest.packed,
        isolate=resolve_family("auto", "llama").supports_packed_positions,
        pad_id=pad_id,
        seed=42,  # train.seed's default, which run_config leaves alone
        micro_batch_size=case.micro_batch_size,
        grad_accum_steps=case.grad_accum_steps,
        rank=0,
        world_size=1,
        source=str(data_dir),
    )
    cursor, out = DataCursor(), []
    for _ in range(steps):
        batches, cursor = data.next_step(cursor)
        out.append((sum(b.tokens for b in batches), sum(b.sum_seq_sq for b in batches)))
    return out


def count_params(model_dir: Path, method: str) -> tuple[int, int]:
    """(trainable, total) as trainer.model.count_params counts them, on a meta-device copy (no memory)."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        if method in ("lora", "qlora"):
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return trainer_count(model)


def measure(
    rows: list[dict[str, Any]],
    replayed: list[tuple[int, int]],
    warmup: int,
    *,
    n_params: int,
    n_trainable: int,
    shape: Shape,
    peak: float | None,
) -> dict[str, Any]:
    """Throughput and MFU over the steps after ``warmup``, from the trainer's log rows.

    The window runs from the last row at or before step ``warmup`` (or the start) to the last row; with
    train.log_every_steps > 1 it snaps to logged steps.
    """
    anchors = [i for i, row in enumerate(rows) if row["step"] <= warmup] if warmup else []
    if not rows or (anchors and anchors[-1] == len(rows) - 1):
        raise RuntimeError(f"no logged steps after warmup={warmup}: logged steps {[row['step'] for row in rows]}")
    start: dict[str, Any] = rows[anchors[-1]] if anchors else {"step": 0, "elapsed_s": 0.0, "tokens_seen": 0}
    last = rows[-1]
    elapsed = last["elapsed_s"] - start["elapsed_s"]
    window = replayed[start["step"] : last["step"]]
    tokens = sum(t for t, _ in window)
    logged_tokens = last["tokens_seen"] - start["tokens_seen"]
    if tokens != logged_tokens:
        raise RuntimeError(
            f"replayed data gives {tokens} tokens for steps {start['step'] + 1}..{last['step']}, the log {logged_tokens}"
        )
    sum_seq_sq = sum(s for _, s in window)
    flops = train_flops(
        n_params=n_params,
        n_trainable=n_trainable,
        n_layers=shape.layers,
        hidden=shape.hidden,
        tokens=tokens,
        sum_seq_sq=sum_seq_sq,
    )
    # What the training log itself said over the same window, time-weighted (None where the peak is unknown).
    after = rows[anchors[-1] :] if anchors else [start, *rows]
    logged = [(row["mfu"], row["elapsed_s"] - prev["elapsed_s"]) for prev, row in itertools.pairwise(after)]
    mfu_logged = None
    if all(m is not None for m, _ in logged):
        mfu_logged = sum(m * dt for m, dt in logged) / sum(dt for _, dt in logged)
    return {
        "steps_measured": last["step"] - start["step"],
        "tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "sum_seq_sq": sum_seq_sq,
        "flops": flops,
        "mfu": mfu(flops, elapsed, 1, peak),
        "mfu_logged": mfu_logged,
        "peak_mem_gb": max(row["mem_gb"] for row in rows),
        "final_loss": last["loss"],
    }


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gb": props.total_memory / GIB,
            "cuda": torch.version.cuda,
            "host": platform.node(),
            "cpus": os.cpu_count(),
        }
    return {"name": f"CPU ({platform.processor() or platform.machine()})", "count": 0, "cpus": os.cpu_count()}


def versions() -> dict[str, str | None]:
    import importlib.metadata as metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "peft", "bitsandbytes", "liger-kernel", "flash-attn", "triton"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_case(case: Case, levers: Levers, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    work = Path(args.work_dir) / case.name
    work.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(work / f"model_{case.shape.layers}x{case.shape.hidden}", case.shape, case.seq)
    data_dir = prepare_data(work, model_dir, case)
    ds_config = write_ds_config(work, case, levers.ds_set)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    config = run_config(case, model_dir, data_dir, out, ds_config, levers)
    (work / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    worker = [sys.executable, str(Path(__file__).resolve()), "worker", "--config", str(work / "run.yaml")]
    worker += ["--liger"] * levers.liger + ["--compile"] * levers.compile
    started = time.monotonic()
    run_logged(worker, work / "ours.log", env)
    wall_s = time.monotonic() - started

    pad_id = pad_token_id(model_dir)
    rows = train_rows(out / "metrics.jsonl")
    trainable, total = count_params(model_dir, case.method)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_info()["name"])
    result: dict[str, Any] = {
        "name": args.name or case.name + ("_dryrun" if args.dry_run else ""),
        "case": case.name,
        "dry_run": args.dry_run,
        "device": device_info(),
        "versions": versions(),
        "config": {"case": dataclasses.asdict(case), "levers": dataclasses.asdict(levers), "run": config},
        "world_size": 1,
        "n_params": total,
        "n_trainable": trainable,
        "n_layers": case.shape.layers,
        "hidden": case.shape.hidden,
        "peak_flops": peak,
        **measure(
            rows,
            replay_steps(data_dir, case, pad_id, len(rows)),
            case.warmup,
            n_params=total,
            n_trainable=trainable,
            shape=case.shape,
            peak=peak,
        ),
        "wall_s": wall_s,
    }
    if case.baseline and not args.no_baseline:
        baseline_json = work / "baseline.json"
        run_logged(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "baseline",
                "--config",
                str(work / "run.yaml"),
                "--base",
                str(out / "random_init_base"),
                "--warmup",
                str(case.warmup),
                "--out",
                str(baseline_json),
            ],
            work / "baseline.log",
            env,
        )
        baseline = json.loads(baseline_json.read_text(encoding="utf-8"))
        result["baseline_tokens_per_s"] = baseline["tokens_per_s"]
        result["baseline_peak_mem_gb"] = baseline["peak_mem_gb"]
        result["baseline"] = baseline
        result["speedup"] = result["tokens_per_s"] / baseline["tokens_per_s"]
        result["peak_mem_ratio"] = result["peak_mem_gb"] / baseline["peak_mem_gb"]
    return result


# -- subprocess entry points --


def worker_main(argv: list[str]) -> None:
    """launcher/run.py, run as a script (not imported), after applying the levers that need the process."""
    parser = argparse.ArgumentParser(prog="bench_train.py worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--liger", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    # DeepSpeed (and the loop, which imports it) only in the worker process: the parent and the baseline never use it.
    import deepspeed

    from trainer import loop

    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # The loop computes the loss from logits itself, so liger's fused linear + cross-entropy cannot apply
        # without a loop change; the norm, SwiGLU and RoPE kernels can.
        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    if args.compile:
        initialize = deepspeed.initialize

        def initialize_and_compile(*a: Any, **k: Any) -> Any:
            engine, *rest = initialize(*a, **k)
            engine.compile()
            return (engine, *rest)

        deepspeed.initialize = initialize_and_compile

    def skip_save(_run: Any, _cfg: Any, state: Any) -> Any:
        # The final checkpoint is not part of the measurement, and a 7B full one (~100 GB with Adam) would not fit
        # the benchmark machine's disk. The loop continues with the state it would have saved.
        print("bench_train: checkpoint save skipped", flush=True)
        return state

    loop.save = skip_save  # type: ignore[assignment]
    sys.argv = [str(REPO / "launcher" / "run.py"), "--config", args.config]
    runpy.run_path(str(REPO / "launcher" / "run.py"), run_name="__main__")


def baseline_main(argv: list[str]) -> None:
    """HF Trainer + PEFT + bitsandbytes on the same base weights, data rows, batch and checkpointing."""
    parser = argparse.ArgumentParser(prog="bench_train.py baseline")
    parser.add_argument("--config", required=True, help="the run.yaml our run used")
    parser.add_argument("--base", required=True, help="the random base our run wrote (OUT/random_init_base)")
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import torch

    config = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    cuda = torch.cuda.is_available()
    model = baseline_model(config, args.base, cuda)
    tokens_per_micro, step_times = train_baseline(model, config, Path(args.out).parent / "hf_out", cuda)
    accum, warmup = config["train"]["grad_accum_steps"], args.warmup
    tokens = sum(tokens_per_micro[warmup * accum : len(step_times) * accum])
    elapsed = step_times[-1] - step_times[warmup - 1]
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else _rss_gb()
    result = {
        "tokens_per_s": tokens / elapsed,
        "peak_mem_gb": peak,
        "tokens": tokens,
        "elapsed_s": elapsed,
        "steps_measured": len(step_times) - warmup,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def baseline_model(config: dict[str, Any], base: str, cuda: bool) -> Any:
    """The random base in NF4, prepared for k-bit training and wrapped in the run's LoRA, as PEFT's docs do it."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model_cfg = config["model"]
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.bfloat16,
        quantization_config=quantization_config(),
        device_map={"": 0 if cuda else "cpu"},
        attn_implementation=None if model_cfg["attn_implementation"] == "auto" else model_cfg["attn_implementation"],
    )
    model = peft.prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=model_cfg["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = config["lora"]
    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )


def train_baseline(model: Any, config: dict[str, Any], output_dir: Path, cuda: bool) -> tuple[list[int], list[float]]:
    """HF Trainer on our run's training rows, batch and steps; (tokens of each micro-batch, each step's end time)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    train_cfg, data_dir = config["train"], config["data"]["path"]
    rows = open_split(data_dir, "train", load_manifest(data_dir))
    pad_id = pad_token_id(Path(config["model"]["path"]))
    tokens_per_micro: list[int] = []

    def collator(items: list[dict[str, Any]]) -> dict[str, Any]:
        # Our collate: the same padded/packed tensors as our run (position_ids isolate packed samples).
        batch = collate(
            [(r["input_ids"], r["labels"], r["position_ids"]) for r in items], pad_id=pad_id, packed=True, isolate=True
        )
        tokens_per_micro.append(batch.tokens)
        return {"input_ids": batch.input_ids, "labels": batch.labels, "position_ids": batch.position_ids}

    step_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.monotonic())

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train_cfg["micro_batch_size"],
        gradient_accumulation_steps=train_cfg["grad_accum_steps"],
        max_steps=train_cfg["max_steps"],
        learning_rate=train_cfg["lr"],
        bf16=True,
        gradient_checkpointing=False,  # already enabled by prepare_model_for_kbit_training, as in our run
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
    )
    Trainer(
        model=model, args=training_args, train_dataset=rows, data_collator=collator, callbacks=[StepClock()]
    ).train()
    return tokens_per_micro, step_times


def _rss_gb() -> float:
    """Peak resident set size (GiB), the trainer's mem_gb on CPU."""
    return peak_rss_mib() / 1024


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", required=True, choices=sorted(CASES))
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, a few steps (CPU, CI)")
    parser.add_argument("--name", help="results file name (default: the case, + _dryrun)")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--work-dir", default="/tmp/bench_train", help="model configs, data, run outputs")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the case's)")
    parser.add_argument("--warmup", type=int, help="steps left out of the measurement (default: the case's)")
    parser.add_argument("--seq", type=int, help="max_seq_len of the packed rows")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--ds-config", help="a ds_configs JSON instead of the case's")
    parser.add_argument("--ds-set", action="append", default=[], help="KEY.PATH=JSON override of the DeepSpeed JSON")
    parser.add_argument("--attn", default="auto", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--liger", action="store_true", help="liger RMSNorm/SwiGLU/RoPE kernels (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine (engine.compile())")
    parser.add_argument(
        "--log-every", type=int, default=1, help="train.log_every_steps: fewer log rows, fewer host syncs"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip HF Trainer + PEFT (qlora_7b)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU when the name is not known (CPU)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        worker_main(argv[1:])
        return 0
    if argv[:1] == ["baseline"]:
        baseline_main(argv[1:])
        return 0
    args = parse_args(argv)
    case = dry_run(CASES[args.case]) if args.dry_run else CASES[args.case]
    overrides = {
        "steps": args.steps,
        "warmup": args.warmup,
        "seq": args.seq,
        "micro_batch_size": args.micro_batch,
        "grad_accum_steps": args.grad_accum,
        "gradient_checkpointing": args.grad_ckpt,
        "ds_config": args.ds_config,
    }
    case = dataclasses.replace(case, **{k: v for k, v in overrides.items() if v is not None})
    levers = Levers(
        liger=args.liger, compile=args.compile, attn=args.attn, log_every=args.log_every, ds_set=tuple(args.ds_set)
    )
    result = run_case(case, levers, args)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
