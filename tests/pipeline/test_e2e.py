"""End-to-end: the smoke preset through every stage on a real local Ray.

This runs the real job script in a subprocess (as a user would), with its own local Ray.
S3 storage, several nodes, a killed training worker and a killed driver are covered by
tests/distributed/test_multinode_pipeline.py; Ctrl-C by tests/pipeline/test_interrupt.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
