"""The ablation's statistics over seeds, its markdown and its plot, on known inputs (no Ray)."""
from __future__ import annotations

import io
import json
import math

import pytest

from raydefense.ablation.summary import METRICS, console_table, render_markdown, row_values, summarize

T2 = 4.302653  # t(0.975, 2), from tables


def metrics_row(clean, white, black, worst=None, pgd=None):
    acc = {"clean": clean, "white_box": white, "black_box": black}
    detail = {}
    if pgd is not None:
        acc["adaptive_pgd"] = pgd
    if worst is not None:
        acc["autoattack"] = 0.15
        detail["autoattack"] = {"worst_case_accuracy": worst}
    return acc, detail


def test_row_values_take_the_worst_case_whole_model_accuracy():
    acc, detail = metrics_row(0.9, 0.6, 0.8, worst=0.1, pgd=0.2)
    m = {"accuracy": {"uddn_kt": acc, "none": {"clean": 0.9, "white_box": 0.2, "black_box": 0.8}},
         "accuracy_detail": {"uddn_kt": detail}}
    v = row_values(m, "uddn_kt")
    assert v == {"clean": 0.9, "white_box": 0.6, "black_box": 0.8, "whole_model": 0.1, "adaptive_pgd": 0.2,
                 "autoattack": 0.15}
    assert row_values(m, "none")["whole_model"] is None  # not attacked as a whole model in that run
    # autoattack off: PGD's number stands
    m["accuracy"]["uddn_kt"] = {"clean": 0.9, "white_box": 0.6, "black_box": 0.8, "adaptive_pgd": 0.2}
    m["accuracy_detail"]["uddn_kt"] = {}
    assert row_values(m, "uddn_kt")["whole_model"] == 0.2
    with pytest.raises(KeyError, match="no accuracy row 'dae'"):
        row_values(m, "dae")


def _values(clean, white, black, whole):
    return {"clean": clean, "white_box": white, "black_box": black, "whole_model": whole}


def test_intervals_and_paired_differences_by_hand():
    seeds = (0, 1, 2)
    per_seed = {
        "full": {0: _values(0.70, 0.50, 0.9, 0.1), 1: _values(0.80, 0.60, 0.9, 0.1), 2: _values(0.90, 0.70, 0.9, 0.1)},
        "no_kt": {0: _values(0.75, 0.50, 0.9, 0.1), 1: _values(0.90, 0.60, 0.9, 0.1), 2: _values(0.95, 0.70, 0.9, 0.1)},
    }
    out = summarize(per_seed, seeds=seeds)
    full = out["full"]["summary"]["clean"]
    # mean 0.8, sd 0.1: half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248414
    assert full["mean"] == pytest.approx(0.8) and full["n"] == 3 and full["sd"] == pytest.approx(0.1)
    assert full["ci95"] == pytest.approx([0.8 - 0.248414, 0.8 + 0.248414], abs=1e-6)
    assert full["t"] == pytest.approx(T2, abs=1e-6)
    assert out["full"]["vs_full"] is None
    d = out["no_kt"]["vs_full"]["clean"]
    # differences 0.05, 0.10, 0.05: mean 0.0667, sd 0.028868, t = 4 -> p = 1 - 4 / sqrt(18) (df = 2)
    assert d["differences"] == pytest.approx([0.05, 0.10, 0.05])
    assert d["mean"] == pytest.approx(0.2 / 3) and d["n"] == 3
    half = T2 * 0.0288675 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.2 / 3 - half, 0.2 / 3 + half], abs=1e-6)
    assert d["p_value"] == pytest.approx(1 - 4 / math.sqrt(18), rel=1e-6)
    same = out["no_kt"]["vs_full"]["white_box"]  # identical per seed: difference 0, p = 1
    assert same["mean"] == pytest.approx(0) and same["p_value"] == 1.0
    assert out["no_kt"]["summary"]["black_box"]["ci95"] == pytest.approx([0.9, 0.9])  # no spread
    json.dumps(out)


def test_a_metric_missing_in_a_seed_is_reported_not_averaged():
    seeds = (0, 1)
    per_seed = {"full": {0: _values(0.8, 0.6, 0.9, 0.1), 1: _values(0.8, 0.7, 0.9, 0.2)},
                "none": {0: _values(0.8, 0.2, 0.9, None), 1: _values(0.8, 0.3, 0.9, 0.0)}}
    out = summarize(per_seed, seeds=seeds)
    assert out["none"]["summary"]["whole_model"] is None and out["none"]["vs_full"]["whole_model"] is None
    assert out["none"]["missing"] == {"whole_model": [0]}
    assert out["none"]["vs_full"]["white_box"]["mean"] == pytest.approx(-0.4)
    one = summarize({"full": {3: _values(0.8, 0.6, 0.9, 0.1)}}, seeds=(3,))
    assert one["full"]["summary"]["clean"]["degenerate"]


def result_for(per_seed, seeds, order):
    stats = summarize(per_seed, seeds=seeds)
    return {
        "name": "abl", "root": "/runs/abl", "seeds": list(seeds), "order": order, "full": "full",
        "variants": {v: {"changes": f"changes of {v}", "run": "full", "defense": "uddn_kt",
                         "per_seed": {str(s): per_seed[v][s] for s in seeds}, **stats[v]} for v in order},
        "black_box_informative": {str(s): s != 1 for s in seeds}, "notes": ["a note"],
    }


@pytest.fixture()
def result():
    seeds = (0, 1, 2)
    per_seed = {
        "full": {s: _values(0.9, 0.7 + 0.05 * s, 0.88, 0.05) for s in seeds},
        "no_gnr": {s: _values(0.9, 0.6 + 0.04 * s, 0.88, 0.0) for s in seeds},
        "none": {s: _values(0.92, 0.2, 0.9, None if s == 2 else 0.0) for s in seeds},
    }
    return result_for(per_seed, seeds, ["full", "no_gnr", "none"])


def test_markdown_has_both_tables_and_says_what_it_shows(result):
    md = render_markdown(result)
    assert md.startswith("# Ablation 'abl'")
    assert "t(0.975, 2) = 4.30" in md
    lines = md.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("| variant | what differs"))
    assert lines[head + 2].startswith("| full | changes of full | 90.0 [90.0, 90.0] | 75.0 [")
    diff = next(i for i, l in enumerate(lines) if l.startswith("## Paired differences"))
    rows = [l for l in lines[diff:] if l.startswith("| no_gnr |")]
    # white-box: 60, 64, 68 vs 70, 75, 80 -> -10, -11, -12: mean -11.0, sd 1: CI -11 +- 4.30 * 1 / sqrt(3)
    assert "| -11.0 [-13.5, -8.5] (p 0.0027) |" in rows[0]
    assert "| none |" in md and "whole-model (seeds 2)" in md
    assert "uninformative for seed(s) 1" in md and "- a note" in md
    assert "![ablation](ablation.png)" in md
    # intervals are cut to [0, 100] for display (the none row's whole-model is missing: '-')
    assert "[-" not in next(l for l in lines if l.startswith("| no_gnr | changes"))


def test_console_table(result):
    text = console_table(result)
    assert "ablation 'abl': 3 seeds" in text
    assert any(l.startswith("no_gnr") and "-11.0 [-13.5, -8.5]" in l for l in text.splitlines())


def test_plot_is_a_png_with_a_panel_per_metric(result):
    from PIL import Image

    from raydefense.ablation.plot import ablation_figure

    png = ablation_figure(result)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] > 4 * 200 and im.size[1] > 200
    assert len(METRICS) == 4
