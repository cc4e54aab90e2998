"""Every MLflow path of the project: the training run's tracker, the prepare and evaluation records, the CLI.

- ``naming``: what MLflow is given (secret redaction, param flattening, metric names), where (the store URI,
  the experiment), and how a client is opened.
- ``journal``: ``OUT/mlflow_spool``, the on-disk journal of a training run's operations.
- ``sender``: sends journal operations to MLflow with ``MlflowClient``.
- ``worker``: the background thread of a training run (journal, send, retry, system metrics, loss curve).
- ``tracker``: ``Tracker`` and ``open_tracker``, the facade the training loop calls.
- ``records``: one-shot records (a finished prepare, an evaluation) and the environment a run records.
- ``cli``: ``python -m tracking sync OUT`` and ``python -m tracking dashboard``.

This package imports neither ``trainer`` nor ``data_pipeline``: callers hand it plain values (dicts,
strings, paths). Importing it does not import mlflow; only sending does.
"""
