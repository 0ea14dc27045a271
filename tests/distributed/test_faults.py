"""Faults on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and worker nodes,
each a real raylet on this machine): a Ray Data map worker (actor or task) killed mid-stage, and elastic
training that loses a node and grows back when one is added."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from raydefense.config import load_config
from raydefense.storage import Storage
from tests.conftest import REPO
from tests.distributed.test_data_parallel import _classifier_config, _classifier_ds, _Collect

pytestmark = pytest.mark.slow


def _processes(marker: str) -> list[psutil.Process]:
    """This test's Ray worker processes whose title contains ``marker`` (Ray sets ``ray::Class``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture()
def cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    # Ray Train V2 waits this long for a worker group that cannot be placed (the lost node's
    # worker) before the elastic policy settles for fewer workers; Ray's default is 60 s. The
    # nodes inherit this process's environment, so the controller sees it (README: Faults).
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 128 * 1024 * 1024, "include_dashboard": False})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _worker_node(cluster, cpus: int = 1):
    return cluster.add_node(num_cpus=cpus, resources={"train_slot": 1}, object_store_memory=128 * 1024 * 1024)


@pytest.mark.parametrize("compute", ["actors", "tasks"])
def test_killed_ray_data_map_worker_keeps_exact_rows(cluster, compute):
    """SIGKILL one map worker process mid-stage: in an actor pool Ray Data restarts the actor and
    retries its batches (Ray's own max_restarts / max_task_retries, which pool_map leaves on); in
    a task pool Ray retries the lost worker's task. The output has every input row exactly once."""
    import ray

    from raydefense.pipeline.runtime import pool_map

    _worker_node(cluster, cpus=2)  # 3 CPUs: two pool workers, and one for Ray Data's read tasks
    cluster.wait_for_nodes()
    cfg = load_config(f"{REPO}/configs/smoke.yaml",
                      ["scale.attack_actors=2", "scale.cpus_per_actor=1", f"scale.map_compute={compute}"])

    class SlowIdentity:
        def __init__(self, *, gpu: bool, threads: int):
            self.pid = os.getpid()

        def __call__(self, batch):
            time.sleep(0.3)
            return {"index": batch["index"], "pid": np.full(len(batch["index"]), self.pid)}

    n = 240
    ds = pool_map(ray.data.range(n, override_num_blocks=24).rename_columns({"id": "index"}), SlowIdentity, {},
                  cfg=cfg, gpu=False, batch_size=5)
    rows, killed = [], None
    for row in ds.iter_rows():
        rows.append(row)
        if killed is None and len(rows) >= 40:  # well into the stage: kill a process that has produced rows
            producers = {int(r["pid"]) for r in rows}
            victims = [p for p in _processes("ray::") if p.pid in producers]
            assert victims, "no map worker found to kill"
            if compute == "actors":
                assert all("MapWorker" in " ".join(p.cmdline()) for p in victims)
            victims[0].send_signal(signal.SIGKILL)
            killed = (victims[0].pid, len(rows))
    assert killed is not None
    idx = sorted(int(r["index"]) for r in rows)
    assert idx == list(range(n))  # nothing lost, nothing duplicated
    after = {int(r["pid"]) for r in rows[killed[1]:]}
    assert len(after - {killed[0]}) >= 1  # the rest came from the surviving / restarted workers


def _pace_callback(flag: str):
    """A Ray Train callback (it runs in the controller) that holds each report for one second
    while the file ``flag`` exists."""
    from ray.train import UserCallback

    class Pace(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if os.path.exists(flag):
                time.sleep(1.0)

    return Pace()


def test_elastic_training_loses_a_node_and_grows_back(cluster, tmp_path):
    """Elastic (1, 2) workers, one per worker node (a custom resource per node): removing a
    node mid-training restarts the group with one worker from the latest checkpoint; adding a
    node lets the next resize grow back to two. The artifact's history has every epoch once."""
    import ray

    from raydefense.pipeline.classifiers import classifier_loop
    from raydefense.pipeline.training import make_trainer

    nodes = [_worker_node(cluster), _worker_node(cluster)]
    cluster.wait_for_nodes()
    # The epochs of a tiny model take milliseconds; until the group has grown back, a callback
    # in the controller holds each report for a second (workers wait for the controller to take
    # their report), so the training outlasts a node going, the group restarting small, a node
    # coming and the group growing back, even on a loaded machine. Then the rest runs at speed.
    epochs = 100
    pace = tmp_path / "pace"
    pace.touch()
    cfg = load_config(f"{REPO}/configs/smoke.yaml", [
        "scale.num_workers=1", "scale.max_workers=2", "scale.cpus_per_worker=1", "scale.worker_resources={train_slot: 1}",
        "scale.max_failures=5", "scale.resize_interval_s=2", "scale.checkpoint_interval_s=1000",
        "scale.checkpoint_every_epochs=5"])
    storage = Storage.open(str(tmp_path))
    lc = _classifier_config(cfg, storage, "target", batch=4, epochs=epochs)
    reports = tmp_path / "reports.jsonl"
    trainer = make_trainer(cfg, storage, "target", classifier_loop, lc,
                           {"train": _classifier_ds(24, 0), "val": _classifier_ds(8, 1)}, gpu=False,
                           callbacks=[_Collect.make(str(reports)), _pace_callback(str(pace))])
    box: dict = {}
    fit = threading.Thread(target=lambda: box.setdefault("result", trainer.fit()), daemon=True)
    t0 = time.time()
    fit.start()

    def sizes() -> list[int]:
        if not reports.exists():
            return []
        return [len(json.loads(line)) for line in reports.read_text().splitlines()]

    def wait_for(pred, what: str, timeout: float = 240.0) -> float:
        deadline = time.time() + timeout
        while not pred(sizes()):
            assert fit.is_alive(), f"training ended before {what}: {box}"
            assert time.time() < deadline, f"timed out waiting for {what}; report sizes {sizes()[-20:]}"
            time.sleep(0.2)
        return time.time() - t0

    t_two = wait_for(lambda s: len(s) >= 3 and s[-1] == 2, "two workers")
    cluster.remove_node(nodes[0])  # a spot node goes away
    t_removed = time.time() - t0
    n_before = len(sizes())
    t_one = wait_for(lambda s: len(s) > n_before and s[-1] == 1, "training on the remaining node")
    nodes[0] = _worker_node(cluster)  # a new node joins
    t_added = time.time() - t0
    n_before = len(sizes())
    t_back = wait_for(lambda s: len(s) > n_before and s[-1] == 2, "growing back to two workers")
    pace.unlink()
    fit.join(timeout=600)
    assert "result" in box and not fit.is_alive()
    hist = storage.load_torch("models/target.pt")["metrics"]["history"]
    assert [h["epoch"] for h in hist] == list(range(epochs))  # every epoch once, none counted twice
    workers = [h["workers"] for h in hist]
    assert 1 in workers and workers[0] == 2 and workers[-1] == 2
    assert max(h["attempt"] for h in hist) >= 3  # started, restarted small, restarted big
    print(f"elastic: 2 workers at {t_two:.1f}s, node removed at {t_removed:.1f}s, 1 worker at {t_one:.1f}s "
          f"(lost {t_one - t_removed:.1f}s), node added at {t_added:.1f}s, 2 workers at {t_back:.1f}s "
          f"(resize took {t_back - t_added:.1f}s), done at {time.time() - t0:.1f}s")
