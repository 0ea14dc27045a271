"""Whole-model robustness of the defenses in ``robust.eval_defenses``, and the gradient-masking checks (issue 13).

Part of the evaluate stage when ``robust.eval_defenses`` is not empty. On a fixed seeded subset of
``robust.eval_images`` clean test images (one row each; :class:`RobustEvalActor` on Ray Data),
every defense is attacked as one model (:class:`raydefense.defenses.DefendedModel`: denoiser,
output clamped to [0, 1], classifier) at every eps of ``robust.eval_eps`` by:

``pgd``        PGD, ``robust.pgd_steps`` steps x ``robust.pgd_restarts`` random restarts, step
               ``min(eps, 2.5 eps / steps)`` (Madry et al., ICLR 2018);
``apgd_ce``    APGD with cross-entropy (Croce & Hein, ICML 2020), ``robust.apgd_steps`` steps;
``apgd_dlr``   APGD with the DLR loss (same paper);
``square``     the Square attack (Andriushchenko et al., ECCV 2020), score-based, no gradients,
               ``robust.square_queries`` queries per image;
``transfer``   PGD against the black-box surrogate alone, its examples fed to the defense.

PGD and APGD stop early per image (``early_stop``: an image's first fooling iterate is kept and
no more gradients are spent on it; the same images fall, at a fraction of the cost when most
fall early). Each attack runs on its own (not on another's survivors), so each has its own accuracy for the
masking checks; ``worst`` counts an image as robust only if it survives ``pgd``, ``apgd_ce``,
``apgd_dlr`` and ``square`` (the attacker submits the worst). At ``robust.headline_eps`` PGD
also runs with doubled steps and doubled restarts, and once at ``robust.large_eps``. Every
accuracy counts an image only if the defense is right on it clean too, so it never exceeds the
clean accuracy on the same images.

metrics.json gains ``robust`` (:func:`summarize_robust`)::

    robust.setup                 images, eps, steps, restarts, queries, seconds
    robust.defenses[d].clean     {"accuracy", "n", "ci95"} on the same images
    robust.defenses[d].attacks[a]  list over eps of {"eps", "accuracy", "n", "ci95"}, a in
                                 pgd, apgd_ce, apgd_dlr, square, transfer, worst
    robust.defenses[d].checks_runs  {"pgd_2x_steps", "pgd_2x_restarts", "large_eps"}: same records
    robust.checks[d]             list of {"check", "passed" (true/false/null), "numbers", "details"}
                                 (:mod:`raydefense.robust.masking`)
    robust.flagged               defenses that failed any masking check
    robust.headline[d]           worst-case whole-model accuracy at robust.headline_eps (a record)

and ``accuracy[d]["whole_model_worst"]`` (that headline fraction).
"""
from __future__ import annotations

import time
import zlib
from typing import Any, Optional

import numpy as np
import torch

from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.defended import available_defenses, build_defended_models
from raydefense.pipeline.run import RunContext
from raydefense.pipeline.runtime import pool_map, device_for, images_to_tensor, user_errors
from raydefense.report.stats import proportion
from raydefense.seeding import numpy_rng, row_seeds, seed_everything, torch_generator

ATTACKS = ("pgd", "apgd_ce", "apgd_dlr", "square", "transfer")
WORST_OF = ("pgd", "apgd_ce", "apgd_dlr", "square")  # white-box and score-based: the attacker's worst
GRADIENT = ("pgd", "apgd_ce", "apgd_dlr")


def _pgd_alpha(eps: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.minimum(eps, 2.5 * eps / steps)


@torch.no_grad()
def _correct(model, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    return (model(x).argmax(1) == y).cpu().numpy()


class RobustEvalActor:
    """map_batches actor over clean test rows (``image, label, index``): every attack of the module
    docstring on every defense. Out, per row: ``d:clean`` and ``d:<attack>:<k>`` (correct under
    the attack at eps k, False when wrong clean), ``d:pgd2s``, ``d:pgd2r``, ``d:large``.

    Random starts are keyed by (seed, image index, defense, attack, eps), not by batch position.
    Runs that differ only in eps or random start go through the model together: the images are
    replicated once per (eps, start key) and attacked in one call with per-image eps (PGD at
    every eps, at ``large_eps`` and the doubled restarts' second set of starts; APGD-CE and
    APGD-DLR at every eps; Square at every eps), at most ``max_rows`` rows per call. On a CPU a
    forward pass of a few images costs almost as much as one of many (measured: FaceNet + UDDN
    at batch 4 about 30 ms per image, at 64 about 5), so the cost follows the number of calls.
    The doubled restarts are two independent sets of ``pgd_restarts`` random starts: an image is
    robust only if it survives both, as with ``2 * pgd_restarts`` restarts in one call."""

    def __init__(self, *, storage, defenses, eps, headline: float, large_eps: float, pgd_steps: int,
                 pgd_restarts: int, apgd_steps: int, square_queries: int, jpeg_quality: int, eot_samples: int,
                 gpu: bool, threads: int = 1, seed: int = 0, max_rows: int = 512):
        from raydefense.pipeline.adaptive import eot_samples_for

        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.models = build_defended_models(storage, defenses, jpeg_quality=jpeg_quality, device=self.device)
        self.eot = {n: eot_samples_for(m, eot_samples) for n, m in self.models.items()}
        self.surrogate = load_artifact(storage, "surrogate", self.device)
        self.eps, self.headline, self.large = [float(e) for e in eps], float(headline), float(large_eps)
        self.steps, self.restarts, self.apgd_steps, self.queries = pgd_steps, pgd_restarts, apgd_steps, square_queries
        self.seed = seed
        self.max_rows = max(1, int(max_rows))

    def _seeds(self, index: np.ndarray, *key: Any) -> np.ndarray:
        return row_seeds(index, self.seed, zlib.crc32("/".join(map(str, key)).encode()))

    def _chunks(self, n: int) -> list[slice]:
        return [slice(lo, lo + self.max_rows) for lo in range(0, n, self.max_rows)]

    def _attack_replicated(self, model, attack, x, y, index, groups: list[tuple[float, tuple]]):
        """``attack(model, xs, ys, eps (m,), seeds (m,))`` over ``x`` replicated once per group
        ``(eps, start key)``, in chunks of at most ``max_rows`` rows: ``(adversarial images
        (G * n, C, H, W), their labels (G * n,))``, group g in rows ``g * n`` to ``(g + 1) * n``."""
        n = len(x)
        xs, ys = x.repeat(len(groups), 1, 1, 1), y.repeat(len(groups))
        if n == 0:
            return xs, ys
        eps = torch.cat([torch.full((n,), float(e), device=x.device, dtype=x.dtype) for e, _ in groups])
        seeds = np.concatenate([self._seeds(index, *key) for _, key in groups])
        adv = torch.cat([attack(model, xs[sl], ys[sl], eps[sl], seeds[sl]) for sl in self._chunks(len(xs))])
        return adv, ys

    def _replicated(self, model, attack, x, y, index, groups: list[tuple[float, tuple]]) -> list[np.ndarray]:
        """Per group of :meth:`_attack_replicated`, ``(len(x),)`` flags: still correct on the
        attack's output."""
        n = len(x)
        adv, ys = self._attack_replicated(model, attack, x, y, index, groups)
        ok = np.concatenate([_correct(model, adv[sl], ys[sl]) for sl in self._chunks(len(adv))] or
                            [np.zeros(0, dtype=bool)])
        return [ok[g * n:(g + 1) * n] for g in range(len(groups))]

    @staticmethod
    def _pgd_fn(*, steps: int, restarts: int, eot: int, early_stop: bool = True):
        from raydefense.attacks import PGD

        def attack(model, x, y, eps, seeds):
            return PGD(model, eps=eps, alpha=_pgd_alpha(eps, steps), steps=steps, restarts=restarts, random_start=True,
                       eot_samples=eot, early_stop=early_stop).with_image_seeds(seeds)(x, y)
        return attack

    def _apgd_fn(self, loss: str, eot: int):
        from raydefense.attacks import APGD

        def attack(model, x, y, eps, seeds):
            return APGD(model, eps=eps, steps=self.apgd_steps, loss=loss, eot_samples=eot,
                        early_stop=True).with_image_seeds(seeds)(x, y)
        return attack

    def _square_fn(self):
        from raydefense.attacks import Square

        def attack(model, x, y, eps, seeds):
            return Square(model, eps=eps, n_queries=self.queries,
                          generator=torch_generator(int(seeds[0]) % (2**62)))(x, y)
        return attack

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = images_to_tensor(batch["image"], self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        index = np.asarray(batch["index"])
        out: dict[str, np.ndarray] = {"index": index, "label": np.asarray(batch["label"])}
        seed_everything(self.seed + int(index.min()))  # randomised defenses (EOT) draw from the global RNG
        K = range(len(self.eps))
        # Transfer examples: PGD against the surrogate alone at every eps, fed to every defense; not
        # early-stopped (the surrogate's last, highest-loss iterate transfers best).
        transfer = self._transfer(x, y, index)
        num_classes = None
        for name, model in self.models.items():
            eot = self.eot[name]
            clean_ok = _correct(model, x, y)
            out[f"{name}:clean"] = clean_ok
            rows = np.flatnonzero(clean_ok)
            r = torch.as_tensor(rows, device=self.device, dtype=torch.long)
            xs, ys, ix = x[r], y[r], index[rows]
            if num_classes is None:
                with torch.no_grad():
                    num_classes = int(model(x[:1]).shape[1])

            def scatter(flags: np.ndarray) -> np.ndarray:
                ok = np.zeros_like(clean_ok)
                ok[rows] = flags
                return ok

            h = self.headline
            pgd = [(e, (name, "pgd", k)) for k, e in enumerate(self.eps)]
            extra = [(self.large, (name, "large")), (h, (name, "pgd2r", 0)), (h, (name, "pgd2r", 1))]
            res = self._replicated(model, self._pgd_fn(steps=self.steps, restarts=self.restarts, eot=eot),
                                   xs, ys, ix, pgd + extra)
            for k in K:
                out[f"{name}:pgd:{k}"] = scatter(res[k])
            out[f"{name}:large"] = scatter(res[len(pgd)])
            out[f"{name}:pgd2r"] = scatter(res[len(pgd) + 1] & res[len(pgd) + 2])
            (res2s,) = self._replicated(model, self._pgd_fn(steps=2 * self.steps, restarts=self.restarts, eot=eot),
                                        xs, ys, ix, [(h, (name, "pgd2s"))])
            out[f"{name}:pgd2s"] = scatter(res2s)
            for loss in ("ce", "dlr"):
                if loss == "dlr" and num_classes < 3:  # DLR needs 3 classes: CE's result stands
                    for k in K:
                        out[f"{name}:apgd_dlr:{k}"] = out[f"{name}:apgd_ce:{k}"]
                    continue
                res = self._replicated(model, self._apgd_fn(loss, eot), xs, ys, ix,
                                       [(e, (name, f"apgd_{loss}", k)) for k, e in enumerate(self.eps)])
                for k in K:
                    out[f"{name}:apgd_{loss}:{k}"] = scatter(res[k])
            res = self._replicated(model, self._square_fn(), xs, ys, ix,
                                   [(e, (name, "square", k)) for k, e in enumerate(self.eps)])
            for k in K:
                out[f"{name}:square:{k}"] = scatter(res[k])
            for k in K:
                out[f"{name}:transfer:{k}"] = scatter(_correct(model, transfer[k][r], ys))
        return out

    def _transfer(self, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> list[torch.Tensor]:
        """Per eps, PGD examples ``(B, C, H, W)`` made on the surrogate alone (one replicated call)."""
        n = len(x)
        attack = self._pgd_fn(steps=self.steps, restarts=1, eot=1, early_stop=False)
        adv, _ = self._attack_replicated(self.surrogate, attack, x, y, index,
                                         [(e, ("surrogate", k)) for k, e in enumerate(self.eps)])
        return [adv[k * n:(k + 1) * n] for k in range(len(self.eps))]


def robust_subset(ctx: RunContext, n: int) -> list[int]:
    """A fixed random subset (seeded by ``cfg.seed``) of at most ``n`` clean test image indices, sorted."""
    import pyarrow.dataset as pads

    table = ctx.layout.table(ctx.layout.CLEAN, columns=["index"], filter=pads.field("split") == "test")
    idx = np.unique(np.asarray(table["index"]))
    if len(idx) > n:
        idx = np.sort(numpy_rng(ctx.cfg.seed, 20191301).choice(idx, size=n, replace=False))
    return [int(i) for i in idx]


def _eps_label(e: float) -> str:
    return f"{255 * e:g}/255"


def summarize_robust(df, defenses: list[str], *, eps: list[float], headline: float, large_eps: float,
                     tolerance: float, setup: dict[str, Any]) -> dict[str, Any]:
    """The actor's per-row flags as metrics (module docstring) and the masking checks per defense.

    Pure: ``df`` is a DataFrame (or dict of arrays) with the columns :class:`RobustEvalActor` writes.
    """
    from raydefense.robust import Accuracy, flagged, masking_checks

    def flags(col: str) -> np.ndarray:
        return np.asarray(df[col], dtype=bool)

    def acc(ok: np.ndarray) -> Accuracy:
        return Accuracy(int(ok.sum()), max(int(ok.size), 1))

    out: dict[str, Any] = {"setup": setup, "defenses": {}, "checks": {}, "headline": {}}
    h = next((k for k, e in enumerate(eps) if abs(e - headline) < 1e-9), None)
    if h is None:
        raise ValueError(f"summarize_robust: headline eps {headline!r} is not one of eps {eps}")
    for d in defenses:
        clean = flags(f"{d}:clean")
        per = {a: [clean & flags(f"{d}:{a}:{k}") for k in range(len(eps))] for a in ATTACKS}
        per["worst"] = [np.logical_and.reduce([per[a][k] for a in WORST_OF]) for k in range(len(eps))]
        extra = {"pgd_2x_steps": clean & flags(f"{d}:pgd2s"), "pgd_2x_restarts": clean & flags(f"{d}:pgd2r"),
                 "large_eps": clean & flags(f"{d}:large")}
        out["defenses"][d] = {
            "clean": proportion(clean),
            "attacks": {a: [proportion(ok, eps=float(e)) for ok, e in zip(rows, eps)] for a, rows in per.items()},
            "checks_runs": {k: proportion(v, eps=float(large_eps if k == "large_eps" else headline))
                            for k, v in extra.items()},
        }
        out["headline"][d] = proportion(per["worst"][h], eps=float(headline))
        base, hl = per["pgd"][h], _eps_label(headline)
        checks = masking_checks(
            gradient={a: {e: acc(per[a][k]) for k, e in enumerate(eps)} for a in GRADIENT},
            gradient_free={e: acc(per["square"][k]) for k, e in enumerate(eps)},
            transfer={e: acc(per["transfer"][k]) for k, e in enumerate(eps)},
            large_eps=(large_eps, acc(extra["large_eps"])),
            stronger=[(f"PGD 2x steps at {hl}", acc(base), acc(extra["pgd_2x_steps"])),
                      (f"PGD 2x restarts at {hl}", acc(base), acc(extra["pgd_2x_restarts"]))],
            tolerance=tolerance)
        out["checks"][d] = checks
    out["flagged"] = flagged(out["checks"])
    out["checks"] = {d: [c.to_dict() for c in cs] for d, cs in out["checks"].items()}
    return out


def run_robust_eval(ctx: RunContext, *, gpu: bool, metrics: dict[str, Any]) -> dict[str, Any]:
    """Attack every available defense of ``robust.eval_defenses``; returns ``{"robust": ...}`` and
    adds ``accuracy[d]["whole_model_worst"]`` to ``metrics`` in place. ``{}`` when none is listed."""
    cfg = ctx.cfg
    r = cfg.robust
    have, missing = available_defenses(ctx)
    defenses = {d: have[d] for d in r.eval_defenses if d in have}
    if not defenses:
        return {}
    t0 = time.perf_counter()
    subset = robust_subset(ctx, r.eval_images)
    ds = ctx.layout.read_clean("test", ["image", "label", "index"])
    from ray.data.expressions import col

    ds = ds.filter(expr=col("index").is_in(subset))
    eps = [float(e) for e in r.eval_eps]
    ctx.echo(f"  robust evaluation on {len(subset)} clean test images ({', '.join(defenses)}): at "
             + ", ".join(_eps_label(e) for e in eps)
             + f" PGD-{r.pgd_steps}x{r.pgd_restarts}, APGD-CE/DLR-{r.apgd_steps}, Square-{r.square_queries}, "
             f"transfer from the surrogate; masking checks at {_eps_label(r.headline_eps)} and {_eps_label(r.large_eps)}")
    kwargs = {"storage": ctx.storage, "defenses": defenses, "eps": eps, "headline": r.headline_eps,
              "large_eps": r.large_eps, "pgd_steps": r.pgd_steps, "pgd_restarts": r.pgd_restarts,
              "apgd_steps": r.apgd_steps, "square_queries": r.square_queries,
              "jpeg_quality": cfg.baselines.jpeg_quality, "eot_samples": cfg.eval.eot_samples, "seed": cfg.seed}
    with user_errors():
        df = pool_map(ds, RobustEvalActor, kwargs, cfg=cfg, gpu=gpu, batch_size=cfg.eval.batch_size).to_pandas()
    df = df.sort_values("index", kind="stable", ignore_index=True)
    setup = {"images": int(len(df)), "eps": eps, "pgd_steps": r.pgd_steps, "pgd_restarts": r.pgd_restarts,
             "apgd_steps": r.apgd_steps, "square_queries": r.square_queries, "headline_eps": r.headline_eps,
             "large_eps": r.large_eps, "not_available": {d: missing.get(d, "?") for d in r.eval_defenses
                                                         if d not in have}}
    out = summarize_robust(df, list(defenses), eps=eps, headline=r.headline_eps, large_eps=r.large_eps,
                           tolerance=r.large_eps_tolerance, setup=setup)
    out["setup"]["seconds"] = time.perf_counter() - t0
    for d, rec in out["headline"].items():
        metrics["accuracy"].setdefault(d, {})["whole_model_worst"] = rec["accuracy"]
    return {"robust": out}
