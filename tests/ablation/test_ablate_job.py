"""``jobs/ablate.py`` as a user runs it: bad input (no Ray), and a tiny ablation on a local Ray
that grows by a seed and a variant and is then run a third time with nothing left to do."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from raydefense.ablation.variants import build_plan, run_config
from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.jobs_impl import ablate_main
from tests.conftest import REPO


def test_unknown_variant_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "jobs/ablate.py", "--config", "configs/smoke.yaml", "--storage",
                          str(tmp_path), "--variants", "full,nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: --variants 'nope': unknown variant (known: full, none, no_kt")
    assert not (tmp_path / "smoke-ablation").exists()


def test_a_changed_setting_names_the_run_and_key_before_ray_starts(tmp_path):
    cfg = load_config(f"{REPO}/configs/smoke.yaml", ["distill.lam=0.5"])
    plan = build_plan(cfg, seeds=1, variants=["no_gnr"])
    run = tmp_path / "abl" / "s0-full"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(run_config(cfg, plan.run("full"), 0).to_yaml())
    changed = r"run 's0-full' already exists at .* with a different config \(distill.lam\)"
    with pytest.raises(ConfigError, match=changed):
        ablate_main(["--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "abl",
                     "--variants", "no_gnr", "--seeds", "1"])
    assert not (tmp_path / "abl" / "s0-base").exists()


def test_a_pipeline_run_is_not_an_ablation(tmp_path):
    (tmp_path / "myrun").mkdir()
    (tmp_path / "myrun" / "config.yaml").write_text("name: myrun\n")
    with pytest.raises(ConfigError, match="is a pipeline run, not an ablation"):
        ablate_main(["--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--name", "myrun"])
    with pytest.raises(ConfigError, match="--concurrency -1"):
        ablate_main(["--config", "configs/smoke.yaml", "--storage", str(tmp_path), "--concurrency", "-1"])


# ----------------------------------------------------------------------------- a real ablation


TINY = ["--config", "configs/smoke.yaml", "--name", "abl",
        # 3 identities, one epoch per training after the target's: the smallest ablation with every kind of run
        # (the base, the full run, a run sharing three stages, a run borrowing the full run's UDDN and teacher).
        "--set", "data.num_identities=3", "--set", "models.target_train.epochs=3",
        "--set", "models.surrogate_train.epochs=1", "--set", "denoise.epochs=1",
        "--set", "distill.teacher.epochs=1", "--set", "distill.student.epochs=1",
        "--set", "eval.adaptive_max_images=4", "--set", "eval.adaptive_steps=2", "--set", "eval.autoattack_steps=2",
        "--set", "eval.by_epsilon=[0.0, 0.03]", "--set", "eval.adaptive_eps=[0.03]"]
FIRST = ["--seeds", "1", "--variants", "full,none,no_kt,no_gnr"]
GROWN = ["--seeds", "2", "--variants", "full,none,no_kt,no_gnr,kt_lam0.5_T2", "--concurrency", "2"]


def _ablate(tmp_path, extra):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "jobs/ablate.py", *TINY, *extra, "--storage", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, time.perf_counter() - t0


def _metrics(run):
    return json.loads((run / "report" / "metrics.json").read_text())


def _span(run):
    """When a run worked: from its first own stage's start to its last stage's end (markers)."""
    marks = [json.loads(p.read_text()) for p in (run / "stages").glob("*.json")]
    return min(m["finished_at"] - m["duration_s"] for m in marks), max(m["finished_at"] for m in marks)


@pytest.mark.slow
@pytest.mark.long
def test_ablation_runs_grows_and_resumes_without_training_again(tmp_path):
    root = tmp_path / "abl"
    first, t_first = _ablate(tmp_path, FIRST)
    assert "3 runs, 3 to do" in first.stdout and "1 run at a time" in first.stdout
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["s0-base", "s0-full", "s0-no_gnr"]
    # The variant runs read the base run's data and models; nothing was copied.
    for run in ("s0-full", "s0-no_gnr"):
        assert not list((root / run / "data").glob("*")), run  # KT denoises in its training worker: no data of its own
        assert not (root / run / "models" / "target.pt").exists()
        assert (root / run / "report" / "report.md").exists()
    assert not (root / "s0-no_gnr" / "stages" / "prepare.json").exists()  # read from s0-base
    assert json.loads((root / "s0-no_gnr" / "stages" / "gnr.json").read_text())["outputs"] == {"generated": 0}
    # Same target, same test sets: the undefended rows agree across runs of a seed.
    full, no_gnr = _metrics(root / "s0-full"), _metrics(root / "s0-no_gnr")
    three = ("clean", "white_box", "black_box")
    assert [full["accuracy"]["none"][k] for k in three] == [no_gnr["accuracy"]["none"][k] for k in three]
    # The full run attacks its three reported rows as whole models, the others only their own.
    assert all("adaptive_pgd" in full["accuracy"][d] for d in ("uddn_kt", "uddn", "none"))
    assert "adaptive_pgd" not in no_gnr["accuracy"]["none"] and "adaptive_pgd" in no_gnr["accuracy"]["uddn_kt"]
    one = json.loads((root / "ablation.json").read_text())
    assert one["seeds"] == [0] and one["variants"]["full"]["summary"]["clean"]["degenerate"]
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("s0-*/models/*.pt")}
    stamps.update({p: p.stat().st_mtime_ns for p in root.glob("s0-*/stages/*.json")})
    assert len(stamps) >= 3 + 3 + 2 + 4 + 4 + 4  # base: target, surrogate, generator; ...; markers

    grown, t_grown = _ablate(tmp_path, GROWN)
    assert "8 runs, 5 to do" in grown.stdout and "2 runs at a time" in grown.stdout
    for p, ns in stamps.items():  # seed 0's runs were kept as they were
        assert p.stat().st_mtime_ns == ns, p
    # Two runs went at once: seed 1's base started beside seed 0's KT run.
    (a0, a1), (b0, b1) = _span(root / "s1-base"), _span(root / "s0-kt_lam0.5_T2")
    assert a0 < b1 and b0 < a1
    for seed in (0, 1):
        kt, full = _metrics(root / f"s{seed}-kt_lam0.5_T2"), _metrics(root / f"s{seed}-full")
        # The KT run evaluates the full run's UDDN (borrowed, not retrained) with its own student.
        for row in ("none", "uddn"):
            assert {k: kt["accuracy"][row][k] for k in ("clean", "white_box", "black_box")} == \
                   {k: full["accuracy"][row][k] for k in ("clean", "white_box", "black_box")}
        assert kt["config"]["distill"]["lam"] == 0.5 and kt["config"]["distill"]["T"] == 2.0
        assert sorted(p.name for p in (root / f"s{seed}-kt_lam0.5_T2" / "models").iterdir()) == ["student.pt"]
    result = json.loads((root / "ablation.json").read_text())
    assert result["seeds"] == [0, 1] and result["full"] == "full"
    assert result["order"] == ["full", "none", "no_kt", "no_gnr", "kt_lam0.5_T2"]
    assert result["metrics"] == ["clean", "white_box", "black_box", "whole_model"]
    for name, v in result["variants"].items():
        assert set(v["per_seed"]) == {"0", "1"}
        for m in result["metrics"]:
            s = v["summary"][m]
            assert s is not None, (name, m)
            assert s["n"] == 2 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
            assert s["mean"] == pytest.approx(sum(v["per_seed"][k][m] for k in ("0", "1")) / 2)
            if name == "full":
                assert v["vs_full"] is None
            else:
                d = v["vs_full"][m]
                assert d["n"] == 2 and d["differences"] == pytest.approx(
                    [v["per_seed"][k][m] - result["variants"]["full"]["per_seed"][k][m] for k in ("0", "1")])
    assert result["variants"]["none"]["run"] == "full" and result["variants"]["no_kt"]["defense"] == "uddn"
    md = (root / "ablation.md").read_text()
    for text in ("# Ablation 'abl'", "| variant | what differs from the full defense | clean | white-box | black-box "
                 "| whole-model |", "## Paired differences against the full defense", "| kt_lam0.5_T2 |",
                 "t(0.975, 1) = 12.71", "![ablation](ablation.png)"):
        assert text in md
    from PIL import Image

    with Image.open(root / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 800

    again, t_again = _ablate(tmp_path, GROWN)
    assert "8 runs, 0 to do" in again.stdout and "every run finished earlier" in again.stdout
    assert "at a time" not in again.stdout  # Ray was not started
    assert json.loads((root / "ablation.json").read_text()) == result
    print(f"ablation: {t_first:.0f} s (1 seed, 3 runs), {t_grown:.0f} s (5 more runs, 2 at a time), "
          f"{t_again:.0f} s (nothing to do)")
