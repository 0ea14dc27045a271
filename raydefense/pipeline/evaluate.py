"""Stage 7, evaluate: every trained defense over the test sets, on Ray Data actors.

A defense is a preprocessing step (none, a denoiser, JPEG) in front of a classifier (the
target, the KT student, or a baseline's classifier):

=============  ==============  ==========
defense        preprocess      classifier
=============  ==============  ==========
none           -               target
dae            DAE             target
pixel_guided   pixel UDDN      target
uddn           UDDN            target
uddn_kt        UDDN            student
jpeg           real JPEG       target
dcn            -               dcn
distillation   -               distillation
=============  ==============  ==========

Results: per-image correctness flags stream back from the actors (no images reach the
driver), are aggregated into accuracies with Wilson 95% intervals, L1 distances (Table 1),
accuracy against eps (Figure 7), and written with the figures to ``<run>/report/``.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.attack import adv_rel
from raydefense.pipeline.prepare import read_split
from raydefense.pipeline.runtime import device_for, images_to_tensor, user_errors

DEFENSES: dict[str, tuple[Optional[str], str]] = {
    "none": (None, "target"),
    "dae": ("dae", "target"),
    "pixel_guided": ("pixel_guided", "target"),
    "uddn": ("uddn", "target"),
    "uddn_kt": ("uddn", "student"),
    "jpeg": ("jpeg", "target"),
    "dcn": (None, "dcn"),
    "distillation": (None, "distillation"),
}
DENOISERS = ("dae", "pixel_guided", "uddn")
TEST_SETS = {"white_box": "test_white", "black_box": "test_black"}


def available_defenses(ctx) -> tuple[dict[str, tuple[Optional[str], str]], dict[str, str]]:
    """Defenses whose parts were trained in this run, and why the others are missing."""
    have, missing = {}, {}
    cfg = ctx.cfg
    for name, (pre, clf) in DEFENSES.items():
        if name == "jpeg" and "jpeg" not in cfg.baselines.enabled:
            missing[name] = "not in baselines.enabled"
            continue
        needed = [clf] + ([pre] if pre and pre != "jpeg" else [])
        absent = [n for n in needed if not ctx.storage.exists(f"models/{n}.pt")]
        if absent:
            missing[name] = _why_missing(cfg, name)
            continue
        have[name] = (pre, clf)
    return have, missing


def _why_missing(cfg, name: str) -> str:
    if name in ("dae", "pixel_guided") and name not in cfg.denoise.baselines:
        return "left out by the config (denoise.baselines)"
    if name in ("dcn", "distillation") and name not in cfg.baselines.enabled:
        return "left out by the config (baselines.enabled)"
    if name == "uddn_kt" and not cfg.distill.enabled:
        return "left out by the config (distill.enabled: false)"
    return "its models were not trained in this run"


class DefenseBank:
    """Loads every part once and applies a defense to a batch, caching shared preprocessing."""

    def __init__(self, storage, defenses: dict[str, tuple[Optional[str], str]], *, jpeg_quality: int, device):
        from raydefense.defenses import JPEG

        self.device = device
        self.defenses = defenses
        self.pre: dict[str, Any] = {}
        self.clf: dict[str, Any] = {}
        for pre, clf in defenses.values():
            if pre == "jpeg":
                self.pre[pre] = JPEG(quality=jpeg_quality, mode="real")
            elif pre and pre not in self.pre:
                self.pre[pre] = load_artifact(storage, pre, device)
            if clf not in self.clf:
                self.clf[clf] = load_artifact(storage, clf, device)

    @torch.no_grad()
    def preprocess_all(self, x: torch.Tensor) -> dict[Optional[str], torch.Tensor]:
        out: dict[Optional[str], torch.Tensor] = {None: x}
        for name, module in self.pre.items():
            out[name] = module(x).clamp(0, 1)
        return out

    @torch.no_grad()
    def predict_all(self, x: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[Optional[str], torch.Tensor]]:
        pre = self.preprocess_all(x)
        preds = {name: self.clf[c](pre[p]).argmax(1).cpu().numpy() for name, (p, c) in self.defenses.items()}
        return preds, pre


class EvalActor:
    """map_batches actor over an adversarial test set: correctness and L1 per defense."""

    def __init__(self, *, storage, defenses, jpeg_quality: int, gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.bank = DefenseBank(storage, defenses, jpeg_quality=jpeg_quality, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clean = images_to_tensor(batch["clean"], self.device)
        adv = images_to_tensor(batch["adv"], self.device)
        y = batch["label"]
        out: dict[str, np.ndarray] = {k: batch[k] for k in ("set", "label", "eps", "method", "index")}
        for tag, x in (("adv", adv), ("clean", clean)):
            preds, pre = self.bank.predict_all(x)
            for name, p in preds.items():
                out[f"{tag}_ok_{name}"] = p == y
            for name, xd in pre.items():
                key = name or "none"
                out[f"{tag}_l1_{key}"] = (xd - clean).abs().mean(dim=(1, 2, 3)).cpu().numpy()
        return out


class ByEpsActor:
    """map_batches actor for Figure 7: FGSM at fixed eps levels from the target (white-box)
    and the surrogate (black-box), then every defense."""

    def __init__(self, *, storage, defenses, jpeg_quality: int, levels, gpu: bool, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.bank = DefenseBank(storage, defenses, jpeg_quality=jpeg_quality, device=self.device)
        self.sources = {"white": load_artifact(storage, "target", self.device),
                        "black": load_artifact(storage, "surrogate", self.device)}
        self.levels = list(levels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks import FGSM

        x = images_to_tensor(batch["image"], self.device)
        y = torch.as_tensor(batch["label"], device=self.device)
        out: dict[str, np.ndarray] = {"label": batch["label"]}
        for src, model in self.sources.items():
            for k, eps in enumerate(self.levels):
                adv = FGSM(model, eps=eps)(x, y) if eps > 0 else x
                preds, _ = self.bank.predict_all(adv)
                for name, p in preds.items():
                    out[f"{src}{k}_{name}"] = p == batch["label"]
        return out


def wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def _map(ds, cls, kwargs: dict[str, Any], ctx, gpu: bool, batch_size: int):
    import ray

    cfg = ctx.cfg
    return ds.map_batches(cls, fn_constructor_kwargs={**kwargs, "gpu": gpu, "threads": int(cfg.scale.cpus_per_actor)},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.scale.attack_actors),
                          num_cpus=cfg.scale.cpus_per_actor, num_gpus=1 if gpu else None)


def evaluate_defenses(ctx, *, gpu: bool) -> dict[str, Any]:
    """Compute metrics.json's content (without timings) for a run whose training is done."""
    cfg = ctx.cfg
    defenses, missing = available_defenses(ctx)
    common = {"storage": ctx.storage, "defenses": defenses, "jpeg_quality": cfg.baselines.jpeg_quality}
    accuracy: dict[str, dict[str, float]] = {d: {} for d in defenses}
    detail: dict[str, dict[str, Any]] = {d: {} for d in defenses}
    l1: dict[str, dict[str, float]] = {d: {} for d in ("none",) + DENOISERS if d == "none" or d in defenses}
    first_method = cfg.attack.test_methods[0]
    import ray
    from ray.data.expressions import col

    # White- and black-box sets in one pass through one actor pool.
    tests = ray.data.read_parquet(ctx.data_path("adv"), filesystem=ctx.storage.fs).filter(
        expr=col("set").is_in(list(TEST_SETS.values())))
    with user_errors():
        df_all = _map(tests, EvalActor, common, ctx, gpu, cfg.eval.batch_size).to_pandas()
    frames = {key: df_all[df_all["set"] == name] for key, name in TEST_SETS.items()}
    # Clean accuracy: the test split's clean images, once per image.
    clean_rows = frames["white_box"][frames["white_box"]["method"] == first_method]
    for key, df in (("clean", clean_rows), ("white_box", frames["white_box"]), ("black_box", frames["black_box"])):
        tag = "clean" if key == "clean" else "adv"
        for d in defenses:
            ok = df[f"{tag}_ok_{d}"].to_numpy()
            n, k = len(ok), int(ok.sum())
            accuracy[d][key] = k / max(n, 1)
            entry: dict[str, Any] = {"accuracy": k / max(n, 1), "n": n, "ci95": list(wilson(k, n))}
            if key != "clean":
                # Attack success rate: of the images this defense gets right when clean,
                # the fraction the attack makes it get wrong.
                clean_ok = clean_rows.set_index("index")[f"clean_ok_{d}"]
                was_ok = df["index"].map(clean_ok).fillna(False).to_numpy(dtype=bool)
                entry["attack_success_rate"] = float((was_ok & ~ok).sum() / max(was_ok.sum(), 1))
                entry["per_method"] = {m: float(g[f"{tag}_ok_{d}"].mean()) for m, g in df.groupby("method")}
            detail[d][key] = entry
        for d in l1:
            l1[d][key] = float(df[f"{tag}_l1_{d}"].mean())

    levels = list(cfg.eval.by_epsilon)
    with user_errors():
        eps_df = _map(read_split(ctx, "test"), ByEpsActor, {**common, "levels": levels}, ctx, gpu, cfg.eval.batch_size).to_pandas()
    by_eps = {d: [[float(e), float(eps_df[f"white{k}_{d}"].mean())] for k, e in enumerate(levels)] for d in defenses}
    by_eps_black = {d: [[float(e), float(eps_df[f"black{k}_{d}"].mean())] for k, e in enumerate(levels)] for d in defenses}

    return {
        "accuracy": accuracy,
        "l1": l1,
        "by_epsilon": by_eps,
        "by_epsilon_black_box": by_eps_black,
        "accuracy_detail": detail,
        "n_images": {"clean": int(len(clean_rows)), "white_box": int(len(frames["white_box"])),
                     "black_box": int(len(frames["black_box"])), "by_epsilon": int(len(eps_df))},
        "defenses_left_out": missing,
    }


def figure6_examples(ctx, *, k: int) -> dict[str, np.ndarray]:
    """A few (clean, adversarial, UDDN-denoised) white-box test triples for Figure 6."""
    import pyarrow.dataset as pads

    from raydefense.pipeline.runtime import tensor_to_images

    table = pads.dataset(ctx.storage.path(adv_rel("test_white")), filesystem=ctx.storage.fs, format="parquet").head(k)
    rows = table.to_pydict()
    clean = np.stack([np.asarray(v, dtype=np.uint8) for v in rows["clean"]])
    adv = np.stack([np.asarray(v, dtype=np.uint8) for v in rows["adv"]])
    out = {"clean": clean, "adv": adv, "eps": np.asarray(rows["eps"]), "method": np.asarray(rows["method"])}
    if ctx.storage.exists("models/uddn.pt"):
        uddn = load_artifact(ctx.storage, "uddn")
        with torch.no_grad():
            out["denoised"] = tensor_to_images(uddn(images_to_tensor(adv)))
    return out


def run_evaluate(ctx, *, gpu: bool) -> dict[str, Any]:
    from raydefense.report import write_report

    t0 = time.perf_counter()
    metrics = evaluate_defenses(ctx, gpu=gpu)
    if ctx.cfg.eval.adaptive:
        from raydefense.pipeline.adaptive import run_adaptive

        metrics.update(run_adaptive(ctx, gpu=gpu, metrics=metrics))
    metrics["config"] = ctx.cfg.to_dict()
    metrics["data"] = ctx.storage.read_json("data/meta.json")
    metrics["timings_s"] = {**ctx.timings, "evaluate": time.perf_counter() - t0}
    examples = figure6_examples(ctx, k=ctx.cfg.eval.figure_examples)
    write_report(ctx.storage, metrics, examples)
    ctx.echo(summary_table(metrics))
    return {"report": "report/report.md", "metrics": "report/metrics.json"}


def summary_table(metrics: dict[str, Any]) -> str:
    acc = metrics["accuracy"]
    lines = ["", f"{'defense':<14}{'clean':>8}{'white-box':>11}{'black-box':>11}"]
    for d, row in acc.items():
        lines.append(f"{d:<14}" + "".join(f"{100 * row.get(k, float('nan')):>{w}.1f}%" for k, w in
                                         (("clean", 7), ("white_box", 10), ("black_box", 10))))
    if "none" in acc and "uddn_kt" in acc:
        gain = 100 * (acc["uddn_kt"]["white_box"] - acc["none"]["white_box"])
        loss = 100 * (acc["none"]["clean"] - acc["uddn_kt"]["clean"])
        lines.append(f"UDDN + knowledge transfer vs no defense: white-box {gain:+.1f} points, clean {-loss:+.1f} points")
    for d, why in metrics.get("defenses_left_out", {}).items():
        lines.append(f"left out: {d} ({why})")
    return "\n".join(lines)
