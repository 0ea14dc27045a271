"""Entrypoint of a job that tests/cluster/test_clean_node.py submits: connect the way the pipeline
does (``init_ray``), then print one JSON line with what the driver and the Ray workers see.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python tests/cluster/probe_job.py

Printed keys: ``driver`` and ``workers`` (one entry per distinct worker process), each with
``raydefense_file`` (where ``import raydefense`` resolved), ``sys_prefix`` (the Python
environment), ``env`` (the environment variables in ``PROBE_VARS``) and ``missing`` (the
project's third-party imports that failed).
"""
from __future__ import annotations

import importlib
import json
import os
import sys

PROBE_VARS = ("PYTHONWARNINGS", "RAY_TRAIN_V2_ENABLED", "RAYDEFENSE_PROBE_JOB", "RAYDEFENSE_PROBE_HOST")
THIRD_PARTY = ("facenet_pytorch", "kornia", "optuna", "boto3", "matplotlib", "yaml", "pyarrow", "torchvision")


def probe() -> dict:
    import raydefense

    missing = []
    for name in THIRD_PARTY:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return {"pid": os.getpid(), "raydefense_file": raydefense.__file__, "sys_prefix": sys.prefix,
            "env": {k: os.environ.get(k) for k in PROBE_VARS}, "missing": missing}


def main() -> None:
    import ray

    from raydefense.config import load_config
    from raydefense.pipeline.runtime import init_ray

    init_ray(load_config("configs/smoke.yaml"))
    remote_probe = ray.remote(num_cpus=0.5)(probe)
    workers = {r["pid"]: r for r in ray.get([remote_probe.remote() for _ in range(2)])}
    print("PROBE " + json.dumps({"driver": probe(), "workers": list(workers.values())}), flush=True)


if __name__ == "__main__":
    main()
