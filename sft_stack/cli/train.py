"""``sft train CONFIG [section.key=value ...]``: the deepspeed launcher on launcher/run.py, spelled once.

    sft train configs/llama2_7b_lora_zero2.yaml --gpus 8 data.path=data/v1
    sft train configs/llama2_7b_full_zero3_2nodes.yaml --hostfile hosts train.lr=1e-5
    sft train configs/tiny_cpu.yaml --cpu --gpus 2           # CPU ranks over gloo

runs ``deepspeed [--num_gpus N] [--num_nodes M] [--hostfile H] [--master_port P] launcher/run.py --config CONFIG
[overrides]`` (``DS_ACCELERATOR=cpu`` with ``--cpu``), printing that command first. ``deepspeed launcher/run.py``
itself and the SLURM scripts (slurm/train.sbatch) are unchanged: this command only builds their command line.

An override whose value holds a credential (``tracking.uri=http://user:PASSWORD@host``, a ``?token=`` value) is
kept off that command line, which the deepspeed runner prints: on one node it reaches the ranks through the
environment (``SFT_SECRET_OVERRIDES``, applied after the command line's overrides); with a hostfile it cannot
(the runner exports only some variables, in a command it also prints), so it is refused with what to do instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sft_stack.common.errors import user_error
from sft_stack.common.project import CONFIGS_DIR, LAUNCHER, SECRET_OVERRIDES_ENV
from tracking.naming import redact_text


def build_parser(prog: str = "python -m sft_stack.cli.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="The run config's keys and their meaning: trainer/config.py (docs/trainer.md). "
        "`sft configs` lists the shipped recipes.",
    )
    parser.add_argument(
        "config",
        type=Path,
        help="The run YAML: a path, or the name of a shipped recipe (`sft configs`), e.g. tiny_cpu.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help="Dotted overrides of the run config, e.g. train.max_steps=10 data.path=data/v1.",
    )
    parser.add_argument(
        "--gpus", type=int, help="Ranks per node (deepspeed --num_gpus). Default: every GPU of the node."
    )
    parser.add_argument("--nodes", type=int, help="Nodes to use from the hostfile (deepspeed --num_nodes).")
    parser.add_argument(
        "--hostfile", type=Path, help="A deepspeed hostfile (`host slots=8` per line) for a multi-node run over ssh."
    )
    parser.add_argument(
        "--master-port", type=int, help="The rendezvous port of rank 0 (deepspeed --master_port). Default: 29500."
    )
    parser.add_argument(
        "--cpu", action="store_true", help="Run the ranks on CPU over gloo (DS_ACCELERATOR=cpu), as the tests do."
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="Print the deepspeed command and exit without running it."
    )
    return parser


def resolve_config(config: Path) -> Path | None:
    """The YAML a ``config`` argument names: a path as given, else a shipped recipe by name (``tiny_cpu``)."""
    if config.is_file():
        return config
    shipped = CONFIGS_DIR / config.with_suffix(".yaml").name
    return shipped if len(config.parts) == 1 and shipped.is_file() else None


def deepspeed_command(args: argparse.Namespace, config: Path, overrides: list[str]) -> list[str]:
    """The launcher's command line with ``overrides``; the launcher is run by this interpreter, like the ranks
    it starts."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    for flag, value in (
        ("--num_gpus", args.gpus),
        ("--num_nodes", args.nodes),
        ("--hostfile", args.hostfile),
        ("--master_port", args.master_port),
    ):
        if value is not None:
            launcher += [flag, str(value)]
    return [*launcher, str(LAUNCHER), "--config", str(config), *overrides]


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.train") -> int:
    # Intermixed: options may come before, between or after the config and its overrides.
    args = build_parser(prog).parse_intermixed_args(argv)
    config = resolve_config(args.config)
    if config is None:
        return user_error(
            f"{args.config}: no such run config; pass a YAML file or a shipped recipe's name (`sft configs` lists them)"
        )
    if args.hostfile is not None and not args.hostfile.is_file():
        return user_error(f"--hostfile {args.hostfile}: no such file")
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        return user_error(f"{bad[0]!r}: expected a section.key=value override (e.g. train.max_steps=10)")
    secret = [item for item in args.overrides if redact_text(item) != item]
    if secret and args.hostfile is not None:
        return user_error(
            f"{redact_text(secret[0])}: a credential on a multi-node command line is printed by the deepspeed "
            "runner on every launch; put the URI without it and give the credentials as MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD in ~/.deepspeed_env on every node"
        )
    command = deepspeed_command(args, config, [item for item in args.overrides if item not in secret])
    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if args.cpu else dict(os.environ)
    if secret:
        env[SECRET_OVERRIDES_ENV] = "\n".join(secret)
    shown = shlex.join(["deepspeed", *command[3:]])
    hidden = f" (from the environment: {' '.join(redact_text(item) for item in secret)})" if secret else ""
    print(f"sft train: {'DS_ACCELERATOR=cpu ' if args.cpu else ''}{shown}{hidden}", file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    sys.stdout.flush()
    # Replace this process: Ctrl-C, SIGTERM and the exit status go straight to and from the launcher, which
    # stops its ranks itself (a parent that waited would be killed first and leave the ranks running).
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    sys.exit(main())
