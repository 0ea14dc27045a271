"""Attacks on the whole defended model (preprocessing + classifier as one model), on Ray Data.

The paper evaluates pre-generated attacks computed against the bare classifier. An attacker
who knows the defense differentiates through it: Athalye, Carlini & Wagner (ICML 2018) took
HGD, the closest published relative of the UDDN, to 0% at L-inf 4/255 that way. Every
defense in ``eval.adaptive_defenses`` is wrapped as ``DefendedModel(classifier, preprocess)``
and attacked as one model:

- **differentiable parts** (UDDN, DAE, classifiers): plain gradients;
- **real JPEG**, not differentiable: BPDA (real codec forward, identity backward; Athalye et
  al. 2018), so the forward pass is the real codec the defense deploys;
- **randomised defenses** (any submodule with ``randomized = True``): EOT, gradients averaged
  over ``eval.eot_samples`` forward passes; deterministic ones use one pass.

What is measured, on a fixed random subset of ``eval.adaptive_max_images`` test images
(every row of the white-box test set for those images, i.e. one row per test method):

``adaptive_pgd`` (metrics ``accuracy[d]['adaptive_pgd']``)
    PGD (``eval.adaptive_steps`` steps, ``eval.adaptive_restarts`` random restarts, step
    ``min(eps, 2.5 eps / steps)``, Madry et al. 2018) through the whole model, **at each
    row's own budget**: the eps its pre-generated white-box image was made with, widened to
    that stored (uint8) image's actual L-inf distance from the clean one (rounding adds up
    to 0.5/255). An image counts as robust only if the defended model is right on the clean
    image, on the pre-generated white-box image, and on the PGD image: the attacker submits
    the worst of the three, all inside the same ball. So, by construction, on the same rows
    adaptive accuracy <= clean accuracy and <= the paper-style white-box accuracy.
``autoattack`` (``accuracy[d]['autoattack']``)
    An independent check with a different optimiser and loss: APGD-CE then APGD-DLR
    (Croce & Hein 2020; :class:`raydefense.attacks.apgd.APGD`, ``eval.autoattack_steps``)
    at the same per-row budgets; robust = right on clean, APGD-CE and APGD-DLR. These are the
    two components of AutoAttack's "rand" version; FAB-T and Square are not run.
``adaptive[d]``: ``[[eps, accuracy], ...]``
    PGD through the whole model at the fixed levels ``eval.adaptive_eps`` (one row per
    image), the usual threat model of the literature (e.g. 4/255 for HGD above).

Robust accuracy counts an image only if it is also classified correctly when clean (the
clean image lies in its own eps-ball), as AutoAttack does.
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.defended import available_defenses, build_defended_models
from raydefense.pipeline.runtime import (pool_map, device_for, images_to_tensor, pool_actors, pool_batch_size,
                                         user_errors)
from raydefense.report.stats import proportion
from raydefense.seeding import numpy_rng, row_seeds, seed_everything

APGD_LOSSES = ("ce", "dlr")  # AutoAttack's 'rand' version: APGD-CE, then APGD-DLR


def is_randomized(model: nn.Module) -> bool:
    """True if any submodule declares ``randomized = True`` (a defense with randomness: EOT needed)."""
    return any(bool(getattr(m, "randomized", False)) for m in model.modules())


def eot_samples_for(model: nn.Module, configured: int) -> int:
    """Forward passes per gradient: ``configured`` for a randomised model, 1 for a deterministic one."""
    return max(1, int(configured)) if is_randomized(model) else 1


def pgd_step_size(eps: torch.Tensor, steps: int) -> torch.Tensor:
    """Step ``min(eps, 2.5 eps / steps)`` (Madry et al. 2018): enough to cross the ball in ``steps``."""
    return torch.minimum(eps, 2.5 * eps / steps)


def row_budget(clean: torch.Tensor, adv: torch.Tensor, eps: np.ndarray) -> torch.Tensor:
    """Per-row L-inf budget ``(B,)``: the pre-generated eps, widened to the stored image's distance."""
    dist = (adv - clean).abs().flatten(1).amax(dim=1)
    return torch.maximum(torch.as_tensor(eps, dtype=clean.dtype, device=clean.device), dist).clamp(0, 1)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return (model(x).argmax(1) == y).cpu().numpy()


class WholeModelActor:
    """map_batches actor over white-box test rows: every attack on every whole defended model.

    In: ``clean, adv, label, eps, method, index`` (white-box test rows). Out, per row and
    defense ``d``: ``d:eot`` (forward passes per gradient), ``d:clean``, ``d:pregen``
    (correct on the pre-generated white-box image), ``d:pgd``,
    ``d:apgd_ce``, ``d:apgd_dlr`` (correct under that attack at the row's budget) and, on
    rows of the first test method only (``curve_row``), ``d:level<k>`` (correct on clean and
    under PGD at the fixed level k). Attacks run only on rows still classified correctly,
    the others are already counted as broken, and PGD / APGD stop early per row (``early_stop``:
    a row's first fooling iterate is kept, no more gradients are spent on it).
    """

    def __init__(self, *, storage, defenses, levels, first_method: str, steps: int, restarts: int,
                 apgd_steps: int, apgd_restarts: int, autoattack: bool, eot_samples: int, jpeg_quality: int,
                 gpu: bool, threads: int = 1, seed: int = 0):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.models = build_defended_models(storage, defenses, jpeg_quality=jpeg_quality, device=self.device)
        self.eot = {name: eot_samples_for(m, eot_samples) for name, m in self.models.items()}
        self.levels, self.first_method = list(levels), first_method
        self.steps, self.restarts = steps, restarts
        self.apgd_steps, self.apgd_restarts, self.autoattack = apgd_steps, apgd_restarts, autoattack
        self.seed = seed

    def _pgd(self, model, x, y, eps, eot, seeds) -> torch.Tensor:
        from raydefense.attacks import PGD

        return PGD(model, eps=eps, alpha=pgd_step_size(eps, self.steps), steps=self.steps, random_start=True,
                   restarts=self.restarts, eot_samples=eot, early_stop=True).with_image_seeds(seeds)(x, y)

    def _start_seeds(self, batch: dict[str, np.ndarray], defense: str, attack: str) -> np.ndarray:
        """Per row, the seed of its random starts under ``attack`` on ``defense``: a function of (seed,
        image index, test method, defense, attack) only. Rows arrive in batches that Ray Data may
        form differently from run to run; a start drawn by batch position would differ with them."""
        methods = np.asarray(batch["method"]).astype(str)
        seeds = np.zeros(len(methods), dtype=np.int64)
        for method in np.unique(methods):
            rows = methods == method
            seeds[rows] = row_seeds(np.asarray(batch["index"])[rows], self.seed,
                                    zlib.crc32(f"{defense}/{attack}/{method}".encode()))
        return seeds

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks.apgd import APGD

        x = images_to_tensor(batch["clean"], self.device)
        xa = images_to_tensor(batch["adv"], self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        budget = row_budget(x, xa, batch["eps"])
        curve = np.asarray(batch["method"]) == self.first_method
        out: dict[str, np.ndarray] = {k: batch[k] for k in ("label", "eps", "method", "index")}
        out["budget"] = budget.cpu().numpy()
        out["curve_row"] = curve
        # Random starts are keyed by row (_start_seeds); this seeds only what draws from torch's
        # global generator, i.e. randomised defenses (EOT).
        seed_everything(self.seed + int(np.min(batch["index"])))
        num_classes = None
        for name, model in self.models.items():
            eot = self.eot[name]
            clean_ok = _correct(model, x, y)
            out[f"{name}:clean"] = clean_ok
            out[f"{name}:eot"] = np.full(len(clean_ok), eot, dtype=np.int64)
            out[f"{name}:pregen"] = _correct(model, xa, y)
            rows = torch.as_tensor(np.flatnonzero(clean_ok), device=self.device, dtype=torch.long)
            # PGD at each row's own budget (rows wrong when clean are broken already).
            ok = np.zeros_like(clean_ok)
            if rows.numel():
                seeds = self._start_seeds(batch, name, "pgd")[rows.cpu().numpy()]
                adv = self._pgd(model, x[rows], y[rows], budget[rows], eot, seeds)
                ok[rows.cpu().numpy()] = _correct(model, adv, y[rows])
            out[f"{name}:pgd"] = ok
            # APGD-CE then APGD-DLR on the rows each earlier attack left standing.
            if self.autoattack:
                if num_classes is None:
                    with torch.no_grad():
                        num_classes = int(model(x[:1]).shape[1])
                left = rows
                for loss in APGD_LOSSES:
                    ok = np.zeros_like(clean_ok)
                    if loss == "dlr" and num_classes < 3:  # DLR needs 3 classes: CE's result stands
                        ok[left.cpu().numpy()] = True
                    elif left.numel():
                        attack = APGD(model, eps=budget[left], steps=self.apgd_steps, restarts=self.apgd_restarts,
                                      loss=loss, eot_samples=eot, early_stop=True).with_image_seeds(
                                          self._start_seeds(batch, name, f"apgd_{loss}")[left.cpu().numpy()])
                        ok[left.cpu().numpy()] = _correct(model, attack(x[left], y[left]), y[left])
                    out[f"{name}:apgd_{loss}"] = ok
                    left = torch.as_tensor(np.flatnonzero(ok), device=self.device, dtype=torch.long)
            # Fixed levels, one row per image.
            curve_rows = torch.as_tensor(np.flatnonzero(curve & clean_ok), device=self.device, dtype=torch.long)
            for k, level in enumerate(self.levels):
                ok = np.zeros_like(clean_ok)
                if curve_rows.numel():
                    if level > 0:
                        eps = torch.full((curve_rows.numel(),), float(level), device=self.device)
                        seeds = self._start_seeds(batch, name, f"level{k}")[curve_rows.cpu().numpy()]
                        adv = self._pgd(model, x[curve_rows], y[curve_rows], eps, eot, seeds)
                        ok[curve_rows.cpu().numpy()] = _correct(model, adv, y[curve_rows])
                    else:
                        ok[curve_rows.cpu().numpy()] = True
                out[f"{name}:level{k}"] = ok
        return out


def adaptive_subset(ctx: RunContext, n: int) -> list[int]:
    """A fixed random subset (seeded by ``cfg.seed``) of at most ``n`` test image indices, sorted."""
    table = ctx.layout.table(RunLayout.adv_rel("test_white"), columns=["index"])
    idx = np.unique(np.asarray(table["index"]))
    if len(idx) > n:
        idx = np.sort(numpy_rng(ctx.cfg.seed, 20180709).choice(idx, size=n, replace=False))
    return [int(i) for i in idx]


def summarize_whole_model(df, defenses: dict[str, tuple[Optional[str], str]], *, levels, cfg,
                          eot: dict[str, int]) -> dict[str, Any]:
    """Turn the actor's per-row flags into metrics: accuracy, detail (n, CI, success rate), curves."""
    e = cfg.eval
    accuracy: dict[str, dict[str, float]] = {}
    detail: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[list[float]]] = {}
    curve_detail: dict[str, list[dict[str, Any]]] = {}
    curve_mask = df["curve_row"].to_numpy(dtype=bool)
    n_images = int(df["index"].nunique())
    lo, hi = (float(df["budget"].min()), float(df["budget"].max())) if len(df) else (0.0, 0.0)
    for name, (pre, _) in defenses.items():
        clean = df[f"{name}:clean"].to_numpy(dtype=bool)
        pregen = df[f"{name}:pregen"].to_numpy(dtype=bool)
        pgd = df[f"{name}:pgd"].to_numpy(dtype=bool)
        robust = clean & pregen & pgd
        how = "PGD through the whole defended model" + (
            " (BPDA: real JPEG forward, identity backward)" if pre == "jpeg" else "")
        if eot.get(name, 1) > 1:
            how += f", EOT over {eot[name]} samples"
        common = {"images": n_images, "budget_range": [lo, hi], "eot_samples": eot.get(name, 1),
                  "clean_accuracy_same_rows": float(clean.mean()) if len(clean) else 0.0,
                  "white_box_accuracy_same_rows": float(pregen.mean()) if len(pregen) else 0.0}
        asr = float((clean & ~robust).sum() / max(int(clean.sum()), 1))
        accuracy[name] = {"adaptive_pgd": float(robust.mean()) if len(robust) else 0.0}
        detail[name] = {"adaptive_pgd": proportion(
            robust, attack_success_rate=asr, threat_model=how, steps=e.adaptive_steps, restarts=e.adaptive_restarts,
            pgd_alone_accuracy=float((clean & pgd).mean()) if len(pgd) else 0.0,
            eps="per row: the pre-generated white-box eps, widened to the stored image's L-inf distance",
            **common)}
        if e.autoattack:
            aa = clean & df[f"{name}:apgd_ce"].to_numpy(dtype=bool) & df[f"{name}:apgd_dlr"].to_numpy(dtype=bool)
            accuracy[name]["autoattack"] = float(aa.mean()) if len(aa) else 0.0
            detail[name]["autoattack"] = proportion(
                aa, attack_success_rate=float((clean & ~aa).sum() / max(int(clean.sum()), 1)),
                attack="APGD-CE + APGD-DLR (Croce & Hein 2020; AutoAttack's 'rand' components, raydefense's own "
                       "implementation)" + (" with BPDA through real JPEG" if pre == "jpeg" else ""),
                steps=e.autoattack_steps, restarts=e.autoattack_restarts,
                worst_case_accuracy=float((robust & aa).mean()) if len(aa) else 0.0, **common)
        curves[name], curve_detail[name] = [], []
        for k, level in enumerate(levels):
            ok = df[f"{name}:level{k}"].to_numpy(dtype=bool)[curve_mask]
            rec = proportion(ok, eps=float(level))
            curves[name].append([float(level), rec["accuracy"]])
            curve_detail[name].append(rec)
    return {"accuracy": accuracy, "detail": detail, "adaptive": curves, "adaptive_detail": curve_detail,
            "n_images": n_images, "rows": int(len(df))}


def run_adaptive(ctx: RunContext, *, gpu: bool, metrics: dict[str, Any]) -> dict[str, Any]:
    """Attack every defense in ``eval.adaptive_defenses`` as one model; fold the results into ``metrics``.

    Returns the new top-level keys (``adaptive``, ``adaptive_detail``, ``adaptive_setup``);
    ``metrics['accuracy'][d]`` and ``metrics['accuracy_detail'][d]`` gain ``adaptive_pgd`` and
    ``autoattack`` in place.
    """
    from ray.data.expressions import col

    cfg = ctx.cfg
    e = cfg.eval
    have, _ = available_defenses(ctx)
    defenses = {d: have[d] for d in e.adaptive_defenses if d in have}
    if not defenses:
        return {}
    t0 = time.perf_counter()
    levels = list(e.adaptive_eps)
    subset = adaptive_subset(ctx, e.adaptive_max_images)
    first = cfg.attack.test_methods[0]
    ds = ctx.layout.read_adv("test_white", ["clean", "adv", "label", "eps", "method", "index"]).filter(
        expr=col("index").is_in(subset))
    kwargs = {"storage": ctx.storage, "defenses": defenses, "levels": levels, "first_method": first,
              "steps": e.adaptive_steps, "restarts": e.adaptive_restarts, "apgd_steps": e.autoattack_steps,
              "apgd_restarts": e.autoattack_restarts, "autoattack": e.autoattack, "eot_samples": e.eot_samples,
              "jpeg_quality": cfg.baselines.jpeg_quality, "seed": cfg.seed}
    ctx.echo(f"  whole-model attacks on {len(subset)} test images ({', '.join(defenses)}): PGD-{e.adaptive_steps} "
             f"x{e.adaptive_restarts} at each image's own eps and at "
             + ", ".join(f"{255 * v:.0f}/255" for v in levels)
             + (f"; APGD-CE/DLR-{e.autoattack_steps}" if e.autoattack else ""))
    with user_errors():
        # One row per (subset image, test method) in the white-box test set, in batches small
        # enough that every actor of the pool gets several: a row's cost varies a lot (early stop
        # on the rows fooled first), and the attacks' results do not depend on the batch.
        rows = len(subset) * len(cfg.attack.test_methods)
        batch = pool_batch_size(rows, cfg=cfg, batch_size=e.batch_size, batches_per_actor=4,
                                actors=pool_actors(cfg, gpu=gpu))
        df = pool_map(ds, WholeModelActor, kwargs, cfg=cfg, gpu=gpu, batch_size=batch).to_pandas()
    # EOT is decided per defense by the model itself (a submodule with randomized = True).
    eot = {d: int(df[f"{d}:eot"].max()) if len(df) else 1 for d in defenses}
    out = summarize_whole_model(df, defenses, levels=levels, cfg=cfg, eot=eot)
    for d in defenses:
        metrics["accuracy"][d].update(out["accuracy"][d])
        metrics["accuracy_detail"][d].update(out["detail"][d])
    return {
        "adaptive": out["adaptive"],
        "adaptive_detail": out["adaptive_detail"],
        "adaptive_setup": {
            "defenses": list(defenses), "images": out["n_images"], "rows": out["rows"], "levels": levels,
            "pgd_steps": e.adaptive_steps, "pgd_restarts": e.adaptive_restarts, "autoattack": e.autoattack,
            "apgd_steps": e.autoattack_steps, "apgd_restarts": e.autoattack_restarts, "eot_samples": eot,
            "seconds": time.perf_counter() - t0,
        },
    }
