"""Headless Chromium for dashboard tests: the visible text of a page, and a screenshot of it.

``scripts/system_deps.sh`` installs Chromium; ``chromium_or_skip`` skips a test on a machine without it. The
MLflow UI is a single-page app: ``--virtual-time-budget`` lets its scripts fetch and render before the dump.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium_or_skip() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (scripts/system_deps.sh installs it)")
    return chromium


def browser(profile: Path, *, width: int = 1400, height: int = 1000) -> list[str]:
    """The headless command line, with its own profile (no remembered view or chart layout)."""
    chromium = chromium_or_skip()
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
            # Draw every frame in virtual time: without it the chart cards (rendered when they scroll into view)
            # are often missing from a dump on a loaded machine.
            "--run-all-compositor-stages-before-draw"]  # fmt: skip


def dump_dom(command: list[str], url: str, budget_ms: int = 20000, *, until: str = "") -> str:
    """The DOM of ``url`` once rendered; with ``until``, once it holds that text: the page is loaded again, with
    more time, up to three times (on a loaded machine the UI's fetches can outlast the first budget)."""
    dom = ""
    for attempt in range(3):
        dom = subprocess.run(
            [*command, f"--virtual-time-budget={budget_ms * (attempt + 1)}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        if until in dom:
            break
    return dom


def page_text(command: list[str], url: str, budget_ms: int = 20000, *, until: str = "") -> str:
    """The visible text of ``url`` once rendered (see dump_dom), whitespace collapsed."""
    dom = dump_dom(command, url, budget_ms, until=until)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S)))


def chart_titles(dom: str) -> list[str]:
    """The metric of every chart card of an MLflow charts page, top to bottom (each card's title names it)."""
    return re.findall(r'<h4 [^>]*title="([^"]+)"', dom)


def screenshot(command: list[str], url: str, path: Path, budget_ms: int = 20000) -> Path:
    """A PNG of ``url`` once rendered; asserts that one was written."""
    subprocess.run([*command, f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                   capture_output=True, timeout=240)  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no screenshot of {url}"
    return path
