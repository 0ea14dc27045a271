"""The documented cluster path on a node without raydefense:

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- python jobs/full_pipeline.py --config configs/smoke.yaml

against a `ray start --head` from a virtual environment that has only
ray[default,train,tune,data] and torch/torchvision (tests/cluster/bare_ray.py: those distributions
linked from the test's own environment, created once and cached under the user's cache dir; the
head has its own temp dir, ports and token, and is stopped by PID). Costs on 2 cores
(2026-12-04): ~6 s to create the venv when absent (it was ~95 s when pip unpacked torch into it),
then one job of ~115 s: Ray clones the node's venv (links, not gigabytes) and pip-installs the
project's other dependencies into the clone, then the probe and the shrunk smoke pipeline run.
"""
from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster.bare_ray import REPO, bare_venv, start_head

pytestmark = pytest.mark.slow

# configs/smoke.yaml shrunk to what proves the path: Ray Data tasks and actor pools (prepare,
# attack, evaluation) and Ray Train workers (target, surrogate, UDDN) all run in the job's
# runtime env; the stages' own correctness is tests/pipeline's business.
SHRINK = ["models.target_train.epochs=2", "models.surrogate_train.epochs=1", "gnr.enabled=false",
          "denoise.epochs=1", "denoise.baselines=[]", "distill.enabled=false", "baselines.enabled=[jpeg]",
          "eval.adaptive=false", "eval.autoattack=false", "eval.by_epsilon=[0.0]", "eval.figure_examples=1"]
SUBMIT_TIMEOUT_S = 1500  # per job; the shrunk smoke job needs several minutes on an idle 2-core machine (it was still
# going at 900 s, past gnr, on a machine loaded to 60-90 by three other Ray clusters)


@pytest.fixture(scope="module")
def head():
    venv, created_s = bare_venv()
    print(f"\nbare venv {venv}: {'created in %.0f s' % created_s if created_s else 'cached'}")
    t0 = time.monotonic()
    with start_head(venv, num_cpus=4) as h:
        print(f"head {h.dashboard_url} answering `ray job list` after {time.monotonic() - t0:.0f} s")
        yield h


def _submit(head, runtime_env: Path, *entrypoint: str) -> tuple[str, str, float]:
    """`ray job submit` from the repository root; returns (job id, its logs, seconds)."""
    t0 = time.monotonic()
    r = head.ray_cli("job", "submit", "--working-dir", ".", "--runtime-env", str(runtime_env), "--",
                     *entrypoint, timeout=SUBMIT_TIMEOUT_S)
    took = time.monotonic() - t0
    m = re.search(r"raysubmit_\w+", r.stdout + r.stderr)
    assert m, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = m.group(0)
    logs = head.ray_cli("job", "logs", job_id).stdout
    status = head.ray_cli("job", "status", job_id).stdout
    # `ray job status` ends with "Job 'raysubmit_...' succeeded" (or failed/stopped).
    assert r.returncode == 0 and re.search(r"\bsucceeded\b", status, re.I), \
        f"{status}\n{logs[-6000:]}\n{r.stderr[-2000:]}"
    return job_id, logs, took


def test_bare_venv_cannot_import_raydefense(head):
    """What makes the other tests mean something: the node's own Python lacks the project and its
    third-party packages, but has Ray and torch."""
    r = head.python("import raydefense")
    assert r.returncode != 0 and "No module named 'raydefense'" in r.stderr
    r = head.python("import kornia")
    assert r.returncode != 0
    r = head.python("import ray, torch, torchvision; print(ray.__version__, torch.__version__)")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def clean_job(head, tmp_path_factory):
    """ONE `ray job submit` (each submission pays for a job driver and its Ray connection): the
    entrypoint first runs tests/cluster/probe_job.py, then the shrunk smoke pipeline, in the
    runtime env of cluster/runtime_env.yaml plus two variables: PYTHONWARNINGS (which init_ray
    also sets: the job's value must win; Ray refused to connect before) and a marker."""
    tmp = tmp_path_factory.mktemp("clean")
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env["env_vars"].update(PYTHONWARNINGS="default", RAYDEFENSE_PROBE_JOB="from-job")
    rt = tmp / "runtime_env.yaml"
    rt.write_text(yaml.safe_dump(env))
    storage = tmp / "storage"
    sets = [a for s in SHRINK for a in ("--set", s)]
    # `ray job submit` shell-quotes each word of the entrypoint (shlex.join), so the chain is one
    # `bash -c` word.
    pipeline = shlex.join(["python", "jobs/full_pipeline.py", "--config", "configs/smoke.yaml",
                           "--storage", str(storage), "--name", "clean", *sets])
    _, logs, took = _submit(head, rt, "bash", "-c", f"python tests/cluster/probe_job.py && {pipeline}")
    print(f"probe + smoke pipeline job: {took:.0f} s (includes building the job's pip environment)")
    return logs, storage


def test_job_runtime_env_reaches_driver_and_workers(head, clean_job):
    """Driver and Ray workers import raydefense from the uploaded working dir, run in the pip
    environment of cluster/runtime_env.yaml, and see the job's env_vars."""
    logs, _ = clean_job
    (line,) = [x for x in logs.splitlines() if x.startswith("PROBE ")]
    seen = json.loads(line[len("PROBE "):])
    assert len(seen["workers"]) >= 1
    for who in [seen["driver"], *seen["workers"]]:
        assert "/runtime_resources/working_dir_files/" in who["raydefense_file"], who
        assert "/runtime_resources/pip/" in who["sys_prefix"], who
        assert who["missing"] == [], who
        assert who["env"]["PYTHONWARNINGS"] == "default"
        assert who["env"]["RAYDEFENSE_PROBE_JOB"] == "from-job"
        assert who["env"]["RAY_TRAIN_V2_ENABLED"] == "1"
        assert not who["sys_prefix"].startswith(str(head.venv))


def test_smoke_pipeline_succeeds_on_a_clean_node(head, clean_job):
    _, storage = clean_job
    report = storage / "clean" / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert (report / "report.md").is_file()
    assert {"none", "uddn", "jpeg"} <= set(metrics["accuracy"])
    for d, by_set in metrics["accuracy"].items():
        assert all(0.0 <= a <= 1.0 for a in by_set.values()), d
    # Ray Train ran in the job's env: its checkpoints are in the run's storage.
    assert list((storage / "clean" / "train" / "target-surrogate").glob("checkpoint_*"))
    # Still true after the job: the node's own Python never had the project.
    assert head.python("import raydefense").returncode != 0
