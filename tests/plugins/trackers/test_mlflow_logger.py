"""The mlflow callback, read back with MLflow's client from a local file store."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


def test_params_metrics_summary_and_plots_match_the_run(tracked_run, expected_scalars, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    uri = (tmp_path / "mlruns").as_uri()
    run_dir, records, summary = tracked_run(f'name = "mlflow"\ntracking_uri = "{uri}"\n'
                                            'experiment = "digits"')
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "supervised_digits"
    for name, points in expected_scalars(records).items():
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == points, name  # float64: exact
    for key in ("accuracy", "ece_before", "ece_after", "train/steps"):
        assert run.data.metrics[f"summary/{key}"] == summary[key]
    params = run.data.params
    assert params["optimizer.lr"] == "0.001" and params["objectives.0.name"] == "cross_entropy"
    assert params["callbacks.0.name"] == "mlflow" and params["trainer.max_steps"] == "12"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/reliability.png", "plots/training_curves.png"}
