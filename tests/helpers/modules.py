"""A throwaway module for a test: written to a temporary folder and imported from there, the way a user's own
module that registers a chat format, a corpus format or a family would be, without editing the project."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest


@contextmanager
def imported_module(folder: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``source`` written as ``folder/<name>.py`` and imported (``folder`` first on sys.path for the test); the
    module is dropped from sys.modules afterwards, so the next test imports (and registers) it afresh."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    try:
        yield importlib.import_module(name)
    finally:
        sys.modules.pop(name, None)
