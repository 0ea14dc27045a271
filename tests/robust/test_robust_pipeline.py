"""End to end on Ray (issue 13), kept small: a finished tiny run (tests/pipeline/test_evaluation.py's
builder, plus a clean validation split and a KT teacher), then the ``robust`` stage trains ``pgd_at``
and ``uddn_kt_adv`` on Ray Train with two data-parallel workers, a rerun resumes without training,
and the evaluate stage attacks none, uddn_kt, pgd_at and uddn_kt_adv through the whole model with
every attack, runs the masking checks and writes them into metrics.json and report.md."""
from __future__ import annotations

import io

import numpy as np
import pytest

from raydefense.pipeline.artifacts import load_artifact, save_artifact
from raydefense.pipeline.run import RunLayout

pytestmark = pytest.mark.slow

ROBUST = [
    "robust.defenses=[pgd_at, uddn_kt_adv]", "robust.eval_defenses=[none, uddn_kt, pgd_at, uddn_kt_adv]",
    "robust.steps=2", "robust.val_steps=2", "robust.uddn_epochs=1", "robust.eps_min=0.0078431373",
    "robust.pgd_at={epochs: 2, batch_size: 8, lr: 0.001}", "robust.student={epochs: 1, batch_size: 8, lr: 0.001}",
    "robust.eval_eps=[0.0156862745, 0.0313725490]", "robust.headline_eps=0.0156862745", "robust.eval_images=6",
    "robust.pgd_steps=2", "robust.pgd_restarts=1", "robust.apgd_steps=3", "robust.square_queries=5",
    "scale.num_workers=2", "scale.cpus_per_worker=1", "eval.adaptive=false",
]


def _add_val_split(ctx) -> None:
    """Every fourth training image becomes a validation image (the builder makes none)."""
    import pyarrow.parquet as pq

    rel = "data/clean/part-0.parquet"
    table = pq.read_table(io.BytesIO(ctx.storage.read_bytes(rel)))
    split = np.asarray(table["split"]).astype(object)
    split[(split == "gnr") & (np.arange(len(split)) % 4 == 1)] = "val"
    table = table.set_column(table.schema.get_field_index("split"), "split", __import__("pyarrow").array(split.astype(str)))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    ctx.storage.write_bytes(rel, buf.getvalue())


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory):
    import ray
    import torch

    from raydefense.pipeline.evaluate import run_evaluate
    from raydefense.pipeline.robust import run_robust
    from raydefense.pipeline.runtime import init_ray
    from tests.pipeline.test_evaluation import build_tiny_run

    torch.set_num_threads(1)
    ctx = build_tiny_run(tmp_path_factory.mktemp("runs"))
    _add_val_split(ctx)
    save_artifact(ctx.storage, "teacher", load_artifact(ctx.storage, "target", frozen=False),
                  {"kind": "classifier", "arch": "small_cnn", "num_classes": ctx.layout.num_classes()},
                  config=ctx.cfg.to_dict())
    ctx.cfg = ctx.cfg.replace(ROBUST)
    started = not ray.is_initialized()
    init_ray(ctx.cfg)
    lines: list[str] = []
    ctx.echo = lines.append
    trained = run_robust(ctx, gpu=False)
    ctx.mark_done("robust", duration_s=1.0, outputs=trained)
    again = run_robust(ctx, gpu=False)
    run_evaluate(ctx, gpu=False)
    if started:
        ray.shutdown()
    return ctx, trained, again, ctx.storage.read_json(RunLayout.METRICS), lines


def test_both_defenses_train_data_parallel_and_resume(robust_run):
    ctx, trained, again, _, lines = robust_run
    for art in ("pgd_at", "uddn_adv", "student_adv"):
        blob = ctx.storage.load_torch(RunLayout.model_rel(art))
        history = blob["metrics"]["history"]
        assert history and all(h["workers"] == 2 for h in history)
        assert 0 <= blob["metrics"]["val_pgd_acc"] <= 1
        assert blob["config"]["robust"]["defenses"] == ["pgd_at", "uddn_kt_adv"]
    assert blob["metrics"]["val_pgd_acc"] <= blob["metrics"]["val_acc"]  # student_adv: whole model, same images
    # Fine-tuned, not copied: the weights moved away from their starting points.
    for art, init in (("pgd_at", "target"), ("uddn_adv", "uddn"), ("student_adv", "student")):
        a, b = load_artifact(ctx.storage, art).state_dict(), load_artifact(ctx.storage, init).state_dict()
        assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in a if a[k].is_floating_point())
    assert set(trained["seconds"]) == {"pgd_at", "uddn_kt_adv"}
    assert any("already trained, skipping" in line for line in lines)  # the rerun trained nothing
    assert again["pgd_at"] == {} and again["student_adv"] == {}


def test_whole_model_attacks_and_masking_checks_in_metrics_and_report(robust_run):
    ctx, _, _, m, _ = robust_run
    rob = m["robust"]
    assert list(rob["defenses"]) == ["none", "uddn_kt", "pgd_at", "uddn_kt_adv"]
    n = rob["setup"]["images"]
    assert n == 6
    for d, rec in rob["defenses"].items():
        clean = rec["clean"]["accuracy"]
        for a in ("pgd", "apgd_ce", "apgd_dlr", "square", "transfer", "worst"):
            assert [r["n"] for r in rec["attacks"][a]] == [n, n]
            assert all(r["accuracy"] <= clean for r in rec["attacks"][a]), (d, a)
        assert [c["check"] for c in rob["checks"][d]] == ["eps_monotone", "large_eps", "stronger_attack",
                                                           "stronger_attack", "gradient_free", "transfer"]
        assert all(c["passed"] in (True, False) for c in rob["checks"][d])
        assert m["accuracy"][d]["whole_model_worst"] == rob["headline"][d]["accuracy"]
    assert set(rob["flagged"]) <= set(rob["defenses"])
    assert set(rob["training_s"]) == {"pgd_at", "uddn_kt_adv"}
    for d in ("pgd_at", "uddn_kt_adv"):  # also in the paper-style tables
        assert set(m["accuracy"][d]) >= {"clean", "white_box", "black_box"}
    report = ctx.storage.read_text(RunLayout.REPORT)
    assert "## Robust defenses: whole-model attacks and gradient-masking checks" in report
    # One row per (defense, eps) of robust.eval_eps (4/255 and 8/255 here).
    assert "| uddn_kt_adv | 4/255 |" in report and "| none | 8/255 |" in report and "gradient_free" in report
