"""What MLflow is given and where: secret redaction, param flattening, metric names, the store, the experiment.

Pure rules plus the two store-facing helpers every path shares (``open_client`` and ``get_or_create_experiment``),
so the trainer, ``prepare`` and ``evaluate`` log the same way to the same place.

Secrets: ``redact_text`` is the one rule for text (a URL's ``user:password@`` and token-like query values such
as ``?token=``, ``access_token``, ``api_key``, ``sig``); ``redact`` and ``clean_value`` add the rule for names
(``hf_token: ...``). Every file, param, tag, artifact, journal line and log line the project writes goes
through them; the connection itself uses the real URI, held in memory or read from the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STORE_DIR = "mlruns"
"""The default store: ``./mlruns`` in the current directory (sqlite ``mlflow.db`` + ``artifacts/``), the same
for ``prepare``, training and ``python -m tracking dashboard`` (so a training run's link to its prepare run
opens in the dashboard that shows the training run)."""
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
_SECRET_QUERY_WORDS = _SECRET_WORDS | {"sig", "signature", "jwt", "pass", "pw", "session", "sessionid"}
"""Query keys whose value is a credential: ``?token=``, ``access_token``, ``X-Amz-Signature``, ``sig`` ..."""
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_PAIR = re.compile(r"(?P<lead>[?&;])(?P<key>[^=&#;?/\s\"'<>]+)=(?P<value>[^&#;\s\"'<>]*)")
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
    return any(word in _SECRET_WORDS for word in _words(name))


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    return [word for word in re.split(r"[^a-z0-9]+", spaced) if word]


def _redact_query_value(match: re.Match[str]) -> str:
    if not match["value"] or not any(word in _SECRET_QUERY_WORDS for word in _words(match["key"])):
        return match[0]
    return f"{match['lead']}{match['key']}={REDACTED}"


def redact_text(text: str) -> str:
    """``text`` without credentials: ``scheme://user:pw@host`` -> ``scheme://***@host`` and the values of
    token-like query keys (``?token=``, ``access_token=``, ``api_key=``, ``sig=``, ``password=`` ...) -> ``***``.

    The one rule every writer applies (files, params, tags, artifacts, the spool, log lines and warnings).
    """
    if "@" not in text and "=" not in text:
        return text
    return _QUERY_PAIR.sub(_redact_query_value, _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", text))


def clean_value(name: str, value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """The string MLflow gets for one param or tag: redacted if secret, credentials in URLs removed, truncated."""
    if is_secret_name(name) and value not in (None, ""):
        return REDACTED
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = redact_text(text)
    if len(text) > limit:
        marker = "...[truncated]"
        text = text[: limit - len(marker)] + marker
    return text


def clean_params(params: dict[str, Any], limit: int = MAX_PARAM_CHARS) -> dict[str, str]:
    return {key: clean_value(key, value, limit) for key, value in params.items()}


def redact(tree: Any, name: str = "") -> Any:
    """A copy of a JSON-like tree for a file or an MLflow artifact: values under secret-looking keys become
    ``***`` and every string goes through ``redact_text`` (the rule of ``clean_value``, without truncation)."""
    if name and is_secret_name(name) and tree not in (None, ""):
        return REDACTED
    if isinstance(tree, dict):
        return {key: redact(value, str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(value) for value in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def redact_strings(tree: Any) -> Any:
    """A copy of a JSON-like tree with ``redact_text`` applied to every string (keys untouched): for records
    whose key names are not secrets (a journal op whose metrics include ``token_accuracy``)."""
    if isinstance(tree, dict):
        return {key: redact_strings(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_strings(value) for value in tree]
    return redact_text(tree) if isinstance(tree, str) else tree


_logs_redacted = False


def redact_logs() -> None:
    """From now on every log record and warning this process prints goes through ``redact_text``: ours, and
    MLflow's, urllib3's and requests' own (a retry or connection warning naming the URI would otherwise print
    ``user:pw@host`` into a SLURM log). Called by every path that opens MLflow; idempotent."""
    global _logs_redacted
    if _logs_redacted:
        return
    _logs_redacted = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed %-format: leave it to logging's own error report
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(redacting_record)
    format_warning = warnings.formatwarning

    def redacting_format(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
        return redact_text(format_warning(message, category, filename, lineno, line))

    warnings.formatwarning = redacting_format


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


def default_store() -> Path:
    """The store used when no tracking URI is configured: ``./mlruns`` in the current directory (absolute)."""
    return Path.cwd().resolve() / STORE_DIR


def store_uri(store: str | Path) -> str:
    """The sqlite tracking URI of a store directory (``STORE/mlflow.db``), as ``dashboard`` serves it."""
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None for the server's default).

    ``configured`` (``tracking.uri``), else ``$MLFLOW_TRACKING_URI``, else the default store ``./mlruns``. A
    sqlite store keeps its artifacts next to its database (``STORE/artifacts``), where ``dashboard`` serves them.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or store_uri(default_store())
    if uri.startswith("sqlite:///"):
        return uri, (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return uri, None


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
    if redact_text(tracking_uri) != tracking_uri:
        # MLflow writes "View run ... at: <the URI>" straight to stdout when a run ends, past any log filter
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    redact_logs()
    from mlflow import MlflowClient

    with store_lock(tracking_uri):
        # Both under the lock: depending on the MLflow version the client builds its store (and a fresh sqlite
        # store's tables, an alembic migration that two processes must not run at once) in the constructor or on
        # the first call. Seen racing here: two prepare records at once -> "table _alembic_tmp_tags already exists".
        client = MlflowClient(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            client.search_experiments(max_results=1)
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
