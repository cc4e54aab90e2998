#!/usr/bin/env bash
# Issue 6 on a lent GPU machine (device tool): install the wheels the GPU image lacks, then run bench_train cases.
#
# Here, once, with the project's venv active:   bash ../shared/device/prepare_wheels.sh     (fills .whl/)
# Then one device call per group of cases (each call is limited to 10 minutes), carrying .whl:
#   run(command="bash benchmarks/run_gpu.sh full_1b", carry=[".whl"])
#   run(command="bash benchmarks/run_gpu.sh qlora_7b", carry=[".whl"])
#   run(command="bash benchmarks/run_gpu.sh full_7b_offload lora_7b", carry=[".whl"])
#   run(command="bash benchmarks/run_gpu.sh levers", carry=[".whl"])     # full_1b with each lever on its own
# With no argument it runs the four cases. Results land in benchmarks/results/ and are copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
# The image has no mlflow: the runs keep tracking off. DeepSpeed's fused ops compile just in time (nvcc).
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
command -v nvcc >/dev/null || echo "run_gpu: no nvcc on PATH: DeepSpeed's FusedAdam/CPUAdam JIT builds may fail" >&2
python3 -c "import torch, deepspeed, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || exit 1

cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(full_1b qlora_7b full_7b_offload lora_7b)
work=${BENCH_WORK:-/tmp/bench_train}
rc=0
bench() {  # bench CASE [flags...]
    echo "== bench_train $*" >&2
    timeout 540 python3 benchmarks/bench_train.py --work-dir "$work" --case "$@" || { rc=1; echo "== failed: $*" >&2; }
}
for case in "${cases[@]}"; do
    case "$case" in
        levers)
            bench full_1b --steps 15 --name full_1b_grad_ckpt --grad-ckpt
            bench full_1b --steps 15 --name full_1b_liger --liger
            bench full_1b --steps 15 --name full_1b_compile --compile
            bench full_1b --steps 15 --name full_1b_buckets_2e8 --ds-set zero_optimization.reduce_bucket_size=200000000 \
                --ds-set zero_optimization.allgather_bucket_size=200000000
            bench full_1b --steps 15 --name full_1b_log_every_5 --log-every 5 ;;
        *) bench "$case" ;;
    esac
done
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results" && cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null
    for log in "$work"/*/ours.log "$work"/*/baseline.log; do
        [ -f "$log" ] && tail -n 60 "$log" >"$OUT/$(basename "$(dirname "$log")")_$(basename "$log")"
    done
fi
exit "$rc"
