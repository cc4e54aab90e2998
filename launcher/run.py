"""Process entry point: argv -> config -> checks -> process group -> merged DeepSpeed config -> train.

    deepspeed [--num_gpus N | --hostfile H] launcher/run.py --config configs/X.yaml [section.key=value ...]
    python launcher/run.py --config configs/X.yaml [section.key=value ...]      # one process
    DS_ACCELERATOR=cpu ... runs either on CPU over gloo.

Everything that needs no process group is checked first (trainer/preflight.py), so a mistake in the config,
the data, the model folder or a stale DeepSpeed build lock ends the launch in seconds with one line per
problem and exit code 2; then a line says the process group is being joined. Exit codes: 0 done, 1 the run
failed (non-finite loss, a rank stopped), 2 something the user must fix.

Nothing imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from data_pipeline.schema import DataError
from sft_stack.common.errors import FAILURE, PREFIX, USER_ERROR  # the one convention (README, "Exit status")
from sft_stack.common.ports import free_port
from sft_stack.common.project import SECRET_OVERRIDES_ENV
from tracking.naming import redact_text
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, load_config
from trainer.dist import remove_cpu_shm_buffer
from trainer.preflight import find_problems
from trainer.write_errors import WriteFailedError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def set_single_process_env() -> None:
    """Without a launcher (`python launcher/run.py`): the environment of a one-rank process group."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def is_node_leader() -> bool:
    """Local rank 0: the one rank per node that prints what every rank of the node found alike (start-up errors
    are decided from the config and this node's files, so the node's other ranks found the same and exit quietly;
    a node with other files, e.g. a node-local data disk, prints its own)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def announce_join() -> None:
    """One line per node before the rendezvous, so a wait there (a rank that never came) is never silent."""
    if is_node_leader():
        world, address = os.environ.get("WORLD_SIZE", "1"), os.environ.get("MASTER_ADDR", "?")
        port = os.environ.get("MASTER_PORT", "?")
        print(f"joining the process group: {world} rank(s), rendezvous {address}:{port}", flush=True)


def init_distributed(timeout_s: float) -> None:
    """Join the launcher's process group, or make a one-rank group for `python launcher/run.py`.

    ``timeout_s`` (train.collective_timeout_s) bounds every collective: a rank that stops makes the others fail.
    """
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    set_single_process_env()
    backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        # `sft train` passes overrides holding a credential here, off the command line the runner prints
        secret = [line for line in os.environ.get(SECRET_OVERRIDES_ENV, "").splitlines() if line]
        cfg = load_config(args.config, [*args.overrides, *secret])
    except ConfigError as exc:
        if is_node_leader():  # the message quotes the value: a URI's password is redacted
            print(f"{PREFIX}{redact_text(str(exc))}", file=sys.stderr, flush=True)
        return USER_ERROR
    problems = find_problems(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if problems and is_node_leader():
        print("\n".join(f"{PREFIX}{redact_text(problem)}" for problem in problems), file=sys.stderr, flush=True)
    if problems:
        return USER_ERROR
    # Only now torch, DeepSpeed and the loop: a mistake found above ended the launch in seconds, before they load.
    import torch.distributed as dist

    from trainer.ds_config import build_ds_config
    from trainer.loop import NonFiniteLossError, train
    from trainer.progress import CollectiveTimeoutError

    set_single_process_env()
    announce_join()
    remove_cpu_shm_buffer()  # a killed run's, under the name this rank is about to create
    init_distributed(cfg.train.collective_timeout_s)
    try:
        ds_config = build_ds_config(cfg, dist.get_world_size())
        train(cfg, ds_config)
    except WriteFailedError:  # rank 0 printed its one line before any rank left (trainer/write_errors.py)
        return USER_ERROR
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"{PREFIX}rank {dist.get_rank()}: {exc}", file=sys.stderr)
        return USER_ERROR
    except NonFiniteLossError as exc:
        print(f"{PREFIX}rank {dist.get_rank()}: {exc}", file=sys.stderr)
        return FAILURE
    except CollectiveTimeoutError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr, flush=True)
        remove_cpu_shm_buffer()
        os._exit(FAILURE)  # destroy_process_group would wait on the rank that hung
    finally:
        dist.destroy_process_group()
        remove_cpu_shm_buffer()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
