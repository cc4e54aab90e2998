#!/usr/bin/env bash
# `make demo`, the chain-of-thought demo (README "The chain-of-thought demo"): a model trained from scratch on
# generated zh/en column-addition problems on 2 CPU cores, measured before and after on held-out problems.
# Everything it does is in sft_stack/demo/run.py (python -m sft_stack.demo --help): generated problems -> char tokenizer ->
# data_pipeline prepare -> 2-rank deepspeed training (and an answer-only control) -> cli.evaluate ->
# side-by-side generations -> one JSON line. A second run reuses the data, tokenizer and prepared shards.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m sft_stack.demo --out "${DEMO_OUT:-demo_cot_out}" "$@"
