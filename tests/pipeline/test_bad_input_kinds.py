"""Bad input, kind by kind (issue 10): each ends with one line naming the culprit, exit code 2,
and nothing of the run written. Most fail before Ray starts (cheap); the two that need Ray
(a resource request the cluster cannot hold, ray.init refusing its settings) start and stop
a local Ray in a few seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.pipeline.test_bad_input import assert_one_line_error

SMOKE = ("--config", "configs/smoke.yaml")


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}  # a None value removes the variable
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in full.items() if v is not None})


def job(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_script("jobs/full_pipeline.py", *args, **kw)


def assert_ray_never_started(res: subprocess.CompletedProcess) -> None:
    out = res.stdout + res.stderr
    assert "raydefense run '" not in out and "Started a local Ray" not in out, out[-1500:]


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("content", [
    "name: caf\xe9\n".encode("latin-1"),  # Latin-1 text
    bytes(range(256)) * 4,  # binary
], ids=["latin1", "binary"])
def test_config_file_that_is_not_utf8(tmp_path, content):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    res = job("--config", str(cfg), "--storage", str(tmp_path / "runs"))
    assert_one_line_error(res, str(cfg), "UTF-8")
    assert not (tmp_path / "runs").exists()


# One of each kind end to end; tests/test_config.py covers every key and value in-process.
@pytest.mark.parametrize("override, key", [
    ("attack.eps_max=1/0", "attack.eps_max"),  # arithmetic
    ("models.target_train.lr=inf", "models.target_train.lr"),  # non-finite floats
    ("attack.seed=-1", "attack.seed"),  # values the stages would choke on much later
    ("scale.object_store_memory_mb=1e8", "scale.object_store_memory_mb"),
])
def test_bad_value_fails_at_load(tmp_path, override, key):
    res = job(*SMOKE, "--storage", str(tmp_path), "--set", override)
    assert_one_line_error(res, key)
    assert not any(tmp_path.iterdir())


def test_small_synthetic_data_names_the_split(tmp_path):
    res = job(*SMOKE, "--storage", str(tmp_path), "--set", "data.images_per_identity=4")
    assert_one_line_error(res, "data.images_per_identity", "split 'val'", "12")


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args, culprit", [
    (("--name", ""), "--name"),
    (("--name", ".."), "--name"),
    (("--data", ""), "--data"),
    (("--storage", "gs://bucket/runs"), "gs://bucket/runs"),
])
def test_bad_flag_is_named(tmp_path, args, culprit):
    extra = () if "--storage" in args else ("--storage", str(tmp_path))
    res = job(*SMOKE, *extra, *args)
    assert_one_line_error(res, culprit)
    assert not any(tmp_path.iterdir())


def test_data_typo_writes_nothing_so_the_corrected_rerun_is_accepted(tmp_path):
    """Item 11: a bad --data fails before the run's config.yaml is written."""
    res = job(*SMOKE, "--storage", str(tmp_path), "--name", "exp", "--data", str(tmp_path / "typo"))
    assert_one_line_error(res, str(tmp_path / "typo"))
    assert not (tmp_path / "exp").exists()


def _faces(root, per_identity: dict[str, int]):
    from PIL import Image

    rng = np.random.default_rng(0)
    for who, n in per_identity.items():
        (root / who).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / who / f"{i}.png")


def test_data_folder_with_too_few_images_names_the_split(tmp_path):
    """Item 9 for --data: smoke's splits (3/4/2/3) need 5 images per identity for one val image."""
    _faces(tmp_path / "faces", {"alice": 4, "bob": 4, "carol": 3})
    res = job(*SMOKE, "--storage", str(tmp_path / "runs"), "--name", "few", "--data", str(tmp_path / "faces"))
    assert_one_line_error(res, "split 'val'", "at least 5 images", "largest identity has 4")
    assert_ray_never_started(res)
    assert not (tmp_path / "runs" / "few").exists()


# ----------------------------------------------------------------------------- files read back


def _make_run(root, name="r"):
    """A run folder as a finished prepare stage leaves it (config.yaml and its marker)."""
    from raydefense.config import load_config
    from raydefense.pipeline.run import open_run
    from raydefense.storage import Storage

    cfg = load_config(os.path.join(REPO, "configs", "smoke.yaml"), values={"name": name, "storage.path": str(root)})
    ctx = open_run(cfg, Storage.open(str(root)))
    ctx.mark_done("prepare", duration_s=1.0)
    return root / name


@pytest.mark.parametrize("script", ["jobs/full_pipeline.py", "jobs/evaluate.py"])
def test_corrupt_saved_config(tmp_path, script):
    run = _make_run(tmp_path)
    (run / "config.yaml").write_text("name: r\ndata: [unclosed\n")
    extra = SMOKE if script == "jobs/full_pipeline.py" else ()
    res = run_script(script, *extra, "--storage", str(tmp_path), "--name", "r")
    assert_one_line_error(res, str(run / "config.yaml"), "another --name")
    assert_ray_never_started(res)


def test_saved_config_that_is_not_a_mapping_for_evaluate(tmp_path):
    run = _make_run(tmp_path)
    (run / "config.yaml").write_text("just text\n")
    res = run_script("jobs/evaluate.py", "--storage", str(tmp_path), "--name", "r")
    assert_one_line_error(res, "config.yaml", "holds a str")


# Two shapes end to end; tests/test_storage.py and test_bad_input_preflight.py cover the others in-process.
@pytest.mark.parametrize("content", ["", json.dumps({"stage": "other", "duration_s": 1})], ids=["empty", "wrong-stage"])
def test_corrupt_stage_marker_fails_before_ray(tmp_path, content):
    run = _make_run(tmp_path)
    (run / "stages" / "prepare.json").write_text(content)
    res = job(*SMOKE, "--storage", str(tmp_path), "--name", "r")
    assert_one_line_error(res, str(run / "stages" / "prepare.json"), "redo stage 'prepare'")
    assert_ray_never_started(res)


# ----------------------------------------------------------------------------- tune


@pytest.mark.parametrize("space, culprit", [("denoise.lr=choice(fast)", "denoise.lr=choice(fast)")])
def test_tune_space_with_a_word_for_a_number(tmp_path, space, culprit):
    res = run_script("jobs/tune_defense.py", *SMOKE, "--storage", str(tmp_path), "--space", space)
    assert_one_line_error(res, "--space", culprit)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- Ray (a few seconds each)


@pytest.fixture()
def own_local_ray(tmp_path_factory):
    """Env for a job that starts its own local Ray: a fresh RAY_TMPDIR, so that a cluster some
    other process started with `ray start` on this machine (its address file lives in the
    default temp dir) is not joined. Short path: Ray's socket paths must stay under 107 chars."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rd-")
    yield {"RAY_TMPDIR": tmp, "RAY_ADDRESS": None}
    shutil.rmtree(tmp, ignore_errors=True)


def test_worker_larger_than_the_cluster_fails_at_once(tmp_path, own_local_ray):
    """Item 2: a training worker of 16 CPUs on a local Ray of a few CPUs: one line, exit 2, no wait."""
    res = job(*SMOKE, "--storage", str(tmp_path), "--name", "big", "--set", "scale.cpus_per_worker=16",
              env=own_local_ray, timeout=180)
    assert_one_line_error(res, "scale.cpus_per_worker", "16 CPU", "cluster:")
    assert not (tmp_path / "big" / "config.yaml").exists()


def test_ray_init_refusing_its_settings_is_one_line(tmp_path, own_local_ray):
    """Item 6: an object store larger than the machine makes ray.init raise; one line names the key."""
    res = job(*SMOKE, "--storage", str(tmp_path), "--name", "mem",
              "--set", "scale.object_store_memory_mb=10000000", env=own_local_ray, timeout=180)
    assert_one_line_error(res, "Ray did not start", "scale.object_store_memory_mb=10000000")
    assert not (tmp_path / "mem" / "config.yaml").exists()
