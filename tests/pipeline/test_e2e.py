"""End-to-end: the smoke preset through every stage on a real local Ray, locally and on S3.

These run the real job script in a subprocess (as a user would), each with its own local
Ray. They are the slowest tests of the suite (minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEFENSES = ("none", "dae", "pixel_guided", "uddn", "uddn_kt", "jpeg", "dcn", "distillation")
SETS = ("clean", "white_box", "black_box")
# A faster smoke for the tests that check storage and resumption, not the baselines.
LEAN = ["--set", "baselines.enabled=[jpeg]", "--set", "denoise.baselines=[]", "--set", "eval.adaptive=false"]


def run_job(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "jobs/full_pipeline.py", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _check_metrics(m: dict, defenses=DEFENSES) -> None:
    assert set(m["accuracy"]) == set(defenses)
    for d in defenses:
        for s in SETS:
            a = m["accuracy"][d][s]
            assert 0.0 <= a <= 1.0
            det = m["accuracy_detail"][d][s]
            assert det["n"] > 0 and det["ci95"][0] <= a <= det["ci95"][1]
    for d in ("none", "uddn"):
        assert set(m["l1"][d]) == set(SETS)
    assert m["l1"]["none"]["clean"] == pytest.approx(0.0, abs=1e-7)
    assert m["l1"]["none"]["white_box"] > 0
    for d in defenses:
        eps = [e for e, _ in m["by_epsilon"][d]]
        assert eps == sorted(eps) and all(0 <= a <= 1 for _, a in m["by_epsilon"][d])
    for stage in ("prepare", "models", "attack", "gnr", "denoise", "distill", "baselines", "evaluate"):
        assert m["timings_s"][stage] >= 0
    assert m["config"]["name"]


def test_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "e2e")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "e2e"
    m = json.loads((run / "report" / "metrics.json").read_text())
    _check_metrics(m)
    # Attacks on the whole defended model: PGD through the defense never beats clean accuracy
    # on the same images, and is reported for every adaptive defense.
    for d in m["adaptive"]:
        assert 0 <= m["accuracy"][d]["adaptive_pgd"] <= 1
    report = (run / "report" / "report.md").read_text()
    for heading in ("Table 1", "Tables 2 and 3", "Attacks on the whole defended model", "Timings"):
        assert heading in report
    from PIL import Image

    for png in ("figure6_denoising.png", "figure7_accuracy_vs_eps.png", "adaptive_pgd.png"):
        with Image.open(run / "report" / png) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    # Ray Train checkpoints, Parquet shards, weights.
    assert list((run / "train" / "target").glob("checkpoint_*/state.pt"))
    assert list((run / "data" / "clean").glob("*.parquet"))
    assert list((run / "data" / "adv" / "set=test_white").glob("*.parquet"))
    for name in ("target", "surrogate", "uddn", "dae", "pixel_guided", "teacher", "student", "dcn", "distillation",
                 "gnr_generator"):
        assert (run / "models" / f"{name}.pt").is_file(), name
    # The summary table is printed.
    assert "UDDN + knowledge transfer vs no defense" in res.stdout
    # Running again with the same name redoes nothing.
    again = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "e2e")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipping") == 8


def test_smoke_on_s3(tmp_path, s3_server, s3_bucket):
    from raydefense.storage import boto3_client

    res = run_job("--config", "configs/smoke.yaml", "--storage", f"s3://{s3_bucket}/runs", "--name", "s3run", *LEAN,
                  env={"AWS_ENDPOINT_URL": s3_server})
    assert res.returncode == 0, res.stderr[-3000:]
    s3 = boto3_client(endpoint_url=s3_server)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="runs/s3run/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    assert any(k.startswith("runs/s3run/train/target/checkpoint_") and k.endswith("state.pt") for k in keys)
    assert any(k.startswith("runs/s3run/data/clean/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("runs/s3run/data/adv/set=test_black/") and k.endswith(".parquet") for k in keys)
    assert "runs/s3run/report/report.md" in keys and "runs/s3run/report/metrics.json" in keys
    m = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/s3run/report/metrics.json")["Body"].read())
    _check_metrics(m, defenses=("none", "uddn", "uddn_kt", "jpeg"))
    # Credentials never reach the logs or the report.
    report = s3.get_object(Bucket=s3_bucket, Key="runs/s3run/report/report.md")["Body"].read().decode()
    for text in (res.stdout, res.stderr, report, json.dumps(m)):
        assert "testing" not in text.replace("s3run", "")


def test_killed_run_resumes_without_redoing_finished_stages(tmp_path):
    """Kill the job (SIGKILL, whole process group) once its first training stage finished,
    then run it again: prepare and models are skipped, the rest runs."""
    args = [sys.executable, "jobs/full_pipeline.py", "--config", "configs/smoke.yaml", "--storage", str(tmp_path),
            "--name", "kill", *LEAN]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = tmp_path / "kill" / "stages" / "models.json"
    deadline = time.time() + 600
    try:
        while not marker.exists():
            assert proc.poll() is None, "the job ended before its models stage finished"
            assert time.time() < deadline, "models stage did not finish in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished_at = json.loads(marker.read_text())["finished_at"]
    target_mtime = (tmp_path / "kill" / "models" / "target.pt").stat().st_mtime
    res = run_job("--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "kill", *LEAN,
                  "--stop-after", "attack")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "prepare: finished earlier, skipping" in res.stdout
    assert "models: finished earlier, skipping" in res.stdout
    assert "[3/8] attack: done" in res.stdout
    assert json.loads(marker.read_text())["finished_at"] == finished_at
    assert (tmp_path / "kill" / "models" / "target.pt").stat().st_mtime == target_mtime


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path):
    """A training that fails after epoch 0 (injected, like a preempted node) resumes at epoch 1."""
    base = ["--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "crash", *LEAN,
            "--stop-after", "models"]
    res = run_job(*base, env={"RAYDEFENSE_CRASH_AFTER": "target:0"})
    assert res.returncode != 0
    assert not (tmp_path / "crash" / "stages" / "models.json").exists()
    assert list((tmp_path / "crash" / "train" / "target").glob("checkpoint_*/state.pt"))
    res = run_job(*base)
    assert res.returncode == 0, res.stderr[-3000:]
    import torch

    blob = torch.load(tmp_path / "crash" / "models" / "target.pt", weights_only=True)
    assert blob["metrics"]["start_epoch"] == 1
