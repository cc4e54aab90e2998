"""``sft configs``: the shipped run recipes (configs/*.yaml), listed and copied out, like torchtune's ``tune ls/cp``.

    sft configs                              # name, model, method, hardware, the planner's verdict
    sft configs cp chatglm3_6b_lora_1gpu my_run.yaml

Each recipe is headed by its launch command and, for the large models, its planner command and verdict
(``Planner: sft plan ...`` / ``verdict: ...``); tests/unit/test_model_configs.py checks that the recorded verdict
is what ``sft plan`` prints today, so the listing reads it from the header instead of importing DeepSpeed's
estimators (seconds) for every call. The recipes are found next to the installed packages
(sft_stack/common/project.py).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sft_stack.common.errors import user_error
from sft_stack.common.project import CONFIGS_DIR


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    """The file name without .yaml: what ``sft train NAME`` and ``sft configs cp NAME`` accept."""
    model: str
    """The last part of model.path (a placeholder directory for the large models)."""
    method: str
    """model.method: full, lora or qlora."""
    hardware: str
    """The machine the recipe is planned for, from its planner command (or its CPU launch line)."""
    verdict: str
    """The planner's verdict recorded in the header ("-" for the CPU recipes, which are not planned)."""


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.removeprefix("#").strip())
    return lines


def _hardware(header: list[str]) -> str:
    planner = next((line for line in header if line.startswith("Planner: sft plan ")), None)
    if planner is None:
        launch = shlex.split(header[0]) if header else []
        ranks = launch[launch.index("--num_gpus") + 1] if "--num_gpus" in launch else "?"
        device = "CPU ranks (gloo)" if "DS_ACCELERATOR=cpu" in launch else "GPUs"
        return f"{ranks} {device}"
    words = shlex.split(planner.removeprefix("Planner: sft plan "))

    def flag(name: str, default: str) -> str:
        return words[words.index(name) + 1] if name in words else default

    return f"{flag('--nodes', '1')}x{flag('--gpus-per-node', '8')} GPU x {flag('--gpu-mem-gb', '80')} GiB"


def read_recipe(path: Path) -> Recipe:
    text = path.read_text(encoding="utf-8")
    header = _header(text)
    raw: Any = yaml.safe_load(text) or {}
    model = raw.get("model", {}) if isinstance(raw, dict) else {}
    verdict = next((line.removeprefix("verdict: ") for line in header if line.startswith("verdict: ")), "-")
    return Recipe(
        name=path.stem,
        model=Path(str(model.get("path", "?"))).name,
        method=str(model.get("method", "full")),
        hardware=_hardware(header),
        verdict=verdict.rstrip("."),
    )


def recipes() -> list[Recipe]:
    return [read_recipe(path) for path in sorted(CONFIGS_DIR.glob("*.yaml"))]


def table(rows: list[Recipe]) -> str:
    cells = [("NAME", "MODEL", "METHOD", "HARDWARE", "PLANNER VERDICT")]
    cells += [(r.name, r.model, r.method, r.hardware, r.verdict) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)), row[4]]) for row in cells)


def copy_recipe(name: str, dest: Path, *, force: bool) -> Path:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or a directory to copy into); returns the new file."""
    source = CONFIGS_DIR / Path(name).with_suffix(".yaml").name
    if not source.is_file():
        known = ", ".join(r.stem for r in sorted(CONFIGS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{name}: no such recipe; shipped: {known}")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise FileExistsError(f"{target}: already exists; pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def build_parser(prog: str = "python -m sft_stack.cli.configs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", metavar="{ls,cp}")
    actions.add_parser("ls", help="List the shipped recipes (the default).")
    cp = actions.add_parser("cp", help="Copy a shipped recipe out, to edit it.")
    cp.add_argument("name", help="The recipe's name, as `sft configs` lists it (e.g. chatglm3_6b_lora_1gpu).")
    cp.add_argument("dest", type=Path, help="The file to write, or a directory to copy it into.")
    cp.add_argument("--force", action="store_true", help="Overwrite DEST when it exists.")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m sft_stack.cli.configs") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.action == "cp":
        try:
            target = copy_recipe(args.name, args.dest, force=args.force)
        except (FileNotFoundError, FileExistsError) as exc:
            return user_error(str(exc))
        print(f"copied {args.name} -> {target}; train it with: sft train {target}")
        return 0
    print(table(recipes()))
    print(f"\n{CONFIGS_DIR}: copy one out with `sft configs cp NAME DEST`, run it with `sft train NAME|FILE`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
