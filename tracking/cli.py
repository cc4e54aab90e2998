"""``python -m tracking``: the commands a person runs against tracking data.

- ``sync OUT [--uri URI]``: send what a training run's spool (``OUT/mlflow_spool``) still holds, e.g. after
  the server was down when the job ended. The spool keeps the URI redacted: a URI with a password or token
  comes from ``--uri`` or ``$MLFLOW_TRACKING_URI``.
- ``dashboard [--store DIR] [--host 127.0.0.1] [--port 5000] [mlflow server args...]``: serve a sqlite store
  (default ``./mlruns``, the store prepare and training use by default) with ``mlflow server`` (loopback
  unless ``--host`` says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from sft_stack.common.errors import PREFIX, user_error
from tracking.journal import JOURNAL_FILE, SPOOL_DIR, Spool
from tracking.links import experiments_url
from tracking.naming import REDACTED, STORE_DIR, redact_logs, redact_text, resolve_tracking_uri
from tracking.worker import replay


def sync(output_dir: str | Path, uri: str | None = None, timeout_s: float = 300.0) -> int:
    """Send what the spool of ``output_dir`` still holds; return the number of ops left (0: all sent)."""
    output_dir = Path(output_dir)
    spool = Spool(output_dir)
    if not spool.lock():
        raise SystemExit(
            f"{PREFIX}sync: {spool.dir} is in use by a running job; wait for it to end (it replays itself)"
        )
    try:
        ops = spool.read()
        if not ops:
            print(f"sync: {spool.dir / JOURNAL_FILE} is empty or missing; nothing to send")
            return 0
        start = next((op for op in ops if op["op"] == "start"), None)
        tracking_uri = uri or spooled_uri((start or {}).get("tracking_uri")) or resolve_tracking_uri(None)[0]
        total, left, run_id = replay(spool, tracking_uri, timeout_s)
    finally:
        spool.close()
    print(f"sync: {total - left} of {total} pending operations sent to {redact_text(tracking_uri)} (run {run_id})")
    return left


def spooled_uri(recorded: str | None) -> str | None:
    """The URI a spool's start op names; when it was redacted, ``$MLFLOW_TRACKING_URI`` if that is the same URI
    with its credentials, else a one-line error asking for ``--uri``."""
    if recorded is None or REDACTED not in recorded:
        return recorded
    environment = os.environ.get("MLFLOW_TRACKING_URI", "")
    if environment and redact_text(environment) == recorded:
        return environment
    raise SystemExit(
        f"{PREFIX}sync: the run's tracking URI {recorded} had credentials, which are never stored; "
        "pass it with --uri URI or set MLFLOW_TRACKING_URI"
    )


def dashboard_command(store: Path, host: str, port: int, extra: list[str]) -> list[str]:
    """The ``mlflow server`` command line serving an embedded store."""
    store = store.resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        (store / "artifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        # one worker is plenty for one person's dashboard and starts in seconds (mlflow's default is 4)
        *([] if any(arg.startswith(("--workers", "-w")) for arg in extra) else ["--workers", "1"]),
        *extra,
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tracking", description="MLflow tracking: sync a spool, serve a store"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sync_cmd = commands.add_parser("sync", help="send what OUT/mlflow_spool still holds to MLflow")
    sync_cmd.add_argument("output_dir", type=Path, help="a training output directory (train.output_dir)")
    sync_cmd.add_argument("--uri", help="tracking URI (default: the one the run was started with)")
    sync_cmd.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    dash = commands.add_parser("dashboard", help="serve an embedded store with `mlflow server`")
    dash.add_argument(
        "--store",
        type=Path,
        default=Path(STORE_DIR),
        help=f"the store directory (default ./{STORE_DIR}, where prepare and training log unless told otherwise)",
    )
    dash.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    dash.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    redact_logs()
    if args.command == "sync":
        if extra:
            parser.error(f"unknown arguments {extra}")
        if not (args.output_dir / SPOOL_DIR).is_dir():
            return user_error(f"sync: {args.output_dir / SPOOL_DIR} not found; pass a training output directory")
        return 0 if sync(args.output_dir, args.uri, args.timeout) == 0 else 1
    if not (args.store / "mlflow.db").is_file():
        found = sorted(str(db.parent) for db in Path().glob(f"*/{STORE_DIR}/mlflow.db"))
        hint = f" (stores here: {', '.join(found)})" if found else ""
        return user_error(
            f"dashboard: no store at {args.store / 'mlflow.db'}; pass --store STORE_DIR (make dashboard STORE=...){hint}"
        )
    command = dashboard_command(args.store, args.host, args.port, extra)
    link = experiments_url(f"http://{args.host}:{args.port}")  # in the model-training view (tracking.links)
    print(f"MLflow dashboard: {link}  (store {args.store.resolve()}; Ctrl-C stops it)")
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.call(command)
    return 0
