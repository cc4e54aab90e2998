#!/usr/bin/env bash
# `make demo-pipeline`: the whole path on the bundled BELLE sample, on CPU, in a few minutes (the model learns
# nothing useful in that time; `make demo` is the demo that shows learning).
#   1. prepare: the bundled BELLE sample -> verified Arrow shards (2 workers)
#   2. train:   2 DeepSpeed ranks over gloo (ZeRO-2) on a tiny Llama, tracked in the embedded MLflow store
#   3. export + generate: the tuned model answers a prompt with the training chat template
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_out}
export DS_ACCELERATOR=cpu
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/4 prepare: tests/fixtures/real/belle -> $OUT/data"
$PY -m data_pipeline prepare \
    --source tests/fixtures/real/belle/Belle_open_source_1k.json \
    --tokenizer tests/fixtures/tiny_llama --template qwen \
    --out "$OUT/data" --max-seq-len 512 --pack --workers 2 --val-fraction 0.05
$PY -m data_pipeline verify "$OUT/data"
$PY -m data_pipeline inspect "$OUT/data" --index 0 | head -40

echo "== 2/4 train: deepspeed --num_gpus 2 launcher/run.py --config configs/tiny_cpu.yaml"
.venv/bin/deepspeed --num_gpus 2 launcher/run.py --config configs/tiny_cpu.yaml \
    data.path="$OUT/data" train.output_dir="$OUT/run"

echo "== 3/4 generate with the exported model"
$PY -m sft_stack.cli.generate --model "$OUT/run/final" --preset greedy --max-new-tokens 32 \
    --prompt "给定一句话，将其改写成被动语态。"

echo "== 4/4 done"
echo "metrics:   $OUT/run/metrics.jsonl"
echo "model:     $OUT/run/final"
echo "dashboard: make dashboard   (MLflow UI on the embedded store, http://127.0.0.1:5000)"
