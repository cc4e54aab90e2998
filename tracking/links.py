"""Links into the MLflow UI that open where an ML engineer expects: the classic model-training view.

MLflow 3's UI opens an experiment in its GenAI view ("Evaluation runs", traces) unless the experiment is tagged
``mlflow.experimentKind=custom_model_development`` (tracking.naming) or the link says
``workflowType=machine_learning``; the view is also remembered by the browser, so every link the project prints
carries the parameter. MLflow's UI routes live after ``#``, and their query string too.
"""

from __future__ import annotations

ML_VIEW = "workflowType=machine_learning"
"""The query parameter of MLflow 3.x's UI that selects its Model training view."""
NOTE_TAG = "mlflow.note.content"
"""The run tag MLflow shows as the run's description (markdown), at the top of the run page."""
DASHBOARD = "http://127.0.0.1:5000"
"""Where ``make dashboard`` / ``python -m tracking dashboard`` serve by default."""


def experiments_url(base: str) -> str:
    """The experiments list."""
    return f"{base}/#/experiments?{ML_VIEW}"


def run_page_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's metric charts: its training loss first (trainer.loop.TRACKED_NAMES)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{ML_VIEW}"


def compare_url(base: str, experiment_id: str) -> str:
    """The experiment's runs side by side as charts: one chart per metric, every run a bar or a line on it."""
    return f"{base}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&{ML_VIEW}"
