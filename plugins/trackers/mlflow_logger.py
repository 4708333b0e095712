"""MLflow: a run's metrics, parameters, summary and plots in an MLflow tracking store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.tracking import Tracker

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value


class MLflowLogger(Tracker):
    """Logs through ``mlflow.tracking.MlflowClient`` to ``tracking_uri`` (default: MLflow's own
    choice, e.g. ``$MLFLOW_TRACKING_URI``), in ``experiment``, as a run named ``run_name``
    (default: the recipe's name, else the run directory's): parameters (the recipe's dotted
    keys), metrics with their steps, ``summary/<key>`` metrics, the plots as artifacts under
    ``plots/``; the run is marked FINISHED at the end."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "paperplug",
                 run_name: str | None = None):
        super().__init__()
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id: str | None = None

    def start(self, run_dir: Path | None, params: dict[str, Any]) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError("callback 'mlflow' needs MLflow: pip install 'paperplug[trackers]'"
                              ) from exc
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(self.experiment))
        name = self.run_name or params.get("name") or (run_dir.name if run_dir else None)
        run = self.client.create_run(experiment_id, run_name=name)
        self.run_id = run.info.run_id
        if params:
            self.client.log_batch(self.run_id, params=[
                Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()])

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    log_summary = log_scalars

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


CARD = Card(
    name="mlflow", kind="callback",
    title="MLflow Tracking: parameters, metrics and artifacts of a run",
    paper="https://mlflow.org/docs/latest/ml/tracking/",
    summary="Sends the records of metrics.jsonl, the recipe's parameters, the final summary and "
            "the run's plots to an MLflow tracking store (main process only).",
    formula="params = recipe (dotted keys); metrics train/<key>, epoch/<key> at each record's "
            "step; summary/<key>; artifacts plots/*.png",
    left_out="Model logging (mlflow.pytorch) and the model registry: export with `paperplug "
             "export` instead. A run that raises stays RUNNING. Needs MLflow (extra "
             "'trackers'); MLflow 3 refuses a plain file store unless MLFLOW_ALLOW_FILE_STORE "
             "is set (use sqlite:///...).",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(MLflowLogger, card=CARD)
