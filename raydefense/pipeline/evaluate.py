"""Stage 7, evaluate: every trained defense (:mod:`raydefense.pipeline.defended`) over the
test sets, on Ray Data actors.

One streaming pass of :class:`EvalActor` over the white- and black-box test rows gives
Tables 1-3 (per-row correctness, L1 distance to the clean image) and Figure 7 (FGSM at the
``eval.by_epsilon`` levels from the target and the surrogate, on each clean test image
once). Only per-row flags reach the driver, which turns them into accuracies with n and
Wilson 95% intervals and attack success rates. :mod:`raydefense.pipeline.adaptive` then
attacks the whole defended models, and the report goes to ``<run>/report/``.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.pipeline.defended import DEFENSES, DENOISERS, available_defenses, load_parts  # noqa: F401  (re-exported)
from raydefense.pipeline.runtime import pool_map, device_for, images_to_tensor, user_errors
from raydefense.report.significance import clustered_accuracy, paired_comparisons
from raydefense.report.stats import proportion, wilson  # noqa: F401  (wilson: re-exported)

TEST_SETS = {"white_box": "test_white", "black_box": "test_black"}


class DefenseBank:
    """Loads every part once and applies a defense to a batch, caching shared preprocessing."""

    def __init__(self, storage, defenses: dict[str, tuple[Optional[str], str]], *, jpeg_quality: int, device):
        self.device = device
        self.defenses = defenses
        self.pre, self.clf = load_parts(storage, defenses, jpeg_quality=jpeg_quality, jpeg_mode="real", device=device)

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
    """map_batches actor over the white- and black-box test rows: every defense, one pass.

    Per row: correctness and L1 distance to the clean image of each defense on the
    adversarial image (Tables 1-3). On the rows of the first test method of the white-box
    set (``curve_row``: each test image once) also on the clean image, and under FGSM at
    each level of ``eval.by_epsilon`` from the target (white-box) and the surrogate
    (black-box) for Figure 7. Values a row does not have are False / NaN.
    """

    def __init__(self, *, storage, defenses, jpeg_quality: int, levels, first_method: str, gpu: bool,
                 threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.device = device_for(gpu)
        self.bank = DefenseBank(storage, defenses, jpeg_quality=jpeg_quality, device=self.device)
        self.sources = {"white": load_artifact(storage, "target", self.device),
                        "black": load_artifact(storage, "surrogate", self.device)}
        self.levels, self.first_method = list(levels), first_method

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydefense.attacks import fgsm_levels

        clean = images_to_tensor(batch["clean"], self.device)
        adv = images_to_tensor(batch["adv"], self.device)
        y = batch["label"]
        b = len(y)
        out: dict[str, np.ndarray] = {k: batch[k] for k in ("set", "label", "eps", "method", "index")}
        curve = (np.asarray(batch["set"]) == TEST_SETS["white_box"]) & (np.asarray(batch["method"]) == self.first_method)
        out["curve_row"] = curve
        preds, pre = self.bank.predict_all(adv)
        for name, p in preds.items():
            out[f"adv_ok_{name}"] = p == y
        for name, xd in pre.items():
            out[f"adv_l1_{name or 'none'}"] = (xd - clean).abs().mean(dim=(1, 2, 3)).cpu().numpy()
        rows = np.flatnonzero(curve)
        names = list(self.bank.defenses)
        for name in names:
            out[f"clean_ok_{name}"] = np.zeros(b, dtype=bool)
            for src in self.sources:
                for k in range(len(self.levels)):
                    out[f"{src}{k}_{name}"] = np.zeros(b, dtype=bool)
        for name in pre:
            out[f"clean_l1_{name or 'none'}"] = np.full(b, np.nan, dtype=np.float32)
        if rows.size:
            xc, yc = clean[rows], y[rows]
            clean_preds, pre = self.bank.predict_all(xc)
            for name, p in clean_preds.items():
                out[f"clean_ok_{name}"][rows] = p == yc
            for name, xd in pre.items():
                out[f"clean_l1_{name or 'none'}"][rows] = (xd - xc).abs().mean(dim=(1, 2, 3)).cpu().numpy()
            yt = torch.as_tensor(yc, device=self.device)
            for src, model in self.sources.items():
                # One gradient per source for every level (FGSM's step does not depend on eps).
                at_level = iter(fgsm_levels(model, xc, yt, [eps for eps in self.levels if eps > 0]))
                for k, eps in enumerate(self.levels):
                    # eps 0 is the clean image: its predictions are the ones just made.
                    preds = self.bank.predict_all(next(at_level))[0] if eps > 0 else clean_preds
                    for name, p in preds.items():
                        out[f"{src}{k}_{name}"][rows] = p == yc
        return out


def evaluate_defenses(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """Compute metrics.json's content (without timings) for a run whose training is done."""
    cfg = ctx.cfg
    defenses, missing = available_defenses(ctx)
    common = {"storage": ctx.storage, "defenses": defenses, "jpeg_quality": cfg.baselines.jpeg_quality}
    accuracy: dict[str, dict[str, float]] = {d: {} for d in defenses}
    detail: dict[str, dict[str, Any]] = {d: {} for d in defenses}
    l1: dict[str, dict[str, float]] = {d: {} for d in ("none",) + DENOISERS if d == "none" or d in defenses}
    l1_detail: dict[str, dict[str, Any]] = {d: {} for d in l1}
    first_method = cfg.attack.test_methods[0]
    # White- and black-box sets, clean images and Figure 7 in one pass through one actor pool.
    levels = list(cfg.eval.by_epsilon)
    tests = ctx.layout.read_adv_sets(list(TEST_SETS.values()))
    kwargs = {**common, "levels": levels, "first_method": first_method}
    with user_errors():
        df_all = pool_map(tests, EvalActor, kwargs, cfg=cfg, gpu=gpu, batch_size=cfg.eval.batch_size).to_pandas()
    # Rows in a fixed order (set, image, method), not the order they came back in: the means, stds
    # and row bootstraps below then depend only on which rows there are, not on the storage layout.
    df_all = df_all.sort_values(["set", "index", "method"], kind="stable", ignore_index=True)
    frames = {key: df_all[df_all["set"] == name] for key, name in TEST_SETS.items()}
    # Clean accuracy: the test split's clean images, once per image.
    clean_rows = df_all[df_all["curve_row"].to_numpy(dtype=bool)]
    paired: dict[str, list[dict[str, Any]]] = {}
    for key, df in (("clean", clean_rows), ("white_box", frames["white_box"]), ("black_box", frames["black_box"])):
        tag = "clean" if key == "clean" else "adv"
        # White-/black-box rows are (image, method) pairs: intervals and paired tests resample
        # images (report/significance.py); the clean set has one row per image.
        images = None if key == "clean" else df["index"].to_numpy()
        flags = {d: df[f"{tag}_ok_{d}"].to_numpy(dtype=bool) for d in defenses}
        paired[key] = [r.to_dict() for r in paired_comparisons(flags, images, test_set=key, seed=cfg.seed)]
        for d in defenses:
            ok = flags[d]
            entry: dict[str, Any] = proportion(ok)
            accuracy[d][key] = entry["accuracy"]
            if images is not None and len(ok):
                ca = clustered_accuracy(ok, images, seed=cfg.seed)
                entry.update(ci95=list(ca.ci95), ci95_method=ca.method, n_images=ca.n_clusters,
                             ci95_rows_independent=list(ca.ci95_rows_independent))
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
            l1_detail[d][key] = {"mean": l1[d][key], "std": float(df[f"{tag}_l1_{d}"].std(ddof=0)), "n": int(len(df))}

    by_eps_detail = {src: {d: [proportion(clean_rows[f"{src}{k}_{d}"].to_numpy(dtype=bool), eps=float(e))
                               for k, e in enumerate(levels)] for d in defenses} for src in ("white", "black")}
    by_eps = {d: [[r["eps"], r["accuracy"]] for r in rows] for d, rows in by_eps_detail["white"].items()}
    by_eps_black = {d: [[r["eps"], r["accuracy"]] for r in rows] for d, rows in by_eps_detail["black"].items()}

    return {
        "accuracy": accuracy,
        "l1": l1,
        "by_epsilon": by_eps,
        "by_epsilon_black_box": by_eps_black,
        "by_epsilon_detail": {"white_box": by_eps_detail["white"], "black_box": by_eps_detail["black"]},
        "accuracy_detail": detail,
        "paired_tests": paired,
        "l1_detail": l1_detail,
        "n_images": {"clean": int(len(clean_rows)), "white_box": int(len(frames["white_box"])),
                     "black_box": int(len(frames["black_box"])), "by_epsilon": int(len(clean_rows))},
        "defenses_left_out": missing,
    }


def figure6_examples(ctx: RunContext, *, k: int) -> dict[str, np.ndarray]:
    """A few (clean, adversarial, UDDN-denoised) white-box test triples for Figure 6."""
    from raydefense.pipeline.runtime import tensor_to_images

    table = ctx.layout.table(RunLayout.adv_rel("test_white"), head=k)
    rows = table.to_pydict()
    clean = np.stack([np.asarray(v, dtype=np.uint8) for v in rows["clean"]])
    adv = np.stack([np.asarray(v, dtype=np.uint8) for v in rows["adv"]])
    out = {"clean": clean, "adv": adv, "eps": np.asarray(rows["eps"]), "method": np.asarray(rows["method"])}
    if ctx.layout.has_model("uddn"):
        uddn = load_artifact(ctx.storage, "uddn")
        with torch.no_grad():
            out["denoised"] = tensor_to_images(uddn(images_to_tensor(adv)))
    return out


def describe_models(storage) -> dict[str, dict[str, Any]]:
    """Every ``models/*.pt`` artifact of the run: kind, architecture, parameter count, final metrics."""
    out: dict[str, dict[str, Any]] = {}
    for name in RunLayout(storage).model_names():
        blob = storage.load_torch(RunLayout.model_rel(name))
        spec = blob.get("spec", {})
        params = sum(int(v.numel()) for k, v in blob.get("state_dict", {}).items()
                     if hasattr(v, "numel") and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
        out[name] = {"kind": spec.get("kind"), "arch": spec.get("arch"), "parameters": params,
                           "metrics": {k: v for k, v in blob.get("metrics", {}).items()
                                       if isinstance(v, (int, float, str, bool))}}
    return out


def child_run_name(parent: str, model: str) -> str:
    """The run that defends extra target ``model`` of a multi-model run (Table 5)."""
    return f"{parent}--{model}"


def table5_rows(cfg, parent_metrics: dict[str, Any], runs_root) -> list[dict[str, Any]]:
    """Table 5's rows: this run's target, then each finished child run of ``models.extra_targets``.

    ``runs_root`` is the Storage holding the runs (the parent's siblings). Children without a
    report yet are left out (they appear once they finish).
    """
    from raydefense.report.compare import run_row

    rows = [run_row(parent_metrics, run=cfg.name)]
    for model in cfg.models.extra_targets:
        child = runs_root.child(child_run_name(cfg.name, model))
        if child.exists(RunLayout.METRICS):
            rows.append(run_row(child.read_json(RunLayout.METRICS), run=child_run_name(cfg.name, model)))
    return rows


def run_evaluate(ctx: RunContext, *, gpu: bool) -> dict[str, Any]:
    """The evaluate stage: Tables 1-3, Figures 6-7, whole-model attacks, report; returns its outputs."""
    from raydefense.report import write_report
    from raydefense.report.writer import black_box_check, black_box_sentence
    from raydefense.storage import Storage

    cfg = ctx.cfg
    t0 = time.perf_counter()
    metrics = evaluate_defenses(ctx, gpu=gpu)
    steps = {"tables 1-3 and figure 7": time.perf_counter() - t0}
    if cfg.eval.adaptive:
        from raydefense.pipeline.adaptive import run_adaptive

        t1 = time.perf_counter()
        metrics.update(run_adaptive(ctx, gpu=gpu, metrics=metrics))
        steps["whole-model attacks"] = time.perf_counter() - t1
    if cfg.robust.eval_defenses:
        from raydefense.pipeline.robust_eval import run_robust_eval

        t1 = time.perf_counter()
        metrics.update(run_robust_eval(ctx, gpu=gpu, metrics=metrics))
        if "robust" in metrics and ctx.is_done("robust"):
            metrics["robust"]["training_s"] = dict(ctx.marker("robust").get("outputs", {}).get("seconds", {}))
        steps["robust evaluation"] = time.perf_counter() - t1
    metrics["config"] = cfg.to_dict()
    metrics["data"] = ctx.layout.meta()
    metrics["models"] = describe_models(ctx.storage)
    metrics["black_box_check"] = black_box_check(metrics, min_drop=cfg.eval.black_box_min_drop)
    if cfg.models.extra_targets:
        root = Storage.open(cfg.storage.path, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)
        metrics["table5"] = table5_rows(cfg, metrics, root)
    examples = figure6_examples(ctx, k=cfg.eval.figure_examples)
    metrics["eval_timings_s"] = steps
    metrics["timings_s"] = {**ctx.timings, "evaluate": time.perf_counter() - t0}
    write_report(ctx.storage, metrics, examples)
    ctx.echo(summary_table(metrics))
    check = metrics["black_box_check"]
    if check and not check["informative"]:
        ctx.echo("warning: " + black_box_sentence(check, cfg.models.surrogate, target=cfg.models.target,
                                                  surrogate_init=cfg.models.surrogate_init, markdown=False))
    return {"report": RunLayout.REPORT, "metrics": RunLayout.METRICS}


def summary_table(metrics: dict[str, Any]) -> str:
    """The console summary: accuracy per defense and test set (whole-model attacks where run)."""
    acc = metrics["accuracy"]
    extra = [s for s in ("adaptive_pgd", "autoattack") if any(s in row for row in acc.values())]
    titles = {"clean": "clean", "white_box": "white-box", "black_box": "black-box", "adaptive_pgd": "whole-PGD",
              "autoattack": "APGD"}
    cols = ["clean", "white_box", "black_box"]
    lines = ["", f"{'defense':<14}" + "".join(f"{titles[c]:>11}" for c in cols)
             + "".join(f"{titles[c]:>11}" for c in extra) + ("   (clean, same images)" if extra else "")]
    for d, row in acc.items():
        line = f"{d:<14}" + "".join(f"{100 * row[c]:>10.1f}%" if c in row else f"{'-':>11}" for c in cols)
        line += "".join(f"{100 * row[c]:>10.1f}%" if c in row else f"{'-':>11}" for c in extra)
        same = metrics.get("accuracy_detail", {}).get(d, {}).get("adaptive_pgd", {}).get("clean_accuracy_same_rows")
        if extra and same is not None:
            line += f"   ({100 * same:.1f}%)"
        lines.append(line)
    n = metrics.get("n_images", {})
    setup = metrics.get("adaptive_setup", {})
    lines.append(f"n: clean {n.get('clean')} images, white-/black-box {n.get('white_box')}/{n.get('black_box')} rows"
                 + (f", whole-model attacks {setup.get('rows')} rows of {setup.get('images')} images" if setup else ""))
    if "none" in acc and "uddn_kt" in acc:
        gain = 100 * (acc["uddn_kt"]["white_box"] - acc["none"]["white_box"])
        loss = 100 * (acc["none"]["clean"] - acc["uddn_kt"]["clean"])
        lines.append(f"UDDN + knowledge transfer vs no defense: white-box {gain:+.1f} points, clean {-loss:+.1f} points")
    for d, why in metrics.get("defenses_left_out", {}).items():
        lines.append(f"left out: {d} ({why})")
    if metrics.get("robust"):
        lines += robust_summary_lines(metrics["robust"])
    return "\n".join(lines)


def robust_summary_lines(robust: dict[str, Any]) -> list[str]:
    """Console lines of the robust evaluation: per defense, clean and worst-case whole-model
    accuracy at each eps, a flag on defenses that failed a gradient-masking check."""
    s = robust["setup"]
    eps = s["eps"]
    lines = ["", f"whole-model attacks, worst of PGD/APGD-CE/APGD-DLR/Square on {s['images']} test images:",
             f"{'defense':<14}{'clean':>9}" + "".join(f"{f'{255 * e:g}/255':>9}" for e in eps) + "  masking checks"]
    for d, rec in robust["defenses"].items():
        worst = "".join(f"{100 * r['accuracy']:>8.1f}%" for r in rec["attacks"]["worst"])
        failed = [c["check"] for c in robust["checks"][d] if c["passed"] is False]
        lines.append(f"{d:<14}{100 * rec['clean']['accuracy']:>8.1f}%" + worst
                     + ("  FLAGGED: failed " + ", ".join(failed) if failed else "  pass"))
    return lines
