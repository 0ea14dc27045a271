"""The smoke pipeline on three real Ray nodes (``ray.cluster_utils.Cluster``) with S3 storage
(moto's server on loopback): two training workers on different nodes, Ray Data actors on
several nodes, a training worker SIGKILLed mid-training (the stage restarts from its last
checkpoint by itself), then the driver SIGKILLed and the run resumed with the same --name.

The nodes know no S3 endpoint (AWS_ENDPOINT_URL is removed from their environment, as on
another machine): what reaches them travels inside the pickled Storage.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

LEAN = ["--set", "baselines.enabled=[jpeg]", "--set", "denoise.baselines=[]", "--set", "eval.adaptive=false"]
TWO_NODES = ["--set", "scale.num_workers=2", "--set", "scale.cpus_per_worker=1", "--set",
             "scale.worker_resources={train_slot: 1}", "--set", "scale.attack_actors=2", "--set",
             "scale.cpus_per_actor=1", "--set", "scale.checkpoint_interval_s=1000", "--set",
             "scale.checkpoint_every_epochs=25", "--set", "models.target_train.epochs=200"]


def _raylet_of(p: psutil.Process) -> int | None:
    """The pid of the raylet (node) a Ray worker process belongs to."""
    try:
        for parent in p.parents():
            if "raylet" in parent.name():
                return parent.pid
    except psutil.Error:
        return None
    return None


def _workers(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


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
            f"s3://{s3_bucket}/runs", "--name", "mn", *LEAN, *TWO_NODES]
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
            train = _workers("RayTrainWorker")
            train_nodes |= {n for n in map(_raylet_of, train) if n}
            map_nodes |= {n for n in map(_raylet_of, _workers("MapWorker")) if n}
            if killed_worker is None and train and exists("train/target/checkpoint_"):
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
        for line in proc.stdout:
            out_lines.append(line)
            map_nodes |= {n for n in map(_raylet_of, _workers("MapWorker")) if n}
            train_nodes |= {n for n in map(_raylet_of, _workers("RayTrainWorker")) if n}
        rc = proc.wait(timeout=900)
        out = "".join(out_lines)
        assert rc == 0, out[-4000:]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "prepare: finished earlier, skipping" in out and "models: finished earlier, skipping" in out
    assert len(train_nodes) >= 2, f"training workers ran on {len(train_nodes)} node(s)"
    assert len(map_nodes) >= 2, f"Ray Data actors ran on {len(map_nodes)} node(s)"
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
    m = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/mn/report/metrics.json")["Body"].read())
    assert set(m["accuracy"]) == {"none", "uddn", "uddn_kt", "jpeg"}
    assert m["config"]["scale"]["num_workers"] == 2
