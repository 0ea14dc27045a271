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


def _cfg(store, *extra):
    from raydefense.config import load_config
    from tests.conftest import REPO

    return load_config(f"{REPO}/configs/smoke.yaml", [f"tracking.mlflow_uri={store.mlflow_uri}",
                                                      f"tracking.mlflow_experiment={store.mlflow_experiment}", *extra])


@pytest.mark.parametrize("failed", [False, True])
def test_every_training_epoch_reaches_mlflow_from_the_driver(store, tmp_path, failed):
    """EpochLog (what pipeline.training.fit wraps every Ray Train fit in) logs each epoch record
    the Ray Train callback writes, and ends the MLflow run FINISHED, or FAILED when the fit failed."""
    import json

    from mlflow.tracking import MlflowClient

    from raydefense.pipeline.training import EpochLog
    from raydefense.storage import Storage

    cfg = _cfg(store, "name=exp7")
    lines: list[str] = []
    ctx = SimpleNamespace(cfg=cfg, storage=Storage.open(str(tmp_path / "exp7")), echo=lines.append)
    with EpochLog(ctx, "target", epochs=2) as log:
        with open(log.path, "a") as f:  # what the callback on the driver's node appends
            for epoch in range(2):
                f.write(json.dumps({"epoch": epoch, "train_loss": 1.0 - epoch / 2, "val_acc": 0.6 + epoch / 10,
                                    "epoch_s": 0.5, "param_digest": 3.0}) + "\n")
        log.poll()
        log.failed = failed
    assert len(lines) == 2 and lines[1].startswith("  target: epoch 2/2")
    client = MlflowClient(tracking_uri=store.mlflow_uri)
    exp = client.get_experiment_by_name(store.mlflow_experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TASK_TAG}` = 'target'")
    assert run.info.run_name == "exp7/target" and run.info.status == ("FAILED" if failed else "FINISHED")
    assert run.data.params["models.target"] == cfg.models.target and run.data.params["name"] == "exp7"
    hist = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1] and hist[1].value == pytest.approx(0.7)


def test_config_refuses_a_uri_without_mlflow(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib.util.find_spec -> None
    with pytest.raises(ConfigError, match=r"tracking\.mlflow_uri.*not installed"):
        _cfg(store)
