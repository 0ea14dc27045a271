"""Run by tests/pipeline/test_reproducible.py in its own process: a local Ray that advertises one
GPU (or ``argv[2]`` GPUs) on a CPU machine (Ray schedules by resources; nothing here touches
CUDA), and two executions of ``pool_map(..., gpu=True)`` with ``scale.map_compute: tasks``.
Prints one JSON object: per execution, the (pid, instance token, CUDA_VISIBLE_DEVICES) of every
row; or ``REFUSED <message>`` when pool_map refuses (a node with several GPUs). With ``argv[3]``
= ``raw``, first: Ray tasks with ``max_calls=0`` on those GPUs, outside raydefense, and per
process the GPUs Ray gave it (``RAW {pid: [CUDA_VISIBLE_DEVICES, ...]}``)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np


class Instance:
    def __init__(self, *, gpu: bool, threads: int = 1):
        self.pid, self.token = os.getpid(), int(np.random.default_rng().integers(1 << 62))
        self.gpu = gpu

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"id": batch["id"], "pid": np.full(n, self.pid), "token": np.full(n, self.token),
                "cuda": np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "")] * n), "gpu": np.full(n, self.gpu)}


def raw_reuse() -> dict[int, list[str]]:
    """Plain Ray GPU tasks that keep their process (``max_calls=0``): which GPUs each process got."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0, max_calls=0)
    def which() -> tuple[int, str]:
        import time

        time.sleep(0.02)
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "")

    seen: dict[int, list[str]] = {}
    for _ in range(20):
        for pid, cuda in ray.get([which.remote() for _ in range(3)]):
            seen.setdefault(pid, []).append(cuda)
    return seen


def main(config: str, gpus: int = 1, mode: str = "pool") -> None:
    import ray

    from raydefense.config import load_config
    from raydefense.errors import ConfigError
    from raydefense.pipeline.runtime import pool_map

    cfg = load_config(config, ["scale.attack_actors=1", "scale.map_compute=tasks"])
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    if mode == "raw":
        print("RAW " + json.dumps(raw_reuse()), flush=True)
    out = []
    try:
        for _ in range(2):
            df = pool_map(ray.data.range(32, override_num_blocks=4), Instance, {}, cfg=cfg, gpu=True,
                          batch_size=4).to_pandas()
            out.append({k: df[k].tolist() for k in ("id", "pid", "token", "cuda", "gpu")})
    except ConfigError as exc:
        print(f"REFUSED {exc}")
        return
    finally:
        ray.shutdown()
    print("RESULT " + json.dumps(out, default=int))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]), *sys.argv[3:4])
