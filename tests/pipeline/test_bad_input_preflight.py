"""What the runner checks before anything waits or is written (issue 10, items 2, 4, 6, 9, 11):
pure functions and the order of the preflight, with Ray replaced by fakes (no Ray starts here)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from raydefense.config import load_config
from raydefense.errors import ClusterError, ConfigError, CorruptFileError, DataError
from raydefense.pipeline import resources as R
from raydefense.pipeline import runner
from raydefense.pipeline.run import open_run
from raydefense.storage import Storage
from tests.conftest import REPO

SMOKE = os.path.join(REPO, "configs", "smoke.yaml")


def cfg_with(*overrides, **values):
    return load_config(SMOKE, list(overrides), values=values or None)


# ----------------------------------------------------------------------------- resources

LOCAL = {"CPU": 4.0, "memory": 8e9, "object_store_memory": 5e8}


def test_smoke_fits_a_four_cpu_local_ray():
    R.check_resources(cfg_with(), LOCAL, gpu=False)


@pytest.mark.parametrize("override, key, words", [
    ("scale.cpus_per_worker=16", "scale.cpus_per_worker", ["16 CPU", "4 CPU, 0 GPU"]),
    ("scale.num_workers=5", "scale.num_workers", ["5 training workers", "holds 4"]),
    ("scale.cpus_per_actor=8", "scale.cpus_per_actor", ["8 CPU"]),
    ("scale.attack_actors=9", "scale.attack_actors", ["9 Ray Data actors", "holds 4"]),
    ("scale.worker_resources={spot: 1}", "scale.worker_resources.spot", ["1 spot"]),
])
def test_each_request_that_cannot_fit_names_its_key(override, key, words):
    with pytest.raises(ConfigError) as info:
        R.check_resources(cfg_with(override), LOCAL, gpu=False)
    msg = str(info.value)
    assert msg.startswith(f"config key '{key}'") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_elastic_training_needs_only_its_minimum():
    R.check_resources(cfg_with("scale.num_workers=2", "scale.max_workers=8"), LOCAL, gpu=False)
    with pytest.raises(ConfigError, match="scale.num_workers"):
        R.check_resources(cfg_with("scale.num_workers=3", "scale.max_workers=8", "scale.cpus_per_worker=2"),
                          LOCAL, gpu=False)


def test_gpu_requests_are_checked_only_on_gpu():
    cfg = cfg_with("scale.gpus_per_worker=2")
    R.check_resources(cfg, LOCAL, gpu=False)
    with pytest.raises(ConfigError, match="'scale.gpus_per_worker'.*2 GPU"):
        R.check_resources(cfg, {**LOCAL, "GPU": 1.0}, gpu=True)
    # One GPU per actor, and the pool shrinks to the GPUs there are (runtime.pool_actors): the
    # default's two CPU actors run as one GPU actor on a one-GPU machine, but that one must fit.
    R.check_resources(cfg_with("scale.attack_actors=2"), {**LOCAL, "GPU": 1.0}, gpu=True)
    R.check_resources(cfg_with("scale.attack_actors=2", "scale.num_workers=2"), {"CPU": 8.0, "GPU": 2.0}, gpu=True)
    # A GPU actor holds 1 GPU and Ray Data's 1 CPU, whatever scale.cpus_per_actor (its CPU-pool size).
    R.check_resources(cfg_with("scale.attack_actors=2", "scale.cpus_per_actor=6"), {**LOCAL, "GPU": 1.0}, gpu=True)
    with pytest.raises(ConfigError, match="'scale.cpus_per_actor'"):
        R.check_resources(cfg_with("scale.attack_actors=2", "scale.cpus_per_actor=6"), LOCAL, gpu=False)


def test_a_bundle_must_fit_on_one_node():
    """8 CPUs in all, but no node has 6: a 6-CPU worker never fits (the total would say it does)."""
    nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    with pytest.raises(ConfigError, match="no node.*2 nodes, the largest 4 CPU"):
        R.check_resources(cfg_with("scale.cpus_per_worker=6"), nodes, gpu=False)
    # Two 3-CPU workers: one per node.
    R.check_resources(cfg_with("scale.cpus_per_worker=3", "scale.num_workers=2"), nodes, gpu=False)
    with pytest.raises(ConfigError, match="'scale.num_workers'.*holds 2"):
        R.check_resources(cfg_with("scale.cpus_per_worker=3", "scale.num_workers=3"), nodes, gpu=False)


def test_fractional_resources_fit_exactly():
    """0.1 * 3 is 0.30000000000000004 in floating point; three 0.1-CPU actors still fit 0.3."""
    req = R.Request("actor", {"CPU": 0.1}, 3, "k", {"CPU": "k"})
    assert R.shortfall(req, [{"CPU": 0.3}]) is None
    assert R.shortfall(R.Request("actor", {"CPU": 0.1}, 4, "k", {"CPU": "k"}), [{"CPU": 0.3}]) is not None


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_waiting_for_an_autoscaler_prints_one_line_then_goes_on():
    cfg = cfg_with("scale.cpus_per_worker=16", "scale.resource_wait_s=60")
    clock, lines = Clock(), []
    calls = {"n": 0}

    def nodes():  # the autoscaler adds a 16-CPU node on the third look
        calls["n"] += 1
        return [LOCAL] + ([{"CPU": 16.0}] if calls["n"] >= 3 else [])

    R.wait_for_resources(cfg, nodes, gpu=False, echo=lines.append, poll_s=5, clock=clock, sleep=clock.sleep)
    assert lines[0].startswith("waiting for resources: config key 'scale.cpus_per_worker'")
    assert "up to 60 s" in lines[0] and len(lines) == 2 and clock.t == 10


def test_waiting_ends_with_the_shortfall_when_the_time_is_up():
    cfg = cfg_with("scale.cpus_per_worker=16", "scale.resource_wait_s=30")
    clock, lines = Clock(), []
    with pytest.raises(ConfigError, match="'scale.cpus_per_worker'.*waited 30 s"):
        R.wait_for_resources(cfg, lambda: [LOCAL], gpu=False, echo=lines.append, poll_s=5, clock=clock,
                             sleep=clock.sleep)
    assert len(lines) == 1 and clock.t == pytest.approx(30)


def test_no_wait_by_default():
    clock = Clock()
    with pytest.raises(ConfigError):
        R.wait_for_resources(cfg_with("scale.cpus_per_worker=16"), lambda: [LOCAL], gpu=False, echo=print,
                             clock=clock, sleep=clock.sleep)
    assert clock.t == 0


# ----------------------------------------------------------------------------- the preflight's order


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if the runner tries to start Ray; record that it would have."""
    started = []

    def fake_init(cfg):
        started.append(cfg)
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runner, "init_ray", fake_init)
    return started


def test_corrupt_marker_fails_before_ray(tmp_path, no_ray):
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path)})
    ctx = open_run(cfg, Storage.open(str(tmp_path)))
    ctx.mark_done("prepare", duration_s=1.0)
    (tmp_path / "r" / "stages" / "prepare.json").write_text("")
    with pytest.raises(CorruptFileError, match=r"prepare.json is corrupt \(empty file\); delete it to redo stage"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    assert not no_ray


def test_corrupt_saved_config_fails_before_ray(tmp_path, no_ray):
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path)})
    open_run(cfg, Storage.open(str(tmp_path)))
    (tmp_path / "r" / "config.yaml").write_bytes(b"\xff\xfe binary")
    with pytest.raises(CorruptFileError, match="config.yaml is corrupt.*not UTF-8.*another --name"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    with pytest.raises(CorruptFileError):
        runner.load_run_config("r", storage=str(tmp_path))
    assert not no_ray


def test_saved_config_with_an_invalid_value_names_the_file(tmp_path):
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path)})
    open_run(cfg, Storage.open(str(tmp_path)))
    path = tmp_path / "r" / "config.yaml"
    path.write_text(path.read_text().replace("lam: 1.0", "lam: -3.0"))
    with pytest.raises(ConfigError, match=r"config.yaml: config key 'distill.lam'.*another --name"):
        runner.load_run_config("r", storage=str(tmp_path))


def test_bad_data_writes_nothing_and_starts_no_ray(tmp_path, no_ray):
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path / "runs"), "data.source": str(tmp_path / "typo")})
    with pytest.raises(DataError, match="typo"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    assert not (tmp_path / "runs" / "r").exists() and not no_ray


def test_folder_with_an_empty_split_is_refused_before_ray(tmp_path, no_ray):
    from PIL import Image

    rng = np.random.default_rng(0)
    for who, n in {"a": 8, "b": 8, "c": 7}.items():  # smoke's splits need 9 for one denoise image
        (tmp_path / "faces" / who).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "faces" / who / f"{i}.png")
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path / "runs"), "data.source": str(tmp_path / "faces")})
    with pytest.raises(DataError, match="split 'denoise' would be empty: an identity needs at least 9 images"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    assert not (tmp_path / "runs" / "r").exists() and not no_ray


def test_ray_init_failure_is_one_line_with_its_cause(tmp_path, monkeypatch):
    def timing_out(cfg):
        raise TimeoutError("Timed out after 30 s waiting for the GCS\nmore lines")

    monkeypatch.setattr(runner, "init_ray", timing_out)
    cfg = cfg_with(name="r", **{"storage.path": str(tmp_path)})
    with pytest.raises(ClusterError) as info:
        runner.run_pipeline(cfg, echo=lambda _: None)
    msg = str(info.value)
    assert "Ray did not start" in msg and "TimeoutError: Timed out after 30 s" in msg and "\n" not in msg
    assert isinstance(info.value.__cause__, TimeoutError)
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_resource_shortfall_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "init_ray", lambda cfg: dict(LOCAL))
    monkeypatch.setattr(runner, "use_gpu", lambda cfg: False)
    monkeypatch.setattr(R, "cluster_nodes", lambda: [dict(LOCAL)])
    cfg = cfg_with("scale.cpus_per_worker=16", name="r", **{"storage.path": str(tmp_path)})
    with pytest.raises(ConfigError, match="'scale.cpus_per_worker'"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    assert not (tmp_path / "r" / "config.yaml").exists()


@pytest.mark.parametrize("override, split", [
    ("data.splits={gnr: 3, denoise: 4, val: 0, test: 3}", "val"),
    ("data.splits={gnr: 0, denoise: 7, val: 2, test: 3}", "gnr"),
    ("data.splits={gnr: 7, denoise: 0, val: 2, test: 3}", "denoise"),
])
def test_a_split_the_stages_read_cannot_be_asked_empty(tmp_path, no_ray, override, split):
    cfg = cfg_with(override, name="r", **{"storage.path": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"'data.splits.{split}': must be >= 1 for a pipeline run"):
        runner.run_pipeline(cfg, echo=lambda _: None)
    assert not (tmp_path / "r").exists() and not no_ray


def test_without_gnr_the_denoise_split_may_be_empty():
    from raydefense.pipeline.prepare import check_source

    check_source(cfg_with("gnr.enabled=false", "data.splits={gnr: 7, denoise: 0, val: 2, test: 3}"))


@pytest.mark.parametrize("path, match", [("/nonexistent-dir/best.yaml", "does not exist"), ("", "must name a file")])
def test_best_config_path_checked_before_the_search(tmp_path, path, match, monkeypatch):
    import raydefense.tune.search as search
    from raydefense.jobs_impl import tune_defense_main

    monkeypatch.setattr(search, "run_search", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(ConfigError, match=f"--best-config.*{match}"):
        tune_defense_main(["--config", SMOKE, "--storage", str(tmp_path), "--best-config", path])


@pytest.mark.parametrize("space, culprit", [
    ("denoise.lr=choice(fast)", "'denoise.lr'"),
    ("denoise.width_mult=choice(big, 2)", "'denoise.width_mult'"),
    ("distill.T=uniform(1, inf)", "'distill.T'"),
    ("distill.lam=choice(nan)", "'distill.lam'"),
    ("distill.student.lr=loguniform(1e-4, x)", "two numbers"),
    ("denoise.guidance=choice(1, 2)", "'denoise.guidance'"),
    ("distill.student.batch_size=int(1, 2.5)", "whole-number"),
])
def test_space_values_that_do_not_fit_name_the_argument(space, culprit):
    from raydefense.tune.space import parse_knob

    with pytest.raises(ConfigError) as info:
        parse_knob(space, cfg_with())
    msg = str(info.value)
    assert msg.startswith(f"--space '{space}'") and culprit in msg and "\n" not in msg


def test_a_tune_trial_needs_room_for_its_driver():
    """A 4-CPU worker fills a 4-CPU cluster: a plain run fits, a Tune trial (0.01-CPU driver) never would."""
    cfg = cfg_with("scale.cpus_per_worker=4")
    R.check_resources(cfg, LOCAL, gpu=False)
    with pytest.raises(ConfigError, match="'scale.cpus_per_worker': a Tune trial holds a 0.01-CPU driver"):
        R.check_resources(cfg, LOCAL, gpu=False, tune=True)
    R.check_resources(cfg, [LOCAL, {"CPU": 1.0}], gpu=False, tune=True)  # the driver fits on another node
    R.check_resources(cfg_with("scale.cpus_per_worker=3"), LOCAL, gpu=False, tune=True)
