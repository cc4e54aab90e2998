"""The folders show the architecture: imports flow one way (README, "Layout").

launcher -> trainer -> data_pipeline.schema; sft_stack.cli -> trainer; the chat formats (sft_stack.chat) sit
below trainer and data_pipeline and import neither, as tracking does; sft_stack.common sits below everything. Every import statement of the project's
packages is read with ``ast`` (top-level and function-local ones alike), so a lazy import cannot hide an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON, CHAT, CLI, DEMO = "sft_stack.common", "sft_stack.chat", "sft_stack.cli", "sft_stack.demo"
PACKAGES = ("launcher", CLI, DEMO, "trainer", "data_pipeline", CHAT, "tracking", COMMON)
ALLOWED = {
    COMMON: set(),
    "tracking": {COMMON},
    CHAT: {COMMON},
    "data_pipeline": {COMMON, "tracking", CHAT},
    "trainer": {COMMON, "tracking", CHAT, "data_pipeline"},
    "launcher": {COMMON, "tracking", "data_pipeline", "trainer"},
    CLI: {COMMON, "tracking", CHAT, "data_pipeline", "trainer"},
    DEMO: {COMMON, "tracking", CHAT, "data_pipeline", "trainer", CLI},
}
"""Package -> the project packages it may import (the sft_stack namespace's subpackages count as packages)."""


def package_of(module: str) -> str | None:
    """The project package a dotted module name belongs to, or None for a third-party module."""
    parts = module.split(".")
    top = ".".join(parts[:2]) if parts[0] == "sft_stack" else parts[0]
    return top if top in PACKAGES else None


TRAINER_MAY_USE = {"data_pipeline.schema"}
"""The data_pipeline modules the trainer may import: the shard contract only (prompts render through sft_stack.chat)."""


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def edges(package: str) -> list[tuple[str, str]]:
    """(file, imported module) for every import of another project package inside ``package``."""
    found = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        for module in imported_modules(path):
            top = package_of(module)
            if top is not None and top != package:
                found.append((str(path.relative_to(ROOT)), module))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_flow_one_way(package: str) -> None:
    wrong = [(f, m) for f, m in edges(package) if package_of(m) not in ALLOWED[package]]
    assert not wrong, f"{package} imports what sits above it: {wrong}"


def test_trainer_uses_only_the_data_contract_of_the_pipeline() -> None:
    used = {m for _, m in edges("trainer") if m.startswith("data_pipeline")}
    assert used <= TRAINER_MAY_USE, sorted(used - TRAINER_MAY_USE)
    assert "data_pipeline.schema" in used  # the check reads real imports (an empty set would pass vacuously)


def test_no_generic_top_level_names() -> None:
    """Installing the project adds only the design's packages and the project-named namespace to site-packages."""
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert tops == {"launcher", "trainer", "data_pipeline", "tracking", "sft_stack"}, sorted(tops)


PRODUCT = ("launcher", "trainer", "data_pipeline", "tracking", "sft_stack")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def test_no_product_module_over_600_lines_and_no_function_over_80() -> None:
    """Each module stays one job a reader can hold (STYLE.md); a growing file is a sign a new module is due."""
    long_modules, long_functions = [], []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = str(path.relative_to(ROOT))
            if len(text.splitlines()) > MAX_MODULE_LINES:
                long_modules.append(name)
            for node in ast.walk(ast.parse(text)):
                is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                if is_function and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
