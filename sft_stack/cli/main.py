"""``sft``: one command for every task, from a pile of chat data to a tuned model.

    sft configs                                    the shipped recipes; sft configs cp NAME DEST
    sft convert SRC DST                            an original ChatGLM/Baichuan/MOSS checkpoint -> native
    sft prepare --source X --tokenizer M --out D   corpora -> verified Arrow shards (verify, inspect, merge)
    sft train CONFIG [--gpus N] [section.key=value ...]
    sft chat --model OUT/final                     (generate, evaluate, export)
    sft dashboard                                  the MLflow UI on the runs' store (sync)

Each subcommand is the tool that was already there (``python -m data_pipeline``, ``python -m tracking``,
``python -m sft_stack.cli.generate`` ... still work); this module only names them and hands over argv. Their
imports happen when a subcommand runs, so ``sft --help`` answers at once. Exit status and the error prefix are
one convention for all of them (sft_stack/common/errors.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Command:
    name: str
    summary: str
    """One line for ``sft --help``."""
    run: Callable[[list[str], str], int]
    """(argv after the subcommand, prog for usage lines) -> exit status."""


def _data(command: str) -> Callable[[list[str], str], int]:
    def run(argv: list[str], prog: str) -> int:
        from data_pipeline.cli import main

        return main([command, *argv], prog="sft")

    return run


def _tracking(command: str) -> Callable[[list[str], str], int]:
    def run(argv: list[str], prog: str) -> int:
        from tracking.cli import main

        return main([command, *argv])

    return run


def _train(argv: list[str], prog: str) -> int:
    from sft_stack.cli.train import main

    return main(argv, prog)


def _generate(argv: list[str], prog: str) -> int:
    from sft_stack.cli.generate import main

    return main(argv, prog)


def _chat(argv: list[str], prog: str) -> int:
    from sft_stack.cli.generate import main

    return main(["--chat", *argv], prog)


def _evaluate(argv: list[str], prog: str) -> int:
    from sft_stack.cli.evaluate import main

    return main(argv, prog)


def _export(argv: list[str], prog: str) -> int:
    from sft_stack.cli.export import main

    return main(argv, prog)


def _convert(argv: list[str], prog: str) -> int:
    from sft_stack.cli.convert import main

    return main(argv, prog)


def _plan(argv: list[str], prog: str) -> int:
    from sft_stack.cli.plan import main

    return main(argv, prog)


def _configs(argv: list[str], prog: str) -> int:
    from sft_stack.cli.configs import main

    return main(argv, prog)


def _demo(argv: list[str], prog: str) -> int:
    # A process of its own: the demo sits above the command-line package (it drives these tools) and its
    # prepare workers re-import the main module.
    return subprocess.call([sys.executable, "-m", "sft_stack.demo", *argv])


COMMANDS = (
    Command(name="configs", summary="list the shipped recipes (model, method, hardware, verdict); cp one out", run=_configs),
    Command(name="convert", summary="convert an original ChatGLM/Baichuan/MOSS checkpoint to a native one", run=_convert),
    Command(name="plan", summary="will this model fit this hardware, and with which ZeRO config", run=_plan),
    Command(name="prepare", summary="tokenize corpora into verified Arrow shards + manifest", run=_data("prepare")),
    Command(name="verify", summary="recompute a prepared directory's shard hashes and row counts", run=_data("verify")),
    Command(name="inspect", summary="print a prepared directory's summary and one decoded sample", run=_data("inspect")),
    Command(name="merge", summary="assemble the partial outputs of a multi-task prepare", run=_data("merge")),
    Command(name="train", summary="train a run config with the deepspeed launcher (--gpus, --hostfile, --cpu)", run=_train),
    Command(name="generate", summary="generate from a trained model: a prompt or a prompts file", run=_generate),
    Command(name="chat", summary="chat with a trained model on the terminal (generate --chat)", run=_chat),
    Command(name="evaluate", summary="loss/perplexity on a split, exact match/BLEU/ROUGE-L on references", run=_evaluate),
    Command(name="export", summary="export a checkpoint or merge an adapter into a plain HF directory", run=_export),
    Command(name="dashboard", summary="serve the MLflow UI on the runs' store", run=_tracking("dashboard")),
    Command(name="sync", summary="send what a run's MLflow spool still holds", run=_tracking("sync")),
    Command(name="demo", summary="the chain-of-thought arithmetic demo (make demo), on CPU", run=_demo),
)  # fmt: skip
BY_NAME = {command.name: command for command in COMMANDS}


def usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [
        "usage: sft <command> [options]    (sft <command> --help for its options)",
        "",
        __doc__.split("\n\n")[0].removeprefix("``sft``: ").strip(),
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS),
        "",
        "Exit status: 0 done, 2 something to fix in the command, config or data (one line, `sft: error: ...`),",
        "1 any other failure. Overrides are section.key=value everywhere (train.lr=1e-5, data.max_seq_len=2048).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = BY_NAME.get(args[0])
    if command is None:
        print(usage(), file=sys.stderr)
        print(f"sft: error: unknown command {args[0]!r}; choose from {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    try:
        return command.run(args[1:], f"sft {command.name}")
    except BrokenPipeError:
        # The reader went away (`sft configs | head -2`): not an error. Python's documented recipe: point stdout
        # at devnull so the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
