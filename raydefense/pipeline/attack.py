"""Stage 3, attack: adversarial images for the GNR/denoiser, validation and test sets (section 5.1).

Ray Data streams the clean shards through an actor pool (GPU actors when the cluster has
GPUs) that runs FGSM and I-FGSM 2/4/8 with a per-image eps ~ U[eps_min, eps_max], and
writes the pairs straight back as Parquet; the driver never holds a dataset.

Sets (``<run>/data/adv/set=<set>/``, one Parquet partition each), columns ``clean, adv, label, eps, method, index``:

- ``train``: the GNR split attacked with every training method against the target. Its
  noise ``adv - clean`` trains the GNR and its pairs are the real part of the denoiser set
  (the paper's 40k); with ``gnr.enabled: false`` the denoise split is attacked too.
- ``val_white``: validation split, test methods, against the target (for tuning).
- ``test_white`` / ``test_black``: test split, test methods (FGSM, I-FGSM4), against the
  target (white-box) and the surrogate (black-box).
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from raydefense.config import ATTACK_METHODS
from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.runtime import pool_map, device_for, images_to_tensor, tensor_to_images
from raydefense.seeding import numpy_rng, row_seeds, seed_everything


def _method_key(method: str) -> int:
    return ATTACK_METHODS.index(method) if method in ATTACK_METHODS else zlib.crc32(method.encode()) % 1000


def per_image_eps(indices: np.ndarray, method: str, *, seed: int, lo: float, hi: float) -> np.ndarray:
    """eps for each image: U[lo, hi], a pure function of (seed, image index, method)."""
    mid = _method_key(method)
    return np.array([numpy_rng(seed, i, mid).uniform(lo, hi) for i in indices], dtype=np.float32)


def start_seeds(indices: np.ndarray, method: str, set_name: str, *, seed: int) -> np.ndarray:
    """Seeds of the random starts (PGD, APGD) of each image: a pure function of (seed, image
    index, method, set), so an image is attacked the same whatever batch Ray Data puts it in."""
    return row_seeds(indices, seed, _method_key(method), zlib.crc32(set_name.encode()))


class AttackActor:
    """map_batches actor: clean rows -> adversarial rows for every set the row's split feeds.

    ``plan`` maps a split to a list of (set name, model, methods); e.g. a test image yields
    rows for ``test_white`` (against the target) and ``test_black`` (against the surrogate).
    Each (model, method) runs once per batch, over the rows of every split and set that ask
    for it. Rows out are ordered by split, then by the plan's sets and methods.
    """

    def __init__(self, *, storage, plan: dict[str, list[tuple[str, str, list[str]]]], seed: int, eps_min: float,
                 eps_max: float, gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        names = {model for sets in plan.values() for _, model, _ in sets}
        self.models = {name: load_artifact(storage, name, self.device) for name in sorted(names)}
        self.plan = plan
        self.seed, self.lo, self.hi = seed, eps_min, eps_max

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks import create_attack

        # Draws of attacks that take no image seeds (Square, randomised models) come from torch's
        # global generator: seeded here from the batch's row ids, not left to whatever batches this
        # actor process ran before (which Ray Data does not fix).
        seed_everything(self.seed + (int(np.min(batch["index"])) if len(batch["index"]) else 0))
        indices = batch["index"]
        # The work of this batch as (set, model, method, rows) in output order: by split, then the
        # plan's order of sets and methods.
        work = [(set_name, model, method, np.flatnonzero(batch["split"] == split))
                for split in np.unique(batch["split"])
                for set_name, model, methods in self.plan.get(str(split), [])
                for method in methods]
        if not work:
            return {"set": np.array([], dtype=object), "clean": batch["image"][:0], "adv": batch["image"][:0],
                    "label": np.array([], np.int64), "eps": np.array([], np.float32),
                    "method": np.array([], dtype=object), "index": np.array([], np.int64)}
        # One attack call per (model, method) over every row that needs it, whichever split or set
        # it comes from: where a batch holds several splits (Ray Data's batches cross split
        # boundaries) each attack still runs on as many rows as the batch has, not a split's share
        # of it (on CPU a batch of 8 costs ~1.6x per image what a batch of 32 does). A row's eps
        # and random start depend on its index, method and set only, never on its batch.
        x_all = images_to_tensor(batch["image"], self.device)
        y_all = torch.as_tensor(batch["label"], device=self.device)
        jobs: dict[tuple[str, str], list[int]] = {}
        for k, (_, model, method, _) in enumerate(work):
            jobs.setdefault((model, method), []).append(k)
        adv_of: dict[int, np.ndarray] = {}
        eps_of: dict[int, np.ndarray] = {}
        for (model, method), members in jobs.items():
            rows = np.concatenate([work[k][3] for k in members])
            eps = per_image_eps(indices[rows], method, seed=self.seed, lo=self.lo, hi=self.hi)
            seeds = np.concatenate([start_seeds(indices[work[k][3]], method, work[k][0], seed=self.seed)
                                    for k in members])
            attack = create_attack(method, self.models[model], eps=torch.as_tensor(eps, device=self.device))
            attack.with_image_seeds(seeds)
            adv = tensor_to_images(attack(x_all[torch.as_tensor(rows)], y_all[torch.as_tensor(rows)]))
            start = 0
            for k in members:
                n = len(work[k][3])
                adv_of[k], eps_of[k] = adv[start:start + n], eps[start:start + n]
                start += n
        return {
            "set": np.concatenate([np.array([s] * len(rows)) for s, _, _, rows in work]),
            "clean": np.concatenate([batch["image"][rows] for *_, rows in work]),
            "adv": np.concatenate([adv_of[k] for k in range(len(work))]),
            "label": np.concatenate([batch["label"][rows].astype(np.int64) for *_, rows in work]),
            "eps": np.concatenate([eps_of[k] for k in range(len(work))]),
            "method": np.concatenate([np.array([m] * len(rows)) for _, _, m, rows in work]),
            "index": np.concatenate([indices[rows].astype(np.int64) for *_, rows in work]),
        }


def attack_plan(cfg) -> dict[str, list[tuple[str, str, list[str]]]]:
    """split -> [(set, attacked model, methods)], following section 5.1."""
    train = list(cfg.attack.train_methods)
    test = list(cfg.attack.test_methods)
    plan: dict[str, list[tuple[str, str, list[str]]]] = {
        "gnr": [("train", "target", train)],
        "val": [("val_white", "target", test)],
        "test": [("test_white", "target", test), ("test_black", "surrogate", test)],
    }
    if not cfg.gnr.enabled:
        plan["denoise"] = [("train", "target", train)]
    return plan


def attack_dataset(ctx: RunContext, plan: dict[str, list[tuple[str, str, list[str]]]], *, gpu: bool, cfg=None):
    """The attack stage's lazy Ray Dataset: the clean rows of every split of ``plan`` through one
    :class:`AttackActor` pool (``cfg.scale`` sizes it; ``cfg`` defaults to ``ctx.cfg``). Rows out:
    ``set, clean, adv, label, eps, method, index``, one per (clean image, set, method)."""
    cfg = cfg if cfg is not None else ctx.cfg
    # One read of every split the plan attacks. The prepare stage writes the clean rows ordered by
    # split, so in order (keep_order) a batch holds one split except where two meet, and
    # AttackActor merges the rows of one (model, method) across splits anyway.
    ds = ctx.layout.read_clean(sorted(plan))
    return pool_map(ds, AttackActor, {"storage": ctx.storage, "plan": plan, "seed": cfg.attack.seed,
                                      "eps_min": cfg.attack.eps_min, "eps_max": cfg.attack.eps_max},
                    cfg=cfg, gpu=gpu, batch_size=cfg.attack.batch_size)


def run_attack(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """One streaming pass: every clean image that feeds an adversarial set, through one actor pool."""
    cfg = ctx.cfg
    plan = attack_plan(cfg)
    ds = attack_dataset(ctx, plan, gpu=gpu)
    ctx.layout.write_dataset(ctx.layout.ADV, ds, partition_cols=["set"])
    counts = {}
    for split, sets in plan.items():
        for name, model, methods in sets:
            counts[name] = ctx.layout.count_rows(RunLayout.adv_rel(name))
            ctx.echo(f"  {name}: {counts[name]} adversarial images from the {split} split "
                     f"({', '.join(methods)} against the {model})")
    return {"counts": counts}
