"""Tests for raydefense.report: Wilson intervals, report.md (every table cell, the paper's numbers,
the figures, the timings), the figure files, and Tables 4 and 5 across runs."""
from __future__ import annotations

import json

import pytest

from raydefense.errors import DataError
from raydefense.report import compare_runs, proportion, render_markdown, rewrite_report, run_row, wilson, write_report
from raydefense.report.compare import table4_lines, table5_lines
from raydefense.report.paper import DEFENSE_LABELS, PAPER_TABLE2, PAPER_TABLE3, paper_dataset_key
from raydefense.report.writer import acc_cell
from raydefense.storage import Storage

DEFENSES = ("none", "dae", "pixel_guided", "uddn", "uddn_kt", "jpeg", "dcn", "distillation")
SETS = ("clean", "white_box", "black_box")
ATTACKED = ("none", "uddn", "uddn_kt", "jpeg")


# ----------------------------------------------------------------------------- Wilson


def test_wilson_known_values():
    # Reference values (Brown, Cai & DasGupta 2001; any statistics package).
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 3), (7, 9), (50, 100), (999, 1000)])
def test_wilson_contains_p_and_shrinks_with_n(k, n):
    lo, hi = wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    lo4, hi4 = wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_wilson_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        wilson(3, 2)


def test_proportion():
    rec = proportion([True, False, True, True], method="x")
    assert rec["accuracy"] == 0.75 and rec["n"] == 4 and rec["method"] == "x"
    assert rec["ci95"] == pytest.approx(list(wilson(3, 4)))
    assert proportion([])["n"] == 0 and proportion([])["ci95"] == [0.0, 1.0]


# ----------------------------------------------------------------------------- a metrics dict


def _det(acc, n, **extra):
    return {"accuracy": acc, "n": n, "ci95": list(wilson(round(acc * n), n)), **extra}


def fake_metrics(name="run", target="facenet", source="/data/lfw", *, adaptive=True, table5=None):
    """metrics.json as run_evaluate writes it, with distinct numbers per cell (to find them in the text)."""
    acc, det = {}, {}
    for i, d in enumerate(DEFENSES):
        acc[d], det[d] = {}, {}
        for j, s in enumerate(SETS):
            a = round(0.30 + 0.05 * i + 0.01 * j, 4)
            acc[d][s] = a
            det[d][s] = _det(a, 40 if s == "clean" else 80, **({} if s == "clean" else {"attack_success_rate": 0.1 * j}))
    curves, curve_det = {}, {}
    if adaptive:
        for i, d in enumerate(ATTACKED):
            a = round(0.05 + 0.01 * i, 4)
            acc[d]["adaptive_pgd"] = a
            det[d]["adaptive_pgd"] = _det(a, 32, attack_success_rate=0.9, clean_accuracy_same_rows=0.8,
                                          white_box_accuracy_same_rows=0.2 if d == "none" else 0.5,
                                          pgd_alone_accuracy=0.07)
            acc[d]["autoattack"] = a
            det[d]["autoattack"] = _det(a, 32, attack_success_rate=0.9, worst_case_accuracy=a)
            curves[d] = [[4 / 255, 0.2], [8 / 255, 0.1]]
            curve_det[d] = [_det(0.2, 16, eps=4 / 255), _det(0.1, 16, eps=8 / 255)]
    m = {
        "accuracy": acc, "accuracy_detail": det,
        "l1": {d: {s: 0.0101 + 0.001 * i + 0.0001 * j for j, s in enumerate(SETS)}
               for i, d in enumerate(("none", "dae", "pixel_guided", "uddn"))},
        "by_epsilon": {d: [[0.0, 0.8], [8 / 255, 0.4]] for d in DEFENSES},
        "by_epsilon_black_box": {d: [[0.0, 0.8], [8 / 255, 0.6]] for d in DEFENSES},
        "n_images": {"clean": 40, "white_box": 80, "black_box": 80, "by_epsilon": 40},
        "defenses_left_out": {},
        "config": {"name": name, "models": {"target": target, "surrogate": "inception_v3"},
                   "data": {"source": source}, "eval": {"adaptive_steps": 10}},
        "data": {"source": source, "num_classes": 10, "image_size": 80, "split_counts": {"test": 40}},
        "models": {"target": {"kind": "classifier", "arch": target, "parameters": 1234, "metrics": {"val_acc": 0.9}}},
        "timings_s": {"prepare": 1.5, "models": 20.25, "evaluate": 30.0},
        "eval_timings_s": {"tables 1-3 and figure 7": 12.0, "whole-model attacks": 18.0},
    }
    if adaptive:
        m.update(adaptive=curves, adaptive_detail=curve_det,
                 adaptive_setup={"defenses": list(ATTACKED), "images": 16, "rows": 32, "pgd_steps": 10,
                                 "pgd_restarts": 1, "apgd_steps": 50})
    if table5 is not None:
        m["table5"] = table5
    return m


FIGURES = ["figure6_denoising.png", "figure7_accuracy_vs_eps.png", "adaptive_pgd.png"]


def test_report_has_every_table_cell():
    m = fake_metrics()
    text = render_markdown(m, FIGURES)
    for d in DEFENSES:
        assert f"| {DEFENSE_LABELS[d]} |" in text, d
        for s in SETS:
            assert acc_cell(m["accuracy_detail"][d][s]) in text, (d, s)
    for d, row in m["l1"].items():
        for s in SETS:
            assert f"{row[s]:.4f}" in text, (d, s)
    for d in ATTACKED:
        assert acc_cell(m["accuracy_detail"][d]["adaptive_pgd"]) in text
        for r in m["adaptive_detail"][d]:
            assert acc_cell(r) in text
    for heading in ("Table 1", "Tables 2 and 3", "Table 2", "Table 3", "Attack success rates", "Attacks on the whole defended model",
                    "What this means for a user", "Timings", "What was run", "Full resolved config"):
        assert heading in text, heading
    for f in FIGURES:
        assert f"]({f})" in text


def test_report_sets_the_papers_numbers_beside_ours():
    text = render_markdown(fake_metrics(), FIGURES)
    for table in (PAPER_TABLE2, PAPER_TABLE3):
        for row in table.values():
            for v in row.values():
                assert f"{100 * v:.1f}%" in text
    assert "0.0167" in text  # Table 1, UDDN white-box
    table3 = text[text.index("### Table 3"):text.index("### Attack success")]
    assert "| pixel-guided | " in table3 and "83.3%" in table3  # the paper's Table 3 row, not Table 2's


def test_report_timings_and_plain_reading():
    m = fake_metrics()
    text = render_markdown(m, FIGURES)
    assert "| models | 20.2 |" in text or "| models | 20.3 |" in text
    assert f"| **total** | {sum(m['timings_s'].values()):.1f} |" in text
    assert "| whole-model attacks | 18.0 |" in text
    # UDDN + KT: 50% paper-style (no defense 20%) vs 7% whole-model on the same rows: the gains rest on ignorance.
    assert "rest largely on the attacker not knowing the defense" in text
    assert "HGD" in text
    # A defense that does not even beat no defense under the paper's attack is called out as such.
    m["accuracy_detail"]["uddn_kt"]["adaptive_pgd"]["white_box_accuracy_same_rows"] = 0.2
    assert "does not beat the undefended model" in render_markdown(m, FIGURES)


def test_report_without_whole_model_attacks():
    text = render_markdown(fake_metrics(adaptive=False), FIGURES[:2])
    assert "Attacks on the whole defended model" not in text and "Table 3" in text


def test_write_report_files(tmp_path):
    from PIL import Image

    storage = Storage.open(str(tmp_path))
    import numpy as np

    rng = np.random.default_rng(0)
    clean = rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    examples = {"clean": clean, "adv": clean // 2, "denoised": clean, "eps": np.array([0.01, 0.02]),
                "method": np.array(["fgsm", "ifgsm4"])}
    m = fake_metrics()
    write_report(storage, m, examples)
    for f in FIGURES:
        with Image.open(tmp_path / "report" / f) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["figures"] == FIGURES
    assert (tmp_path / "report" / "report.md").read_text() == render_markdown(saved, FIGURES)
    # rewrite_report keeps the figures and adds what is new (e.g. Table 5 after the child runs).
    saved["table5"] = [run_row(fake_metrics(), run="run")]
    rewrite_report(storage, saved)
    assert "Table 5" in (tmp_path / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------- Tables 4 and 5


def test_run_row_pairs_defended_with_no_defense():
    m = fake_metrics()
    row = run_row(m, run="r")
    assert row["defense"] == "uddn_kt" and row["model"] == "facenet" and row["dataset"] == "/data/lfw"
    assert row["white_box"] == m["accuracy_detail"]["uddn_kt"]["white_box"]
    assert row["white_box_na"] == m["accuracy_detail"]["none"]["white_box"]
    assert row["adaptive_pgd"] == m["accuracy_detail"]["uddn_kt"]["adaptive_pgd"]
    del m["accuracy_detail"]["uddn_kt"]
    assert run_row(m, run="r")["defense"] == "uddn"  # knowledge transfer off: the UDDN alone
    with pytest.raises(DataError, match="run 'bare'"):
        run_row({"accuracy_detail": {"none": {}}}, run="bare")


def test_table5_lines_with_paper_numbers():
    rows = [run_row(fake_metrics(target=t), run=f"r-{t}") for t in ("facenet", "mobilenet_v2", "small_cnn")]
    text = "\n".join(table5_lines(rows))
    assert "61.2% / 22.3%" in text and "60.5% / 21.1%" in text  # the paper's FaceNet and MobileNet rows
    assert "| `small_cnn` | `r-small_cnn` |" in text
    ours = rows[0]
    cell = f"{100 * ours['white_box']['accuracy']:.1f}%"
    assert cell in text and f"n={ours['white_box']['n']}" in text


def test_table4_lines_match_the_papers_datasets():
    assert paper_dataset_key("s3://bucket/faces/lfw_funneled") == "lfw"
    assert paper_dataset_key("/data/YouTubeFaces") == "ytf"
    assert paper_dataset_key("synthetic") is None
    rows = [run_row(fake_metrics(source=s), run=n) for n, s in (("a", "/d/lfw"), ("b", "/d/ytf"), ("c", "synthetic"))]
    text = "\n".join(table4_lines(rows))
    assert "61.2% / 22.3%" in text and "60.3% / 22.3%" in text
    assert "| `synthetic` | `c` |" in text


def test_compare_runs_writes_tables(tmp_path):
    storage = Storage.open(str(tmp_path))
    for name, target, source in (("lfw", "facenet", "/d/lfw"), ("ytf", "facenet", "/d/ytf"),
                                 ("mob", "mobilenet_v2", "/d/lfw")):
        storage.child(name).write_json("report/metrics.json", fake_metrics(name, target, source))
    out = compare_runs(storage, ["lfw", "ytf", "mob"], out="t")
    assert out["tables"] == ["table4", "table5"]
    text = (tmp_path / "comparisons" / "t" / "report.md").read_text()
    assert "## Table 4" in text and "## Table 5" in text
    saved = json.loads((tmp_path / "comparisons" / "t" / "comparison.json").read_text())
    assert [r["run"] for r in saved["rows"]] == ["lfw", "ytf", "mob"]
    # Only targets differ: Table 5 alone.
    assert compare_runs(storage, ["lfw", "mob"])["tables"] == ["table5"]
    with pytest.raises(DataError, match="run 'nope'"):
        compare_runs(storage, ["lfw", "nope"])
    with pytest.raises(DataError, match="at least one run"):
        compare_runs(storage, [])


def test_plain_reading_flags_a_weak_pgd():
    m = fake_metrics()
    text = render_markdown(m, FIGURES)
    assert "The APGD check goes lower" not in text  # fake: APGD == PGD
    m["accuracy_detail"]["uddn_kt"]["autoattack"]["accuracy"] = 0.01
    assert "The APGD check goes lower (1.0%" in render_markdown(m, FIGURES)
