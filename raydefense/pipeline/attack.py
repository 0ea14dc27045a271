"""Stage 3, attack: adversarial images for the GNR/denoiser, validation and test sets (section 5.1).

Ray Data streams the clean shards through an actor pool (GPU actors when the cluster has
GPUs) that runs FGSM and I-FGSM 2/4/8 with a per-image eps ~ U[eps_min, eps_max], and
writes the pairs straight back as Parquet; the driver never holds a dataset.

Sets (``<run>/data/adv/<set>/``), columns ``clean, adv, label, eps, method, index``:

- ``train``: the GNR split attacked with every training method against the target. Its
  noise ``adv - clean`` trains the GNR and its pairs are the real part of the denoiser set
  (the paper's 40k); with ``gnr.enabled: false`` the denoise split is attacked too.
- ``val_white``: validation split, test methods, against the target (for tuning).
- ``test_white`` / ``test_black``: test split, test methods (FGSM, I-FGSM4), against the
  target (white-box) and the surrogate (black-box).
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import torch

from raydefense.config import ATTACK_METHODS
from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.prepare import read_split
from raydefense.pipeline.runtime import device_for, images_to_tensor, tensor_to_images, user_errors


def per_image_eps(indices: np.ndarray, method: str, *, seed: int, lo: float, hi: float) -> np.ndarray:
    """eps for each image: U[lo, hi], a pure function of (seed, image index, method)."""
    mid = ATTACK_METHODS.index(method) if method in ATTACK_METHODS else zlib.crc32(method.encode()) % 1000
    return np.array([np.random.default_rng([seed, int(i), mid]).uniform(lo, hi) for i in indices], dtype=np.float32)


class AttackActor:
    """map_batches actor: clean rows -> one adversarial row per (image, method)."""

    def __init__(self, *, storage, model: str, methods: Sequence[str], seed: int, eps_min: float, eps_max: float,
                 gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.model = load_artifact(storage, model, self.device)
        self.methods = list(methods)
        self.seed, self.lo, self.hi = seed, eps_min, eps_max

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks import create_attack

        x = images_to_tensor(batch["image"], self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        out: dict[str, list[Any]] = {k: [] for k in ("clean", "adv", "label", "eps", "method", "index")}
        for method in self.methods:
            eps = per_image_eps(batch["index"], method, seed=self.seed, lo=self.lo, hi=self.hi)
            adv = create_attack(method, self.model, eps=torch.as_tensor(eps, device=self.device))(x, y)
            out["clean"].append(batch["image"])
            out["adv"].append(tensor_to_images(adv))
            out["label"].append(batch["label"].astype(np.int64))
            out["eps"].append(eps)
            out["method"].append(np.array([method] * len(eps)))
            out["index"].append(batch["index"].astype(np.int64))
        return {k: np.concatenate(v) for k, v in out.items()}


def attack_set(ctx, *, name: str, splits: list[str], model: str, methods: Sequence[str], gpu: bool) -> int:
    """Attack the clean images of ``splits`` with ``model``'s gradients; write ``data/adv/<name>``."""
    import ray

    cfg = ctx.cfg
    ds = read_split(ctx, splits)
    ds = ds.map_batches(
        AttackActor,
        fn_constructor_kwargs={"storage": ctx.storage, "model": model, "methods": list(methods), "seed": cfg.attack.seed,
                               "eps_min": cfg.attack.eps_min, "eps_max": cfg.attack.eps_max, "gpu": gpu,
                               "threads": int(cfg.scale.cpus_per_actor)},
        batch_size=cfg.attack.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.scale.attack_actors),
        num_cpus=cfg.scale.cpus_per_actor,
        num_gpus=1 if gpu else None,
    )
    ctx.storage.delete_dir(f"data/adv/{name}")
    with user_errors():
        ds.write_parquet(ctx.data_path("adv", name), filesystem=ctx.storage.fs, min_rows_per_file=cfg.data.shard_size)
    return count_rows(ctx, f"data/adv/{name}")


def count_rows(ctx, rel: str) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(ctx.storage.path(rel), filesystem=ctx.storage.fs, format="parquet").count_rows()


def read_adv(ctx, name: str, columns: list[str] | None = None):
    import ray

    return ray.data.read_parquet(ctx.data_path("adv", name), filesystem=ctx.storage.fs, columns=columns)


def run_attack(ctx, *, gpu: bool) -> dict[str, Any]:
    cfg = ctx.cfg
    train_splits = ["gnr"] if cfg.gnr.enabled else ["gnr", "denoise"]
    plan = [
        ("train", train_splits, "target", cfg.attack.train_methods),
        ("val_white", ["val"], "target", cfg.attack.test_methods),
        ("test_white", ["test"], "target", cfg.attack.test_methods),
        ("test_black", ["test"], "surrogate", cfg.attack.test_methods),
    ]
    counts = {}
    for name, splits, model, methods in plan:
        counts[name] = attack_set(ctx, name=name, splits=splits, model=model, methods=methods, gpu=gpu)
        ctx.echo(f"  {name}: {counts[name]} adversarial images ({', '.join(methods)} against the {model})")
    return {"counts": counts}
