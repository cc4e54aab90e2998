"""Time per tracking call on the training thread, against a real `mlflow server` on loopback; prints JSON.

    python benchmarks/bench_tracking.py                 # starts its own server (sqlite) on a free port
    python benchmarks/bench_tracking.py --uri http://127.0.0.1:5000 --steps 2000
    python benchmarks/bench_tracking.py --quick          # 200 steps, for the test suite

What is timed: ``Tracker.log_metrics`` with a metrics.jsonl-sized row (10 fields), as the loop calls it once
per optimizer step. For comparison, the same row sent synchronously with ``MlflowClient.log_batch`` (what a
thin logger does) is timed over a few calls. Also reported: how long ``close`` took to drain the queue, and
how many metric values reached the server (all of them, or the run is wrong).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.mlflow_server import MlflowServer  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.run_record import open_tracker  # noqa: E402

FIELDS = ("loss", "lr", "grad_norm", "loss_tokens", "tokens_per_s", "mfu", "mem_gb", "elapsed_s", "eta_s", "epoch")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(uri: str, steps: int, sync_calls: int, workdir: Path) -> dict[str, object]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    cfg = load_config(
        None,
        [
            f"model.path={ROOT / 'tests/fixtures/tiny_llama'}",
            f"data.path={workdir / 'no_data'}",
            f"train.output_dir={workdir / 'run'}",
            f"train.max_steps={steps}",
            f"tracking.uri={uri}",
            "tracking.experiment=bench_tracking",
            "tracking.system_metrics=false",
            "tracking.close_timeout_s=300",
        ],
    )
    start = time.perf_counter()
    tracker = open_tracker(
        cfg=cfg,
        ds_config={"zero_optimization": {"stage": 2}},
        output_dir=cfg.train.output_dir,
        rank=0,
        world_size=1,
        device="cpu",
    )
    open_s = time.perf_counter() - start
    per_call: list[float] = []
    for step in range(1, steps + 1):
        row = {name: 1.0 / step + i for i, name in enumerate(FIELDS)}
        row["step"] = step
        t0 = time.perf_counter()
        tracker.log_metrics(row, step)
        per_call.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tracker.close()
    close_s = time.perf_counter() - t0
    run_id = tracker.run_id
    assert run_id is not None
    client = MlflowClient(uri)
    logged = sum(len(client.get_metric_history(run_id, name)) for name in FIELDS)

    sync_times: list[float] = []
    sync_run = client.create_run(client.get_run(run_id).info.experiment_id, run_name="bench_sync")
    for step in range(1, sync_calls + 1):
        metrics = [Metric(name, 1.0 / step, int(time.time() * 1000), step) for name in FIELDS]
        t0 = time.perf_counter()
        client.log_batch(sync_run.info.run_id, metrics=metrics, synchronous=True)
        sync_times.append(time.perf_counter() - t0)
    client.set_terminated(sync_run.info.run_id)
    us = [t * 1e6 for t in per_call]
    return {
        "uri": uri,
        "steps": steps,
        "fields_per_call": len(FIELDS),
        "log_metrics_us": {
            "mean": round(statistics.fmean(us), 2),
            "p50": round(percentile(us, 0.5), 2),
            "p99": round(percentile(us, 0.99), 2),
            "max": round(max(us), 2),
        },
        "sync_log_batch_ms": {
            "calls": sync_calls,
            "mean": round(statistics.fmean(sync_times) * 1e3, 2),
            "p50": round(percentile(sync_times, 0.5) * 1e3, 2),
        },
        "open_tracker_s": round(open_s, 3),
        "close_drain_s": round(close_s, 3),
        "metric_values_logged": logged,
        "metric_values_expected": steps * len(FIELDS),
        "run_id": run_id,
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uri", help="an mlflow server to use (default: start one on a free loopback port)")
    parser.add_argument("--steps", type=int, default=2000, help="log_metrics calls to time")
    parser.add_argument("--sync-calls", type=int, default=20, help="synchronous log_batch calls to time")
    parser.add_argument("--quick", action="store_true", help="200 steps and 5 synchronous calls")
    args = parser.parse_args(argv)
    steps, sync_calls = (200, 5) if args.quick else (args.steps, args.sync_calls)
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        workdir = Path(tmp)
        server = None
        uri = args.uri
        if uri is None:
            server = MlflowServer(workdir / "store")
            server.start()
            uri = server.uri
        try:
            result = bench(uri, steps, sync_calls, workdir)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(result, indent=2))
    return 0 if result["metric_values_logged"] == result["metric_values_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
