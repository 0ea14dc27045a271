"""Bad input ends with one line naming the culprit and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/full_pipeline.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def assert_one_line_error(res: subprocess.CompletedProcess, *culprits: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    last = [line for line in res.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("error: "), last
    for c in culprits:
        assert c in last, (c, last)


@pytest.mark.parametrize("override, key", [
    ("nosuch.key=1", "nosuch"),
    ("distill.T=0.5", "distill.T"),
    ("distill.lam=-2", "distill.lam"),
    ("data.image_size=big", "data.image_size"),
])
def test_bad_set_is_rejected_before_anything_runs(tmp_path, override, key):
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--set", override)
    assert_one_line_error(res, key)
    assert not any(tmp_path.iterdir())


def test_path_with_no_images(tmp_path):
    data = tmp_path / "faces"
    (data / "alice").mkdir(parents=True)
    (data / "alice" / "notes.txt").write_text("no images here")
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path / "runs"), "--data", str(data))
    assert_one_line_error(res, str(data))


def test_missing_data_path(tmp_path):
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path / "runs"), "--data", str(tmp_path / "nope"))
    assert_one_line_error(res, str(tmp_path / "nope"))


def test_identity_folder_of_unreadable_files(tmp_path):
    """Decoding happens in Ray Data workers; the error still comes back as one line naming the file."""
    from PIL import Image
    import numpy as np

    data = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for who in ("alice", "bob", "carol"):
        (data / who).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / who / f"{i}.png")
    (data / "dave").mkdir()
    for i in range(12):
        (data / "dave" / f"{i}.jpg").write_bytes(b"this is not a jpeg" * 10)
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path / "runs"), "--data", str(data),
                  "--name", "bad")
    assert_one_line_error(res, "dave")
    # Nothing half-written is taken for finished: no stage marker exists.
    assert not (tmp_path / "runs" / "bad" / "stages" / "prepare.json").exists()


def test_unreachable_s3_endpoint(tmp_path):
    res = run_job("--config", "configs/smoke.yaml", "--storage", "s3://bucket/runs",
                  env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert_one_line_error(res, "s3://bucket/runs")


def test_missing_config_file(tmp_path):
    res = run_job("--config", str(tmp_path / "none.yaml"))
    assert_one_line_error(res, "none.yaml")
