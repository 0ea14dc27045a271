"""Attacks on the whole defended model (denoiser + classifier as one differentiable model).

The paper evaluates pre-generated attacks computed against the bare classifier. An
attacker who knows the defense differentiates through it: Athalye, Carlini & Wagner (2018)
took HGD, the closest published relative of the UDDN, to 0% at L-inf 4/255 that way. Here
PGD (random start, ``eval.adaptive_steps`` steps, ``eval.adaptive_restarts`` restarts) runs
against ``DefendedModel(classifier, preprocess)`` at each ``eval.adaptive_eps``; JPEG, which is
not differentiable, is attacked with BPDA (real codec forward, identity backward).

Robust accuracy counts an image only if the defended model classifies it correctly both
clean and under attack (the clean image lies in its own eps-ball, so an attacker can always
submit it), as AutoAttack does. ``accuracy[d]['adaptive_pgd']`` is the robust accuracy at
the largest eps; the full curve is in ``adaptive[d]`` as ``[[eps, accuracy], ...]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raydefense.pipeline.evaluate import _map, available_defenses, wilson
from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.prepare import read_split
from raydefense.pipeline.runtime import device_for, images_to_tensor, user_errors


class AdaptiveActor:
    """map_batches actor: PGD through each defense at each eps; correctness flags out."""

    def __init__(self, *, storage, defenses, levels, steps: int, restarts: int, jpeg_quality: int, gpu: bool,
                 threads: int = 1, seed: int = 0):
        from raydefense.defenses import JPEG, DefendedModel

        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        parts: dict[str, Any] = {}
        self.models = {}
        for name, (pre, clf) in defenses.items():
            if clf not in parts:
                parts[clf] = load_artifact(storage, clf, self.device)
            prep = None
            if pre == "jpeg":
                prep = JPEG(quality=jpeg_quality, mode="bpda")
            elif pre:
                if pre not in parts:
                    parts[pre] = load_artifact(storage, pre, self.device)
                prep = parts[pre]
            self.models[name] = DefendedModel(parts[clf], prep).eval()
        self.levels, self.steps, self.restarts, self.seed = list(levels), steps, restarts, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks import PGD

        x = images_to_tensor(batch["image"], self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        out: dict[str, np.ndarray] = {"label": batch["label"], "index": batch["index"]}
        torch.manual_seed(self.seed + int(batch["index"][0]))
        for name, model in self.models.items():
            with torch.no_grad():
                out[f"clean_{name}"] = (model(x).argmax(1) == y).cpu().numpy()
            for k, eps in enumerate(self.levels):
                attack = PGD(model, eps=eps, alpha=max(eps / 4, 1 / 255), steps=self.steps, random_start=True,
                             restarts=self.restarts)
                adv = attack(x, y)
                with torch.no_grad():
                    out[f"eps{k}_{name}"] = out[f"clean_{name}"] & (model(adv).argmax(1) == y).cpu().numpy()
        return out


def run_adaptive(ctx, *, gpu: bool, metrics: dict[str, Any]) -> dict[str, Any]:
    cfg = ctx.cfg
    have, _ = available_defenses(ctx)
    defenses = {d: have[d] for d in cfg.eval.adaptive_defenses if d in have}
    if not defenses:
        return {}
    levels = list(cfg.eval.adaptive_eps)
    ds = read_split(ctx, "test").limit(cfg.eval.adaptive_max_images)
    kwargs = {"storage": ctx.storage, "defenses": defenses, "levels": levels, "steps": cfg.eval.adaptive_steps,
              "restarts": cfg.eval.adaptive_restarts, "jpeg_quality": cfg.baselines.jpeg_quality, "seed": cfg.seed}
    ctx.echo(f"  adaptive PGD-{cfg.eval.adaptive_steps} through {', '.join(defenses)} at eps "
             + ", ".join(f"{255 * e:.0f}/255" for e in levels) + f" on {cfg.eval.adaptive_max_images} test images")
    with user_errors():
        df = _map(ds, AdaptiveActor, kwargs, ctx, gpu, cfg.eval.batch_size).to_pandas()
    curves: dict[str, list[list[float]]] = {}
    for name in defenses:
        curves[name] = [[float(e), float(df[f"eps{k}_{name}"].mean())] for k, e in enumerate(levels)]
        ok = df[f"eps{len(levels) - 1}_{name}"].to_numpy()
        n, k = len(ok), int(ok.sum())
        metrics["accuracy"][name]["adaptive_pgd"] = k / max(n, 1)
        clean_ok = df[f"clean_{name}"].to_numpy()
        metrics["accuracy_detail"][name]["adaptive_pgd"] = {
            "accuracy": k / max(n, 1), "n": n, "ci95": list(wilson(k, n)), "eps": levels[-1],
            "clean_accuracy_same_images": float(clean_ok.mean()) if n else 0.0,
            "steps": cfg.eval.adaptive_steps, "restarts": cfg.eval.adaptive_restarts,
            "attack_success_rate": float((clean_ok & ~ok).sum() / max(clean_ok.sum(), 1)),
            "threat_model": "PGD through the whole defended model" + (" (BPDA for JPEG)" if defenses[name][0] == "jpeg" else ""),
        }
    return {"adaptive": curves}
