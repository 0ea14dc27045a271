"""The whole smoke pipeline (every stage, every baseline) on three real Ray nodes
(``ray.cluster_utils.Cluster``) with S3 storage (moto's server on loopback): two training
workers on different nodes, Ray Data map workers (the CPU default's task pools) on several
nodes, a training worker SIGKILLed
mid-training (the stage restarts from its last checkpoint by itself), then the driver
SIGKILLed and the run resumed with the same --name, then run once more (nothing redone).
This is the suite's end-to-end test: report, figures, checkpoints, shards and weights are
checked on S3. (A single local node runs the same job in tests/cluster/test_clean_node.py.)

The nodes know no S3 endpoint (AWS_ENDPOINT_URL is removed from their environment, as on
another machine): what reaches them travels inside the pickled Storage.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from raydefense.pipeline.runner import STAGE_NAMES
from tests.conftest import REPO
from tests.distributed.test_faults import _processes

pytestmark = [pytest.mark.slow, pytest.mark.long]

DEFENSES = ("none", "dae", "pixel_guided", "uddn", "uddn_kt", "jpeg", "dcn", "distillation")
SETS = ("clean", "white_box", "black_box")
TARGET_EPOCHS = 30  # enough epochs that the kill after epoch 3 lands mid-training
TWO_NODES = ["--set", "scale.num_workers=2", "--set", "scale.cpus_per_worker=1", "--set",
             "scale.worker_resources={train_slot: 1}", "--set", "scale.attack_actors=2", "--set",
             "scale.cpus_per_actor=1", "--set", "scale.checkpoint_interval_s=1000", "--set",
             "scale.checkpoint_every_epochs=10", "--set", f"models.target_train.epochs={TARGET_EPOCHS}"]


def _raylet_of(p: psutil.Process) -> int | None:
    """The pid of the raylet (node) a Ray worker process belongs to."""
    try:
        for parent in p.parents():
            if "raylet" in parent.name():
                return parent.pid
    except psutil.Error:
        return None
    return None


# Process titles of a Ray Data map worker: a task of runtime.map_instances' task pool (the CPU
# default) while it runs, or an actor of an actor pool.
MAP_TITLES = ("MapBatches(_call_instance)", "MapWorker")


def _map_processes() -> list[psutil.Process]:
    return [p for title in MAP_TITLES for p in _processes(title)]


class _MapNodePoller:
    """Collects, every 0.1 s in a thread, the nodes whose map workers are running: a task's
    title lasts only while it runs, too short for a check between the driver's console lines."""

    def __init__(self, nodes: set[int]):
        import threading

        self.nodes, self.stop = nodes, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.nodes |= {n for n in map(_raylet_of, _map_processes()) if n}
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_smoke_on_three_nodes_with_s3_survives_a_killed_worker_and_driver(tmp_path, s3_server, s3_bucket):
    import ray
    from ray.cluster_utils import Cluster

    from raydefense.storage import boto3_client

    saved = os.environ.pop("AWS_ENDPOINT_URL")  # the nodes have credentials (instance roles) but no endpoint
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                                "object_store_memory": 200 * 1024 * 1024})
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"train_slot": 1}, object_store_memory=200 * 1024 * 1024)
        cluster.wait_for_nodes()
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
    s3 = boto3_client(endpoint_url=s3_server)

    def exists(key: str) -> bool:
        return "Contents" in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"runs/mn/{key}")

    args = [sys.executable, "jobs/full_pipeline.py", "--config", "configs/smoke.yaml", "--storage",
            f"s3://{s3_bucket}/runs", "--name", "mn", *TWO_NODES]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "AWS_ENDPOINT_URL": s3_server}
    train_nodes: set[int] = set()
    map_nodes: set[int] = set()
    killed_worker = None
    try:
        log = open(tmp_path / "first.log", "w")
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        while not exists("stages/models.json"):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "models stage did not finish in time"
            train = _processes("RayTrainWorker")
            train_nodes |= {n for n in map(_raylet_of, train) if n}
            map_nodes |= {n for n in map(_raylet_of, _map_processes()) if n}
            # Kill once the target's first checkpoint is committed: its callback's epoch line for
            # the epoch after it has reached the driver's console.
            if killed_worker is None and train and "  target: epoch 3/" in (tmp_path / "first.log").read_text():
                killed_worker = train[0].pid
                train[0].send_signal(signal.SIGKILL)  # a lost worker: the stage must recover by itself
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)  # then the driver dies
        proc.wait()
        assert killed_worker is not None, "no training worker was caught to kill"
        assert not exists("stages/attack.json")

        # Resume with the same name: finished stages are skipped, the rest runs on the cluster.
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out_lines = []
        with _MapNodePoller(map_nodes):
            for line in proc.stdout:
                out_lines.append(line)
                train_nodes |= {n for n in map(_raylet_of, _processes("RayTrainWorker")) if n}
        rc = proc.wait(timeout=900)
        out = "".join(out_lines)
        assert rc == 0, out[-4000:]
        # Once more: everything is finished, nothing is redone.
        again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.count("finished earlier, skipping") == len(STAGE_NAMES)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "prepare: finished earlier, skipping" in out and "models: finished earlier, skipping" in out
    assert len(train_nodes) >= 2, f"training workers ran on {len(train_nodes)} node(s)"
    assert len(map_nodes) >= 2, f"Ray Data map workers ran on {len(map_nodes)} node(s)"
    # The killed worker's training restarted from its checkpoint by itself: the history shows a
    # second attempt and every epoch exactly once.
    restarted = []
    for task in ("target", "surrogate"):
        blob = torch.load(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=f"runs/mn/models/{task}.pt")["Body"].read()),
                          weights_only=True)
        hist = blob["metrics"]["history"]
        assert [h["epoch"] for h in hist] == list(range(len(hist)))
        assert {h["workers"] for h in hist} == {2}
        if blob["metrics"]["restarts"] >= 1:
            restarted.append(task)
    assert restarted, "no training shows the automatic restart"
    first = (tmp_path / "first.log").read_text()
    assert f"  target: epoch 1/{TARGET_EPOCHS}" in first and f"  target: epoch {TARGET_EPOCHS}/{TARGET_EPOCHS}" in first
    _check_run_on_s3(s3, s3_bucket, "runs/mn", out)


def _check_run_on_s3(s3, bucket: str, prefix: str, stdout: str) -> None:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
    m = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/report/metrics.json")["Body"].read())
    assert set(m["accuracy"]) == set(DEFENSES)
    for d in DEFENSES:
        for s in SETS:
            a = m["accuracy"][d][s]
            det = m["accuracy_detail"][d][s]
            assert 0.0 <= a <= 1.0 and det["n"] > 0 and det["ci95"][0] <= a <= det["ci95"][1]
        eps = [e for e, _ in m["by_epsilon"][d]]
        assert eps == sorted(eps) and all(0 <= a <= 1 for _, a in m["by_epsilon"][d])
    assert m["l1"]["none"]["clean"] == pytest.approx(0.0, abs=1e-7) and m["l1"]["none"]["white_box"] > 0
    for d in m["adaptive"]:  # attacks on the whole defended model
        assert 0 <= m["accuracy"][d]["adaptive_pgd"] <= 1
    assert m["config"]["scale"]["num_workers"] == 2
    assert all(m["timings_s"][st] >= 0 for st in ("prepare", "models", "attack", "gnr", "denoise", "distill",
                                                  "baselines", "evaluate"))
    report = s3.get_object(Bucket=bucket, Key=f"{prefix}/report/report.md")["Body"].read().decode()
    for heading in ("Table 1", "Tables 2 and 3", "Attacks on the whole defended model", "Timings"):
        assert heading in report
    from PIL import Image

    for png in ("figure6_denoising.png", "figure7_accuracy_vs_eps.png", "adaptive_pgd.png"):
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/report/{png}")["Body"].read()
        with Image.open(io.BytesIO(body)) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    # The fit keeps its latest two checkpoints (the surrogate's, the part trained last), each
    # named after its part.
    assert any(re.fullmatch(r"train/target-surrogate/checkpoint_[^/]+/state\.surrogate\.pt", k) for k in keys)
    assert any(k.startswith("data/clean/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("data/adv/set=test_black/") and k.endswith(".parquet") for k in keys)
    for name in ("target", "surrogate", "uddn", "dae", "pixel_guided", "teacher", "student", "dcn", "distillation",
                 "gnr_generator"):
        assert f"models/{name}.pt" in keys, name
        assert any(k.startswith(f"tensorboard/{name if name != 'gnr_generator' else 'gnr'}/") for k in keys), name
    assert "UDDN + knowledge transfer vs no defense" in stdout
    # Credentials never reach the logs or the report.
    for text in (stdout, report, json.dumps(m)):
        assert "testing" not in text
