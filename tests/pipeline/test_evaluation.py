"""The evaluate stage on a tiny finished run built in tmp (no pipeline run): every table cell and
figure, whole-model attacks never above clean accuracy and never weaker than the pre-generated
white-box attack on the same images, JPEG under BPDA through the real codec, EOT for randomised
defenses, and the multi-run helpers (Table 5, re-evaluation).

The run is made directly: synthetic faces as Parquet (Ray Data), a quickly trained small_cnn
target and surrogate, tiny UDDN/DAE artifacts, the real attack actor for the white- and
black-box test sets, stage markers. One local Ray serves the module.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.pipeline.artifacts import load_artifact, save_artifact
from raydefense.pipeline.run import open_run
from raydefense.storage import Storage
from tests.conftest import REPO

DEFENSES = ("none", "dae", "pixel_guided", "uddn", "uddn_kt", "jpeg", "dcn", "distillation")
ATTACKED = ("none", "uddn", "uddn_kt", "jpeg")
SETS = ("clean", "white_box", "black_box")
N_ID, PER_ID, TEST_PER_ID, SIZE = 3, 10, 3, 32

OVERRIDES = [
    "name=tiny", f"data.num_identities={N_ID}", f"data.images_per_identity={PER_ID}", f"data.image_size={SIZE}",
    "data.splits={gnr: 3, denoise: 4, val: 0, test: 3}",
    "eval.batch_size=64", "eval.adaptive_eps=[0.0313725490]", "eval.adaptive_steps=5",
    "eval.adaptive_max_images=100", "eval.autoattack_steps=5", "eval.by_epsilon=[0.0, 0.0313725490]",
    "eval.figure_examples=2", "scale.object_store_memory_mb=256",
]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _write_parquet(storage: Storage, rel: str, columns: dict[str, np.ndarray]) -> None:
    """One Parquet file with image columns as Ray Data tensors, as the pipeline's stages write them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    arrays = {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in columns.items()}
    buf = io.BytesIO()
    pq.write_table(pa.table(arrays), buf)
    storage.write_bytes(rel, buf.getvalue())


def build_tiny_run(root: Path):
    """A finished run (every training stage marked done) under ``root/tiny``; returns its RunContext."""
    from raydefense.data import render_identity_images
    from raydefense.denoise import DAE, UDDN
    from raydefense.models import create_model
    from raydefense.pipeline.attack import AttackActor

    cfg = load_config(Path(REPO) / "configs" / "smoke.yaml", [f"storage.path={root}", *OVERRIDES])
    ctx = open_run(cfg, Storage.open(str(root)))
    ctx.echo = lambda line: None
    images = np.concatenate([render_identity_images(i, list(range(PER_ID)), image_size=SIZE, seed=0)
                             for i in range(N_ID)])
    labels = np.repeat(np.arange(N_ID), PER_ID)
    split = np.where(np.arange(len(labels)) % PER_ID >= PER_ID - TEST_PER_ID, "test", "gnr")
    _write_parquet(ctx.storage, "data/clean/part-0.parquet",
                   {"image": images, "label": labels.astype(np.int64), "split": split, "index": np.arange(len(labels))})
    ctx.storage.write_json("data/meta.json", {
        "source": "synthetic", "image_size": SIZE, "classes": [f"id{i}" for i in range(N_ID)], "num_classes": N_ID,
        "skipped_identities": [], "split_counts": {"gnr": int((split == "gnr").sum()), "test": int((split == "test").sum())},
        "shortfalls": []})

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    y = torch.as_tensor(labels)
    train = torch.as_tensor(split == "gnr")
    spec = {"kind": "classifier", "arch": "small_cnn", "num_classes": N_ID}
    conf = cfg.to_dict()
    target = _train(create_model("small_cnn", num_classes=N_ID), x[train], y[train], steps=40, seed=0)
    surrogate = _train(create_model("small_cnn", num_classes=N_ID), x[train], y[train], steps=25, seed=1)
    for name, model in (("target", target), ("surrogate", surrogate), ("student", target), ("dcn", surrogate),
                        ("distillation", target)):
        save_artifact(ctx.storage, name, model, spec, config=conf)
    widths = [4, 8, 8, 8, 8]
    for k, (name, cls) in enumerate((("uddn", UDDN), ("pixel_guided", UDDN), ("dae", DAE))):
        torch.manual_seed(10 + k)
        net = cls(widths=widths)
        head = net.to_image if cls is DAE else net.to_noise  # the DAE reconstructs, the UDDN predicts noise
        nn.init.normal_(head.weight, std=0.02)  # not a constant, so Table 1 has something to show
        save_artifact(ctx.storage, name, net.eval(), {"kind": "denoiser", "arch": "dae" if cls is DAE else "uddn",
                                                      "widths": widths}, config=conf)

    test = np.flatnonzero(split == "test")
    actor = AttackActor(storage=ctx.storage, plan={"test": [("test_white", "target", ["fgsm", "ifgsm4"]),
                                                            ("test_black", "surrogate", ["fgsm", "ifgsm4"])]},
                        seed=cfg.attack.seed, eps_min=cfg.attack.eps_min, eps_max=cfg.attack.eps_max, gpu=False)
    rows = actor({"image": images[test], "label": labels[test], "index": test, "split": split[test]})
    for name in np.unique(rows["set"]):
        keep = rows["set"] == name
        _write_parquet(ctx.storage, f"data/adv/set={name}/part-0.parquet",
                       {k: v[keep] for k, v in rows.items() if k != "set"})
    for stage in ("prepare", "models", "attack", "gnr", "denoise", "distill", "baselines"):
        ctx.mark_done(stage, duration_s=1.0)
        ctx.timings[stage] = 1.0
    return ctx


@pytest.fixture(scope="module")
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, local_ray):
    """(ctx, metrics) of the tiny run after the evaluate stage."""
    from raydefense.pipeline.evaluate import run_evaluate

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    ctx = build_tiny_run(root)
    run_evaluate(ctx, gpu=False)
    return ctx, ctx.storage.read_json("report/metrics.json")


def _test_white_rows(ctx) -> dict[str, np.ndarray]:
    import pyarrow.dataset as pads

    table = pads.dataset(ctx.storage.path("data/adv/set=test_white"), filesystem=ctx.storage.fs,
                         format="parquet").to_table()
    rows = table.to_pydict()
    out = {k: np.asarray(v) for k, v in rows.items() if k not in ("clean", "adv")}
    for k in ("clean", "adv"):
        out[k] = np.stack([np.asarray(v, dtype=np.uint8) for v in rows[k]])
    return out


# ----------------------------------------------------------------------------- every cell, every figure


def test_every_table_cell_and_figure_exists(tiny):
    ctx, m = tiny
    n_test = N_ID * TEST_PER_ID
    assert set(m["accuracy"]) == set(DEFENSES)
    for d in DEFENSES:
        for s in SETS:
            det = m["accuracy_detail"][d][s]
            assert det["n"] == (n_test if s == "clean" else 2 * n_test)
            assert det["ci95"][0] <= m["accuracy"][d][s] == det["accuracy"] <= det["ci95"][1]
            if s != "clean":
                assert 0 <= det["attack_success_rate"] <= 1
        assert [e for e, _ in m["by_epsilon"][d]] == pytest.approx([0.0, 8 / 255])
        assert [r["n"] for r in m["by_epsilon_detail"]["black_box"][d]] == [n_test, n_test]
    for d in ("none", "dae", "pixel_guided", "uddn"):
        assert set(m["l1"][d]) == set(SETS)
    assert m["l1"]["none"]["clean"] == 0 and m["l1"]["uddn"]["clean"] > 0
    for d in ATTACKED:
        for s in ("adaptive_pgd", "autoattack"):
            det = m["accuracy_detail"][d][s]
            assert det["n"] == 2 * n_test and det["images"] == n_test
            assert det["ci95"][0] <= m["accuracy"][d][s] <= det["ci95"][1]
        assert [r["n"] for r in m["adaptive_detail"][d]] == [n_test]
    for key in ("config", "data", "models", "timings_s", "eval_timings_s", "figures"):
        assert m[key]
    check = m["black_box_check"]
    assert check["no_defense_drop"] == pytest.approx(m["accuracy"]["none"]["clean"] - m["accuracy"]["none"]["black_box"])
    assert check["informative"] == (check["no_defense_drop"] >= check["min_drop"])
    report = ctx.storage.read_text("report/report.md")
    assert "Black-box column" in report
    for heading in ("Table 1", "Tables 2 and 3", "Table 2", "Table 3", "Attacks on the whole defended model", "Timings"):
        assert heading in report
    from PIL import Image

    for f in ("figure6_denoising.png", "figure7_accuracy_vs_eps.png", "adaptive_pgd.png"):
        assert f in m["figures"] and f"]({f})" in report
        with Image.open(io.BytesIO(ctx.storage.read_bytes(f"report/{f}"))) as im:
            assert im.size[0] > 200 and im.size[1] > 100


def test_intervals_resample_images_and_each_defense_gets_paired_tests(tiny):
    """White-/black-box rows are (image, method) pairs: their intervals are over images, and each
    defense is compared with no defense and UDDN + KT on the same rows (report/significance.py)."""
    ctx, m = tiny
    n_test = N_ID * TEST_PER_ID
    for d in DEFENSES:
        assert "n_images" not in m["accuracy_detail"][d]["clean"]
        for s in ("white_box", "black_box"):
            det = m["accuracy_detail"][d][s]
            assert det["n_images"] == n_test and det["n"] == 2 * n_test
            assert det["ci95_method"] and det["ci95"][0] <= det["accuracy"] <= det["ci95"][1]
            assert len(det["ci95_rows_independent"]) == 2
    for s in SETS:
        pairs = m["paired_tests"][s]
        seen = {(p["defense"], p["vs"]) for p in pairs}
        assert {(d, "none") for d in DEFENSES if d != "none"} <= seen
        assert {(d, "uddn_kt") for d in DEFENSES if d not in ("none", "uddn_kt")} <= seen
        for p in pairs:
            assert p["test_set"] == s and 0.0 <= p["p_value"] <= 1.0
            diff = m["accuracy"][p["defense"]][s] - m["accuracy"][p["vs"]][s]
            assert p["difference"] == pytest.approx(diff)
            assert p["n_clusters"] == n_test and p["n_rows"] == (n_test if s == "clean" else 2 * n_test)
            if p["a_only"] == p["b_only"] == 0:
                assert p["p_value"] == 1.0 and p["difference"] == 0
    # "student" and "target" are the same weights in this run: identical rows, no difference, p = 1.
    same = [p for p in m["paired_tests"]["white_box"] if {p["defense"], p["vs"]} == {"distillation", "none"}]
    assert same and same[0]["difference"] == 0 and same[0]["p_value"] == 1.0
    report = ctx.storage.read_text("report/report.md")
    assert "Paired tests" in report and "rows / " in report


def test_whole_model_attacks_never_beat_clean_or_lose_to_the_pregenerated_attack(tiny):
    """Deterministic defenses: on the same rows, accuracy under any attack on the whole model is
    <= clean accuracy, and whole-model PGD <= the pre-generated white-box attack."""
    _, m = tiny
    for d in ATTACKED:
        pgd, aa = m["accuracy_detail"][d]["adaptive_pgd"], m["accuracy_detail"][d]["autoattack"]
        assert pgd["eot_samples"] == 1
        assert pgd["accuracy"] <= pgd["clean_accuracy_same_rows"]
        assert aa["accuracy"] <= aa["clean_accuracy_same_rows"]
        assert pgd["accuracy"] <= pgd["white_box_accuracy_same_rows"]
        assert pgd["accuracy"] <= pgd["pgd_alone_accuracy"]
        assert aa["worst_case_accuracy"] <= min(pgd["accuracy"], aa["accuracy"])
        for _, acc in m["adaptive"][d]:
            assert acc <= m["accuracy"][d]["clean"] + 1e-12
    # The attacks do something on this run: the undefended target loses images to them.
    assert m["accuracy"]["none"]["adaptive_pgd"] < m["accuracy"]["none"]["clean"]


def test_same_rows_numbers_agree_with_the_paper_style_tables(tiny):
    """Every test image is in the adaptive subset here, so the whole-model actor's clean and
    pre-generated accuracies (DefendedModel, JPEG through BPDA's forward) must equal Tables 2-3's
    (the evaluation actor, JPEG in 'real' mode): two code paths, one answer."""
    _, m = tiny
    for d in ATTACKED:
        det = m["accuracy_detail"][d]["adaptive_pgd"]
        assert det["clean_accuracy_same_rows"] == pytest.approx(m["accuracy"][d]["clean"])
        assert det["white_box_accuracy_same_rows"] == pytest.approx(m["accuracy"][d]["white_box"])


def test_rows_flags_compose_as_documented(tiny):
    """Per row: robust under whole-model PGD = right on clean, on the pre-generated image and under PGD."""
    from raydefense.pipeline.adaptive import WholeModelActor, summarize_whole_model

    ctx, _ = tiny
    rows = _test_white_rows(ctx)
    defenses = {"none": (None, "target"), "uddn": ("uddn", "target")}
    actor = WholeModelActor(storage=ctx.storage, defenses=defenses, levels=[8 / 255], first_method="fgsm", steps=3,
                            restarts=1, apgd_steps=3, apgd_restarts=1, autoattack=True, eot_samples=5,
                            jpeg_quality=75, gpu=False)
    out = actor(rows)
    import pandas as pd

    df = pd.DataFrame(out)
    for d in defenses:
        clean, pregen, pgd = (df[f"{d}:{k}"].to_numpy(bool) for k in ("clean", "pregen", "pgd"))
        assert not (pgd & ~clean).any()  # attacks run only where the clean image is right
        assert not (df[f"{d}:apgd_dlr"].to_numpy(bool) & ~df[f"{d}:apgd_ce"].to_numpy(bool)).any()
    budget = df["budget"].to_numpy()
    assert (budget >= df["eps"].to_numpy() - 1e-7).all()
    assert (budget <= df["eps"].to_numpy() + 0.5 / 255 + 1e-6).all()  # uint8 rounding only
    summary = summarize_whole_model(df, defenses, levels=[8 / 255], cfg=ctx.cfg, eot={"none": 1, "uddn": 1})
    for d in defenses:
        robust = (df[f"{d}:clean"] & df[f"{d}:pregen"] & df[f"{d}:pgd"]).to_numpy(bool)
        assert summary["accuracy"][d]["adaptive_pgd"] == pytest.approx(robust.mean())


# ----------------------------------------------------------------------------- JPEG through BPDA, EOT


def test_jpeg_under_bpda_runs_the_real_codec(tiny, monkeypatch):
    from PIL import Image

    import raydefense.defenses.jpeg as jpeg_mod
    from raydefense.pipeline.adaptive import WholeModelActor, build_defended_models

    ctx, _ = tiny
    rows = {k: v[:4] for k, v in _test_white_rows(ctx).items()}
    model = build_defended_models(ctx.storage, {"jpeg": ("jpeg", "target")}, jpeg_quality=75, device="cpu")["jpeg"]
    target = load_artifact(ctx.storage, "target")
    x = torch.as_tensor(rows["clean"]).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    # Forward: exactly the classifier on Pillow's JPEG round trip.
    decoded = []
    for img in rows["clean"]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        decoded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    x_jpeg = torch.as_tensor(np.stack(decoded)).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    logits = model(x)
    assert torch.equal(logits, target(x_jpeg))
    # Backward: the identity through the codec (BPDA): d loss / d x = classifier's gradient at jpeg(x).
    y = torch.as_tensor(rows["label"])
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y), x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(target(x_jpeg), y), x_jpeg)
    assert g.abs().sum() > 0 and torch.allclose(g, g_ref)
    # The whole-model attacks call the real codec at every step.
    calls = []
    real = jpeg_mod.jpeg_compress

    def spy(t, *, quality):
        calls.append(t.shape[0])
        return real(t, quality=quality)

    monkeypatch.setattr(jpeg_mod, "jpeg_compress", spy)
    actor = WholeModelActor(storage=ctx.storage, defenses={"jpeg": ("jpeg", "target")}, levels=[], first_method="fgsm",
                            steps=3, restarts=1, apgd_steps=3, apgd_restarts=1, autoattack=True, eot_samples=1,
                            jpeg_quality=75, gpu=False)
    out = actor(rows)
    assert out["jpeg:clean"].any()  # something to attack
    # clean + pre-generated passes, 3 PGD gradients + its check, APGD-CE's start + 3 steps + check
    assert len(calls) >= 2 + 4 + 5


class _Noisy(nn.Module):
    """A randomised preprocessing (tiny Gaussian noise) that declares it, and counts its calls."""

    randomized = True

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (x + 1e-4 * torch.randn_like(x)).clamp(0, 1)


def test_randomised_defenses_get_eot(tiny, monkeypatch):
    import raydefense.pipeline.adaptive as adaptive
    from raydefense.defenses import DefendedModel

    ctx, _ = tiny
    assert adaptive.eot_samples_for(DefendedModel(nn.Identity(), _Noisy()), 7) == 7
    assert adaptive.eot_samples_for(DefendedModel(nn.Identity(), nn.Identity()), 7) == 1
    rows = {k: v[:4] for k, v in _test_white_rows(ctx).items()}
    target = load_artifact(ctx.storage, "target")
    counts = {}
    for eot in (1, 4):
        noisy = _Noisy()
        monkeypatch.setattr(adaptive, "build_defended_models",
                            lambda *a, _n=noisy, **k: {"noisy": DefendedModel(target, _n).eval()})
        actor = adaptive.WholeModelActor(storage=ctx.storage, defenses={"noisy": (None, "target")}, levels=[],
                                         first_method="fgsm", steps=3, restarts=1, apgd_steps=3, apgd_restarts=1,
                                         autoattack=False, eot_samples=eot, jpeg_quality=75, gpu=False)
        assert actor.eot == {"noisy": eot}
        torch.manual_seed(0)
        out = actor(rows)
        counts[eot] = (noisy.calls, int(out["noisy:clean"].sum()))
    assert counts[1][1] == counts[4][1] > 0  # same rows attacked (the noise is far too small to flip a label)
    assert counts[4][0] - 2 >= 3 * (counts[1][0] - 2)  # beyond the 2 plain passes, every gradient averages 4


# ----------------------------------------------------------------------------- console, re-evaluation, Table 5


def test_summary_table(tiny):
    from raydefense.pipeline.evaluate import summary_table

    _, m = tiny
    text = summary_table(m)
    assert "whole-PGD" in text and "APGD" in text
    for d in DEFENSES:
        assert f"\n{d} " in text
    assert f"whole-model attacks {2 * N_ID * TEST_PER_ID} rows" in text


def test_load_run_config_keeps_the_runs_eval_and_applies_overrides(tiny):
    from raydefense.pipeline.runner import load_run_config

    ctx, _ = tiny
    root = str(Path(ctx.storage.root).parent)
    cfg = load_run_config("tiny", storage=root, overrides=["eval.adaptive_steps=9"])
    assert cfg.eval.adaptive_max_images == 100 and cfg.eval.adaptive_steps == 9 and cfg.storage.path == root
    with pytest.raises(ConfigError, match="run 'nope' not found"):
        load_run_config("nope", storage=root)


def test_child_runs_for_table5(tiny, tmp_path):
    from raydefense.pipeline.evaluate import table5_rows
    from raydefense.pipeline.runner import _share_prepared_data, child_config

    ctx, m = tiny
    cfg = ctx.cfg.replace(["models.extra_targets=[vgg16, mobilenet_v2]", "models.target_pretrained=vggface2"])
    child = child_config(cfg, "vgg16")
    assert child.name == "tiny--vgg16" and child.models.target == "vgg16" and child.models.extra_targets == ()
    assert child.models.target_pretrained is None and child.baselines.enabled == () and child.denoise.baselines == ()
    assert child.data == cfg.data and child.attack == cfg.attack and child.distill == cfg.distill
    # The child gets the parent's prepared data, marker last.
    dest = Storage.open(str(tmp_path)).child(child.name)
    _share_prepared_data(ctx, dest)
    assert dest.listdir("data/clean") == ctx.storage.listdir("data/clean")
    for f in ctx.storage.listdir("data/clean"):
        assert dest.read_bytes(f"data/clean/{f}") == ctx.storage.read_bytes(f"data/clean/{f}")
    assert dest.read_json("stages/prepare.json")["outputs"]["shared_from"] == "tiny"
    # Table 5: the parent's row, then each finished child's.
    root = Storage.open(str(tmp_path))
    root.child("tiny--vgg16").write_json("report/metrics.json", {**m, "config": {**m["config"], "models": {
        **m["config"]["models"], "target": "vgg16"}}})
    rows = table5_rows(cfg, m, root)
    assert [r["run"] for r in rows] == ["tiny", "tiny--vgg16"]  # mobilenet_v2 has not finished: left out
    assert [r["model"] for r in rows] == ["small_cnn", "vgg16"]


@pytest.mark.parametrize("driver_read", [True, False], ids=["driver-read", "read_parquet"])
def test_layout_reads_show_no_footer_sampling_bar(tmp_path, local_ray, capfd, monkeypatch, driver_read):
    """A real RunLayout.read on Ray, small enough to be read by the driver or not: every row comes
    back, Ray Data's V1 footer-sampling bar ("Parquet dataset sampling") does not reach the
    console, and the dataset's own execution keeps its progress bars on."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raydefense.pipeline.run import RunLayout
    from raydefense.storage import Storage

    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", True)
    if not driver_read:
        monkeypatch.setattr(RunLayout, "DRIVER_READ_MAX_BYTES", 0)
    st = Storage.open(str(tmp_path))
    folder = st.path(RunLayout.CLEAN)
    st.fs.create_dir(folder, recursive=True)
    for k in range(2):
        pq.write_table(pa.table({"index": list(range(5 * k, 5 * k + 5))}), f"{folder}/part-{k}.parquet", filesystem=st.fs)
    capfd.readouterr()
    ds = RunLayout(st).read(RunLayout.CLEAN)
    read_output = capfd.readouterr()
    assert "dataset sampling" not in read_output.err + read_output.out
    assert ds.context.enable_progress_bars and ray.data.DataContext.get_current().enable_progress_bars
    assert sorted(r["index"] for r in ds.take_all()) == list(range(10))


def test_small_datasets_are_read_by_the_driver_as_read_parquet_reads_them(tmp_path, local_ray, monkeypatch):
    """A dataset written as the attack stage writes its sets (Ray Data, image tensors, Hive
    ``set=`` folders) reads the same through both paths of RunLayout.read: same schema, same rows
    in the same order; under the size limit no read_parquet call is made and each file is a
    block, over it read_parquet reads."""
    import ray

    from raydefense.pipeline.run import RunLayout
    from raydefense.storage import Storage

    st = Storage.open(str(tmp_path))
    layout = RunLayout(st)
    rng = np.random.default_rng(0)
    n = 24
    rows = {"clean": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
            "adv": rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
            "label": np.arange(n) % 5, "index": np.arange(n),
            "set": np.array(["train", "val_white", "test_white"] * (n // 3))}
    layout.write_dataset(RunLayout.ADV, ray.data.from_numpy(rows["clean"]).zip(ray.data.from_items(
        [{k: rows[k][i] for k in ("adv", "label", "index", "set")} for i in range(n)])).rename_columns(
        {"data": "clean"}).repartition(4), partition_cols=["set"])

    calls = []
    real_read_parquet = ray.data.read_parquet
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: calls.append(a) or real_read_parquet(*a, **k))

    def read_both(read):
        monkeypatch.setattr(RunLayout, "DRIVER_READ_MAX_BYTES", 128 * 2**20)
        small = read()
        assert calls == []
        monkeypatch.setattr(RunLayout, "DRIVER_READ_MAX_BYTES", 0)
        large = read()
        assert len(calls) == 1
        calls.clear()
        return small, large

    for read in (lambda: layout.read(RunLayout.ADV), lambda: layout.read_adv("train", ["clean", "adv", "label"]),
                 lambda: layout.read_adv_sets(["val_white", "test_white"]),
                 # The filter's column left out of the columns read (as read_clean(split, [image, label])).
                 lambda: layout.read_adv_sets(["test_white"], ["adv", "label"])):
        small, large = read_both(read)
        assert small.schema() == large.schema()
        got, want = small.take_all(), large.take_all()
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    # One block per file (read_parquet groups small files into fewer read tasks' blocks).
    monkeypatch.setattr(RunLayout, "DRIVER_READ_MAX_BYTES", 128 * 2**20)
    assert layout.read(RunLayout.ADV).materialize().num_blocks() == len(list((tmp_path / RunLayout.ADV).rglob("*.parquet")))
