"""init_ray's runtime_env inside and outside a submitted job, against Ray's own merge rule (no
cluster started; test_clean_node.py checks the same on a real head)."""
from __future__ import annotations

import json

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.runtime_env.runtime_env import _merge_runtime_env

from raydefense.pipeline.runtime import _driver_runtime_env

JOB_ENV = {
    "working_dir": "gcs://_ray_pkg_0123456789abcdef.zip",
    "pip": {"packages": ["kornia==0.9.0"], "pip_check": False},
    "env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "default", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "4"},
}


@pytest.fixture
def hooks(monkeypatch):
    for k in [k for k in __import__("os").environ if k.startswith("RAYDEFENSE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RAYDEFENSE_HOOK", "1")  # this process's environment is not forwarded
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    monkeypatch.delenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", raising=False)
    return monkeypatch


def _as_submitted_job(monkeypatch, runtime_env: dict) -> None:
    """What Ray's JobSupervisor puts in the entrypoint's environment (job_supervisor.py)."""
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_local_driver_sends_warnings_filter_and_ray_data_knobs_only(hooks):
    env = _driver_runtime_env()
    assert env == {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}}


def test_a_user_setting_of_ray_data_knobs_wins(hooks):
    hooks.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "8")
    assert _driver_runtime_env()["env_vars"]["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "8"


def test_old_behaviour_conflicts_with_the_job(hooks):
    """What init_ray used to pass: Ray's merge refuses it (ray.init raised ValueError) as soon as
    the job sets PYTHONWARNINGS."""
    old = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    assert _merge_runtime_env(JOB_ENV, old) is None


def test_inside_a_job_the_job_runtime_env_wins(hooks):
    _as_submitted_job(hooks, JOB_ENV)
    ours = _driver_runtime_env()
    assert ours is None  # the job sets every variable we would: nothing to add, nothing to merge


def test_inside_a_job_the_driver_adds_only_what_the_job_lacks(hooks):
    job = {**JOB_ENV, "env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "default"}}
    _as_submitted_job(hooks, job)
    ours = _driver_runtime_env()
    assert ours == {"env_vars": {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}}
    merged = _merge_runtime_env(job, ours)  # what ray.init does with it
    assert merged is not None
    assert merged["working_dir"] == JOB_ENV["working_dir"] and merged["pip"] == JOB_ENV["pip"]
    assert merged["env_vars"] == {**job["env_vars"], "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def test_inside_a_job_without_env_vars(hooks):
    _as_submitted_job(hooks, {"working_dir": JOB_ENV["working_dir"]})
    ours = _driver_runtime_env()
    assert ours["env_vars"]["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    assert _merge_runtime_env({"working_dir": JOB_ENV["working_dir"]}, ours)["working_dir"] == JOB_ENV["working_dir"]
