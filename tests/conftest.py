"""Suite-wide: the MLflow store of runs that name none.

Without ``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` a run logs to ``./mlruns`` in the current directory (the
project's default store, docs/tracking.md); the suite's runs go to a store of its own instead of the checkout's.
Tests of the default itself unset the variable and change directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tracking.naming import store_uri


@pytest.fixture(autouse=True, scope="session")
def suite_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = store_uri(tmp_path_factory.mktemp("suite") / "mlruns")
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
