"""Optional MLflow tracking (raydefense.tracking) against a real MLflow file store."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from raydefense import tracking
from raydefense.errors import ConfigError

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store is opt-in; a server is the real use
    return SimpleNamespace(mlflow_uri=(tmp_path / "mlruns").as_uri(), mlflow_experiment="raydefense-test")


def test_a_task_run_records_each_epoch_params_and_its_end(store):
    from mlflow.tracking import MlflowClient

    run = tracking.task_run(store, run_name="exp1", task="uddn",
                            params={"denoise": {"epochs": 3, "guidance": "logits"}, "seed": 0})
    for epoch, loss in enumerate([0.9, 0.5, 0.3]):
        run.log({"epoch": epoch, "train_loss": loss, "val_acc": 0.5 + epoch / 10, "param_digest": 123.0, "note": "x"})
    run.close(failed=False)
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "exp1/uddn"
    assert got.data.tags[tracking.RUN_TAG] == "exp1" and got.data.tags[tracking.TASK_TAG] == "uddn"
    assert got.data.params == {"denoise.epochs": "3", "denoise.guidance": "logits", "seed": "0"}
    hist = client.get_metric_history(run.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 0.9), (1, 0.5), (2, 0.3)]
    assert "param_digest" not in got.data.metrics and "note" not in got.data.metrics


def test_two_runs_share_the_experiment_and_a_failure_is_recorded(store):
    from mlflow.tracking import MlflowClient

    a = tracking.task_run(store, run_name="exp1", task="target")
    b = tracking.task_run(store, run_name="exp1", task="surrogate")
    a.close(failed=True)
    b.close(failed=False)
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    assert client.get_run(a.run_id).info.experiment_id == client.get_run(b.run_id).info.experiment_id
    assert client.get_run(a.run_id).info.status == "FAILED"


def test_many_params_are_logged_in_batches(store):
    from mlflow.tracking import MlflowClient

    run = tracking.task_run(store, run_name="big", task="t", params={f"k{i:03d}": i for i in range(250)})
    assert len(MlflowClient(tracking_uri=store.mlflow_uri).get_run(run.run_id).data.params) == 250


def test_off_by_default_and_tune_gets_rays_callback(store):
    off = SimpleNamespace(mlflow_uri=None, mlflow_experiment="x")
    assert tracking.task_run(off, run_name="r", task="t") is None and tracking.tune_callbacks(off, run_name="r") == []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    (cb,) = tracking.tune_callbacks(store, run_name="r")
    assert isinstance(cb, MLflowLoggerCallback)


def test_uri_without_mlflow_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri .* MLflow is not installed") as err:
        tracking.check_available("http://127.0.0.1:5000")
    assert "\n" not in str(err.value)
