"""Optional MLflow tracking, off by default: ``tracking.mlflow_uri`` in the config turns it on.

Two places log to MLflow, both on the driver:

- every Ray Train fit (:class:`raydefense.pipeline.training.EpochLog`): one MLflow run per
  training task, named ``<run>/<task>``, with the task's epoch metrics (the same records as
  the console lines and TensorBoard: ``train_loss``, ``val_acc``, ``epoch_s``, ... with the
  epoch as the step) and the run's flattened config as parameters. The per-epoch records
  already reach the driver through a Ray Train ``UserCallback``, so MLflow is needed on the
  driver only (not on every worker node, as with ``ray.air.integrations.mlflow.setup_mlflow``
  in the training function), and the MLflow run is ended FINISHED or FAILED even when a worker
  is killed;
- every Tune search: Ray's own ``MLflowLoggerCallback`` (:func:`tune_callbacks`), one MLflow run
  per trial with its params and reported metrics.

MLflow is not a dependency of raydefense: ``pip install mlflow-skinny`` (the ``tracking``
extra) or the full ``mlflow``. A set ``mlflow_uri`` without MLflow installed is a
:class:`~raydefense.errors.ConfigError` when the config loads (``TrackingConfig.validate``), before
anything runs; :func:`check_available` repeats it for callers that build the tracking settings
themselves.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional

from raydefense.config import flatten
from raydefense.errors import ConfigError

RUN_TAG = "raydefense.run"
TASK_TAG = "raydefense.task"
_MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit for params
_MAX_PARAM_CHARS = 500  # MLflow's limit on a param value's length (6000 on newer servers; the lower one is safe)


def check_available(mlflow_uri: Optional[str]) -> None:
    """Raise ConfigError (one line, names ``tracking.mlflow_uri``) when tracking is asked for
    and MLflow is not importable."""
    if not mlflow_uri:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tracking.mlflow_uri is set ({mlflow_uri}) but MLflow is not installed: "
                          "pip install mlflow-skinny (or raydefense[tracking])") from exc


def _params(tree: Mapping[str, Any]) -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, string values of MLflow's maximum length."""
    return {k: str(v)[:_MAX_PARAM_CHARS] for k, v in flatten(tree).items()}


class MLflowTaskRun:
    """One MLflow run for one training task, written through ``MlflowClient`` (explicit run
    ids, no process-global active run, so two fits in one driver cannot mix their metrics).

    ``log(record)`` takes an epoch record as the training loops report it (``epoch`` is the
    step; non-numeric values and ``param_digest`` are skipped). ``close(failed)`` ends the run
    FINISHED or FAILED.
    """

    def __init__(self, mlflow_uri: str, experiment: str, *, run_name: str, task: str,
                 params: Optional[Mapping[str, Any]] = None):
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=f"{run_name}/{task}",
                                     tags={RUN_TAG: run_name, TASK_TAG: task})
        self.run_id = run.info.run_id
        items = sorted(_params(params or {}).items())
        for i in range(0, len(items), _MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + _MAX_PARAMS_PER_CALL]],
                                  tags=[RunTag(TASK_TAG, task)] if i == 0 else [])

    def log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(record.get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in record.items()
                   if k not in ("epoch", "param_digest") and isinstance(v, (int, float))]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, *, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def task_run(tracking, *, run_name: str, task: str, params: Optional[Mapping[str, Any]] = None
             ) -> Optional[MLflowTaskRun]:
    """The MLflow run of one training task, or None when ``tracking.mlflow_uri`` is unset."""
    if not tracking.mlflow_uri:
        return None
    check_available(tracking.mlflow_uri)
    return MLflowTaskRun(tracking.mlflow_uri, tracking.mlflow_experiment, run_name=run_name, task=task, params=params)


def tune_callbacks(tracking, *, run_name: str) -> list[Any]:
    """Ray Tune's own MLflow integration for a search: ``[MLflowLoggerCallback]``, or [] when
    ``tracking.mlflow_uri`` is unset."""
    if not tracking.mlflow_uri:
        return []
    check_available(tracking.mlflow_uri)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=tracking.mlflow_uri, experiment_name=tracking.mlflow_experiment,
                                 tags={RUN_TAG: run_name}, save_artifact=False)]
