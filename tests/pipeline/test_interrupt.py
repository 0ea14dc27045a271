"""Ctrl-C means stop: SIGINT to the job's process group (what a terminal sends) during a
training, and during a stage after a training finished (Ray Train's own SIGINT handler used
to stay installed there and swallow it), ends the run within seconds with one line and exit
code 130, leaving no stage marked finished that did not finish."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from raydefense.pipeline.runner import STAGE_NAMES
from tests.conftest import REPO

# The smoke preset without the slow baselines: these runs are stopped early anyway.
LEAN = ["--set", "baselines.enabled=[jpeg]", "--set", "denoise.baselines=[]", "--set", "eval.adaptive=false"]

pytestmark = pytest.mark.slow
MESSAGE = "interrupted; run again with the same --name to resume"


def _interrupt_when(tmp_path, name: str, ready, *, extra=()) -> tuple[int, str, float]:
    args = [sys.executable, "jobs/full_pipeline.py", "--config", "configs/smoke.yaml", "--storage", str(tmp_path),
            "--name", name, *LEAN, *extra]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        # As from a terminal: SIGINT at its default disposition in the job. A shell that starts
        # pytest in the background (`pytest &` in a script) hands SIGINT on ignored, and an ignored
        # SIGINT stays ignored across exec, so Python would never raise KeyboardInterrupt.
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 600
        try:
            while not ready(log.read_text()):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the run never reached the point to interrupt"
                time.sleep(0.2)
            t0 = time.time()
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=60)
            took = time.time() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, log.read_text(), took


def test_ctrl_c_during_a_training_stops_the_run(tmp_path):
    target_dir = tmp_path / "during" / "train" / "target-surrogate"  # the models stage's one fit
    rc, out, took = _interrupt_when(tmp_path, "during", lambda _: target_dir.exists(),
                                    extra=["--set", "models.target_train.epochs=400"])
    assert rc == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == MESSAGE
    assert "Traceback" not in out
    assert took < 30
    assert not (tmp_path / "during" / "stages" / "models.json").exists()
    assert not (tmp_path / "during" / "models" / "target.pt").exists()


def test_ctrl_c_after_a_training_stops_the_run(tmp_path):
    # One or two epochs per classifier: the point is the stage after a finished Ray Train fit.
    rc, out, took = _interrupt_when(tmp_path, "after", lambda text: f"[3/{len(STAGE_NAMES)}] attack" in text,
                                    extra=["--set", "models.target_train.epochs=2",
                                           "--set", "models.surrogate_train.epochs=1"])
    assert rc == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == MESSAGE
    assert "Traceback" not in out and "Gracefully aborting" not in out
    # The console (not a terminal here) has the run's lines and Ray Data's dataset totals, not
    # Ray's INFO records or Ray Data's per-operator progress ("  Tasks: 0; Actors: 1 (...)")
    # (runtime.init_ray / ray_data_console).
    assert "INFO worker.py" not in out and "; Actors: " not in out, out[:3000]
    assert "Progress bars for operators disabled" not in out and "Token authentication is enabled" not in out, out[:3000]
    assert "Total Progress" in out
    assert f"[2/{len(STAGE_NAMES)}] models: done" in out
    assert took < 30
    stages = tmp_path / "after" / "stages"
    assert (stages / "models.json").exists() and not (stages / "attack.json").exists()
