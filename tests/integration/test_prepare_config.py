"""The shipped prepare config runs as its header says, with section.key=value overrides, and writes what it declares."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.schema import load_manifest
from tests.helpers.data import REPO


def test_tiny_alpaca_config_runs_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository root, as its header says
    out = tmp_path / "tiny"
    args = ["prepare", "--config", "configs/data/tiny_alpaca.yaml", f"data.out={out}", "data.max_seq_len=256"]
    assert main([*args, "--no-progress", "--no-track"]) == 0
    manifest = load_manifest(out)
    assert (manifest.max_seq_len, manifest.packed, manifest.template) == (256, True, "llama2")
    assert [s.format for s in manifest.sources] == ["alpaca", "alpaca"]
    assert manifest.sources[1].records == 300
    assert manifest.options["val_fraction"] == 0.05
    assert manifest.counts["samples_read"] == manifest.sources[0].records + 300
    assert main(["verify", str(out)]) == 0
