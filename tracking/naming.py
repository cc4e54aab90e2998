"""What MLflow is given and where: secret redaction, param flattening, metric names, the store, the experiment.

Pure rules plus the two store-facing helpers every path shares (``open_client`` and ``get_or_create_experiment``),
so the trainer, ``prepare`` and ``evaluate`` log the same way to the same place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORE_DIR = "mlruns"
"""The embedded store's directory name, next to the output directory."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)."""
MAX_TAG_CHARS = 8000
REDACTED = "***"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment kind MLflow 3's UI reads to open runs in its model-training view ("Machine learning": model
metrics charts) instead of the GenAI view ("Evaluations", traces). Values in the UI bundle: genai_development,
custom_model_development, and their *_inferred forms."""
_SECRET_WORDS = frozenset(
    {"token", "key", "apikey", "password", "passwd", "pwd", "secret", "credential", "credentials", "auth"}
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")
"""Characters MLflow refuses in metric names (mlflow.utils.validation); replaced by "_"."""
# mlflow's REST client retries 7 times with backoff by default (minutes against a dead server); our callers
# retry themselves (or report and move on), so each request is tried once and waits at most this long.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def is_secret_name(name: str) -> bool:
    """True when a param/tag/env name looks like it holds a credential (hf_token, API_KEY, db.password, ...).

    Names are split into words (on non-letters and camelCase), so ``tokenizer_path`` or ``max_new_tokens``
    are not secrets but ``hf_token``, ``apiKey`` and ``MLFLOW_TRACKING_PASSWORD`` are.
    """
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words) if word)


def clean_value(name: str, value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """The string MLflow gets for one param or tag: redacted if secret, URL passwords removed, truncated."""
    if is_secret_name(name) and value not in (None, ""):
        return REDACTED
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    if len(text) > limit:
        marker = "...[truncated]"
        text = text[: limit - len(marker)] + marker
    return text


def clean_params(params: dict[str, Any], limit: int = MAX_PARAM_CHARS) -> dict[str, str]:
    return {key: clean_value(key, value, limit) for key, value in params.items()}


def redact(tree: Any, name: str = "") -> Any:
    """A copy of a JSON-like tree for an MLflow artifact: values under secret-looking keys become ``***`` and
    user:password is removed from URLs in every string (the rule of ``clean_value``, without truncation)."""
    if name and is_secret_name(name) and tree not in (None, ""):
        return REDACTED
    if isinstance(tree, dict):
        return {key: redact(value, str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(value) for value in tree]
    if isinstance(tree, str):
        return _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", tree)
    return tree


def flatten_dict(body: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in body.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_dict(value, name))
        else:
            flat[name] = value
    return flat


def metric_name(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric name replaced by ``_``."""
    return _INVALID_NAME_CHARS.sub("_", name)


def embedded_store(output_dir: str | Path) -> Path:
    """The embedded store directory used when no tracking URI is configured: ``<output_dir>/../mlruns``."""
    return Path(output_dir).resolve().parent / STORE_DIR


def resolve_tracking_uri(configured: str | None, output_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the server's default)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = embedded_store(output_dir)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an embedded sqlite store while a process opens it: creating its tables is not safe to race
    (a prepare record and a training run started at once on a fresh store). No-op for a server."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".mlflow.db.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def open_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` whose store is open (tables created on a fresh sqlite store, under ``store_lock``);
    HTTP requests are tried once, so an unreachable server fails fast instead of retrying for minutes."""
    for key, value in _HTTP_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        with store_lock(tracking_uri):
            client.search_experiments(max_results=1)  # the first call opens the store and creates its tables
    return client


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created (with ``artifact_location``, None: the server's default) if missing,
    and tagged with the kind that opens its runs in MLflow's model-training view."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(
                client.create_experiment(
                    name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            )
        except MlflowException as exc:  # created by another process meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # an experiment from before this tag existed
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return str(experiment.experiment_id)
