#!/usr/bin/env bash
# The demo: a model learns chain-of-thought arithmetic from scratch on 2 CPU cores, measured before and after.
# Everything it does is in demo/run.py (python -m demo --help): generated zh/en problems -> char tokenizer ->
# data_pipeline prepare -> 2-rank deepspeed training (and an answer-only control) -> trainer.evaluate ->
# side-by-side generations -> one JSON line. A second run reuses the data, tokenizer and prepared shards.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m demo --out "${DEMO_OUT:-demo_out}" "$@"
