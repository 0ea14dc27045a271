"""The defense search: space, objective, Optuna record, concurrency, and a real search
(killed mid-way and resumed) on a local Ray.

The fast tests need no Ray cluster. The slow one runs ``jobs/tune_defense.py`` twice in a
subprocess, as a user would, on the smoke preset shrunk to 3 identities.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.storage import Storage
from raydefense.tune.space import (apply_params, build_knobs, default_knobs, objective, overrides_for, param_space,
                                   parse_knob, resolve_metric)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cfg():
    return load_config(os.path.join(REPO, "configs", "smoke.yaml"))


# ----------------------------------------------------------------------------- the space


def test_default_space_follows_the_tune_section(cfg):
    knobs = {k.name: k for k in default_knobs(cfg)}
    assert set(knobs) == {"lam", "T", "guidance", "denoise_lr"}
    assert (knobs["lam"].key, knobs["lam"].kind, knobs["lam"].values) == ("distill.lam", "loguniform", cfg.tune.lam)
    assert (knobs["T"].key, knobs["T"].kind) == ("distill.T", "loguniform")
    assert knobs["guidance"].values == ("logits", "features")
    assert knobs["denoise_lr"].key == "denoise.lr"
    space = param_space(list(knobs.values()))
    assert space["lam"].lower == cfg.tune.lam[0] and space["lam"].upper == cfg.tune.lam[1]
    assert space["guidance"].categories == ["logits", "features"]


def test_fixed_ranges_are_applied_not_searched(cfg):
    c = cfg.replace(["tune.lam=[0.5, 0.5]", "tune.guidance=[features]", "tune.T=[1, 3]"])
    knobs = build_knobs(c)
    assert set(param_space(knobs)) == {"T", "denoise_lr"}
    trial = apply_params(c, {"T": 2.0, "denoise_lr": 1e-3}, knobs)
    assert trial.distill.lam == 0.5 and trial.denoise.guidance == "features" and trial.distill.T == 2.0


def test_a_range_from_zero_is_uniform(cfg):
    knobs = {k.name: k for k in default_knobs(cfg.replace(["tune.lam=[0, 2]"]))}
    assert knobs["lam"].kind == "uniform"


def test_nothing_to_search_is_an_error(cfg):
    c = cfg.replace(["tune.lam=[1, 1]", "tune.T=[2, 2]", "tune.guidance=[logits]", "tune.denoise_lr=[0.001, 0.001]"])
    with pytest.raises(ConfigError, match="nothing to search"):
        build_knobs(c)


def test_params_become_the_trial_config(cfg):
    knobs = build_knobs(cfg, ["denoise.width_mult=choice(0.5, 2)", "distill.student.lr=loguniform(1e-4, 1e-2)"])
    params = {"lam": 0.3, "T": 7.5, "guidance": "features", "denoise_lr": 5e-5, "denoise.width_mult": 2,
              "distill.student.lr": 2e-3}
    trial = apply_params(cfg, params, knobs, name="t1")
    assert trial.name == "t1"
    assert trial.distill.lam == 0.3 and trial.distill.T == 7.5
    assert trial.denoise.guidance == "features"
    assert trial.denoise.lr == 5e-5 and trial.denoise.lr_min == 5e-5  # lr_min never exceeds lr
    assert trial.denoise.widths == tuple(2 * w for w in cfg.denoise.widths)
    assert trial.distill.student.lr == 2e-3
    assert trial.distill.teacher == cfg.distill.teacher and trial.models == cfg.models  # nothing else moves
    assert "distill.lam=0.3" in overrides_for(cfg, params, knobs)
    with pytest.raises(ConfigError, match="'nope'"):
        overrides_for(cfg, {"nope": 1}, knobs)


def test_space_flag_kinds(cfg):
    assert parse_knob("distill.teacher.lr=uniform(1e-4, 0.01)", cfg).values == (1e-4, 0.01)
    k = parse_knob("denoise.plateau_patience=int(0, 3)", cfg)
    assert k.kind == "int" and k.values == (0, 3)
    assert param_space([k])[k.name].lower == 0 and param_space([k])[k.name].upper == 4  # randint's end is exclusive
    assert parse_knob("denoise.guidance=choice(logits, pixel)", cfg).values == ("logits", "pixel")
    # A later knob for the same key replaces the default one.
    knobs = build_knobs(cfg, ["distill.lam=uniform(0, 1)"])
    assert [k.kind for k in knobs if k.key == "distill.lam"] == ["uniform"]


@pytest.mark.parametrize("item, culprit", [
    ("distill.lam", "expected KEY=KIND(ARGS)"),
    ("distill.lam=normal(0, 1)", "unknown distribution 'normal'"),
    ("data.image_size=int(32, 64)", "not trained per trial"),
    ("distill.student.epochs=int(1, 3)", "epoch by epoch"),
    ("distill.nosuch=uniform(0, 1)", "distill.nosuch"),
    ("distill.T=uniform(3, 2)", "lo 3 > hi 2"),
    ("distill.T=loguniform(0, 2)", "lo > 0"),
    ("distill.T=uniform(0.5, 2)", "distill.T"),  # T >= 1 (equation 7): the config's own check
    ("denoise.guidance=choice(logits, l3)", "denoise.guidance"),
    ("distill.lam=uniform(1)", "two numbers"),
])
def test_bad_space_flags_name_the_culprit(cfg, item, culprit):
    with pytest.raises(ConfigError) as info:
        parse_knob(item, cfg)
    assert culprit in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the objective


def test_objective_applies_the_clean_floor():
    m = {"val_white_acc": 0.6, "val_clean_acc": 0.8}
    assert objective(m, metric="val_white_acc", mode="max", clean_floor=0.5) == pytest.approx(0.6)
    low = objective(m, metric="val_white_acc", mode="max", clean_floor=0.9)
    assert low == pytest.approx(-1.4)
    # Any trial over the floor beats every trial under it.
    assert objective({"val_white_acc": 0.0, "val_clean_acc": 0.95}, metric="val_white_acc", mode="max",
                     clean_floor=0.9) > objective({"val_white_acc": 1.0, "val_clean_acc": 0.85}, metric="val_white_acc",
                                                  mode="max", clean_floor=0.9)
    assert objective(m, metric="val_white_acc", mode="min", clean_floor=0.9) == pytest.approx(2.6)
    assert objective({"val_white_acc": math.nan}, metric="val_white_acc", mode="max", clean_floor=0) == -math.inf


def test_metric_names():
    assert resolve_metric("val_white_box_acc") == "val_white_acc"  # the config's spelling
    assert resolve_metric("val_clean_acc") == "val_clean_acc"
    with pytest.raises(ConfigError, match="tune.metric"):
        resolve_metric("accuracy")


# ----------------------------------------------------------------------------- concurrency


def test_concurrency_follows_resources(cfg):
    from raydefense.tune.search import trial_concurrency

    one_cpu = cfg.replace(["scale.cpus_per_worker=1", "scale.num_workers=1", "scale.cpus_per_actor=1"])
    # A laptop: the local Ray advertises 4 logical CPUs on 2 cores; cores cap it.
    assert trial_concurrency(one_cpu, requested=0, resources={"CPU": 4.0}, gpu=False, local_cpus=2) == 1
    # A cluster is filled (0 = as many as fit), but never beyond what was asked.
    assert trial_concurrency(one_cpu, requested=0, resources={"CPU": 64.0}, gpu=False) == 63
    assert trial_concurrency(one_cpu, requested=4, resources={"CPU": 64.0}, gpu=False) == 4
    two_workers = one_cpu.replace(["scale.num_workers=2", "scale.cpus_per_worker=4"])
    assert trial_concurrency(two_workers, requested=0, resources={"CPU": 32.0}, gpu=False) == 3
    # GPU trials: GPUs are the limit, not CPUs.
    gpu = cfg.replace(["scale.use_gpu=true", "scale.num_workers=2", "scale.gpus_per_worker=1"])
    assert trial_concurrency(gpu, requested=0, resources={"CPU": 64.0, "GPU": 8.0}, gpu=True) == 4
    assert trial_concurrency(gpu, requested=16, resources={"CPU": 64.0, "GPU": 8.0}, gpu=True) == 4
    # A GPU trial's actors hold 1 CPU each (Ray Data's default beside a GPU), whatever the CPU pools'
    # scale.cpus_per_actor: 16 CPUs per actor would have allowed one trial on 64 CPUs.
    wide_cpu_pool = gpu.replace(["scale.cpus_per_actor=16"])
    assert trial_concurrency(wide_cpu_pool, requested=0, resources={"CPU": 64.0, "GPU": 8.0}, gpu=True) == 4
    # Never zero: a trial that does not fit waits for resources rather than never running.
    assert trial_concurrency(two_workers, requested=1, resources={"CPU": 2.0}, gpu=False) == 1


# ----------------------------------------------------------------------------- Optuna's record


def _searcher(tmp_path, cfg, seed=3):
    from raydefense.tune.search import RecordingOptunaSearch

    knobs = build_knobs(cfg)
    s = RecordingOptunaSearch(record=Storage.open(str(tmp_path)), seed=seed)
    s.set_search_properties("objective", "max", param_space(knobs))
    return s


def test_optuna_records_completed_and_pruned_trials(tmp_path, cfg):
    s = _searcher(tmp_path, cfg)
    a, b = s.suggest("ta"), s.suggest("tb")
    s.on_trial_result("ta", {"objective": 0.4, "training_iteration": 1})
    s.on_trial_result("tb", {"objective": 0.1, "training_iteration": 1})
    # ASHA stopped tb on its second result, which Tune does not pass to on_trial_result.
    s.on_trial_complete("tb", result={"objective": 0.05, "training_iteration": 2, "done": True, "complete": False})
    s.on_trial_complete("ta", result={"objective": 0.7, "training_iteration": 3, "done": True, "complete": True})
    rec = json.loads((tmp_path / "optuna_trials.json").read_text())
    assert rec["sampler"] == "TPESampler" and rec["direction"] == "MAXIMIZE"
    by_id = {t["tune_trial_id"]: t for t in rec["trials"]}
    assert by_id["ta"]["state"] == "COMPLETE" and by_id["ta"]["value"] == 0.7
    assert by_id["tb"]["state"] == "PRUNED" and by_id["tb"]["value"] is None
    assert by_id["tb"]["intermediate_values"] == {"1": 0.1, "2": 0.05}
    assert by_id["ta"]["params"] == a and by_id["tb"]["params"] == b
    # The study itself, not only the file, holds them.
    states = sorted(t.state.name for t in s._ot_study.trials)
    assert states == ["COMPLETE", "PRUNED"]


def test_optuna_sampler_is_seeded(tmp_path, cfg):
    first = [_searcher(tmp_path / str(i), cfg, seed=5).suggest("t0") for i in range(2)]
    assert first[0] == first[1]
    assert _searcher(tmp_path / "other", cfg, seed=6).suggest("t0") != first[0]


# ----------------------------------------------------------------------------- summary pieces


def _row(tid, status, obj, lam, guidance="logits"):
    return {"trial_id": tid, "status": status, "objective": obj, "params": {"lam": lam, "T": 2.0, "guidance": guidance},
            "curve": [0.1, obj or 0.0]}


def test_best_prefers_trials_that_ran_every_phase():
    from raydefense.tune.search import pick_best

    rows = [_row("a", "completed", 0.5, 1.0), _row("b", "stopped_early", 0.9, 0.2), _row("c", "completed", 0.6, 3.0),
            _row("d", "error", None, 2.0)]
    assert pick_best(rows, mode="max")["trial_id"] == "c"
    assert pick_best(rows, mode="min")["trial_id"] == "a"
    assert pick_best([rows[1], rows[3]], mode="max")["trial_id"] == "b"
    assert pick_best([rows[3]], mode="max") is None


def test_trials_figure_is_a_png():
    from PIL import Image
    import io

    from raydefense.tune.plot import trials_figure

    rows = [_row("a", "completed", 0.5, 1.0), _row("b", "stopped_early", 0.3, 0.2, "features")]
    png = trials_figure(rows, best_id="a", phase_ends=[1, 2, 3], title="t")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size[0] > 400


def test_stage_config_keeps_the_run_trial_sections(tmp_path, cfg):
    from raydefense.tune.search import stage_config

    storage = Storage.open(str(tmp_path))
    assert stage_config(cfg, storage) is cfg  # no run yet: the search's config makes it
    saved = cfg.replace(["distill.student.epochs=5", "denoise.epochs=3"])
    storage.child(cfg.name).write_text("config.yaml", saved.to_yaml())
    search_cfg = cfg.replace(["tune.num_samples=2"])
    staged = stage_config(search_cfg, storage)
    assert staged.distill == saved.distill and staged.denoise == saved.denoise
    assert staged.tune.num_samples == 2 and staged.data == cfg.data


@pytest.mark.parametrize("args, culprit", [
    (["--space", "distill.T=gauss(1, 2)"], "--space"),
    (["--set", "tune.metric=top5"], "tune.metric"),
    (["--search", "a/b"], "--search"),
])
def test_job_rejects_bad_input_before_anything_runs(tmp_path, args, culprit):
    res = subprocess.run([sys.executable, "jobs/tune_defense.py", "--config", "configs/smoke.yaml", "--storage",
                          str(tmp_path / "runs"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and culprit in last, last
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the console

_CONSOLE_SCRIPT = r"""
import os, sys
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from raydefense.config import load_config
from raydefense.pipeline.runtime import init_ray, tune_console

init_ray(load_config("configs/smoke.yaml"))

def trainable(config):
    tune.report({"objective": config["x"]})

for verbose in (False, True):
    print(f"=== verbose={verbose}", flush=True)
    with tune_console(verbose=verbose):
        tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
                   tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=1,
                                               search_alg=OptunaSearch(seed=0)),
                   run_config=tune.RunConfig(name=f"e{int(verbose)}", storage_path=sys.argv[1], verbose=0)).fit()
    sys.stderr.flush()
    print(f"=== after: {os.environ.get('RAY_AIR_NEW_OUTPUT')}", flush=True)
"""


@pytest.mark.slow
def test_a_search_console_has_no_tune_or_optuna_notices(tmp_path):
    """A real Tuner with Optuna on a local Ray (started as the job starts it): inside
    ``tune_console(verbose=False)`` neither Tune's experiment table and hints (printed by Ray
    2.60's default engine even at ``verbose=0``) nor Optuna's study notice reach the console;
    ``verbose=True`` shows them (so the check can fail); the switch is gone after the block."""
    # One stream, in the order written (the markers go to stdout, Optuna's notice to stderr).
    res = subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = res.stdout
    assert res.returncode == 0, out[-3000:]
    quiet, verbose = out.split("=== verbose=True")
    quiet = quiet.split("=== verbose=False")[1]
    notices = ("Configuration for experiment", "View detailed results", "tensorboard --logdir", "A new study created")
    assert not [n for n in notices if n in quiet], quiet
    assert all(n in verbose for n in notices), verbose
    assert out.count("=== after: None") == 2


# ----------------------------------------------------------------------------- a real search


SEARCH = ["--config", "configs/smoke.yaml", "--name", "tiny", "--num-samples", "2", "--max-concurrent", "1",
          # 3 identities, no GNR, one epoch per phase: the smallest run that has every stage the search needs.
          "--set", "data.num_identities=3", "--set", "gnr.enabled=false", "--set", "models.target_train.epochs=1",
          "--set", "models.surrogate_train.epochs=1", "--set", "denoise.epochs=1",
          "--set", "distill.teacher.epochs=1", "--set", "distill.student.epochs=1",
          # ASHA's first rung at the last epoch: no trial is stopped early, so the kill below always
          # lands in the second trial (early stopping itself is checked on the searcher above).
          "--set", "tune.grace_period=3",
          # Every trial trains data-parallel: two Ray Train workers per fit (gloo on CPU).
          "--set", "scale.num_workers=2", "--set", "scale.cpus_per_worker=1"]


@pytest.mark.slow
@pytest.mark.long
def test_search_completes_resumes_after_a_kill_and_optuna_records_it(tmp_path):
    """Kill the driver (SIGKILL, whole process group) once the first trial finished and the
    second trained its UDDN; run the same command again: the first trial and the second's
    UDDN are not trained again, the search finishes, writes best.json, best_config.yaml and
    trials.png, and Optuna's study holds both trials with Tune's params and objectives."""
    args = [sys.executable, "jobs/tune_defense.py", *SEARCH, "--storage", str(tmp_path)]
    sdir = tmp_path / "tiny" / "tune" / "search"
    models = tmp_path / "tiny" / "models" / "tune" / "search"
    t0 = time.perf_counter()
    log = tmp_path / "first_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first = second = None
    deadline = time.time() + 900
    try:
        while second is None:
            assert proc.poll() is None, f"the search ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "the search did not get to its second trial in time"
            done = [p.parent.name for p in sdir.glob("trials/*/result.json")]
            if done:
                first = done[0]
                others = [p.parent.name for p in models.glob("*/uddn.pt") if p.parent.name != first]
                second = others[0] if others else None
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    t_kill = time.perf_counter() - t0
    assert not (sdir / "best.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in [sdir / "trials" / first / "result.json", *models.glob(f"{first}/*.pt"),
                                                models / second / "uddn.pt"]}
    assert len(stamps) == 5  # first: result, uddn, teacher, student; second: uddn

    t1 = time.perf_counter()
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    t_resume = time.perf_counter() - t1
    print(f"search: {t_kill:.0f} s until the kill, {t_resume:.0f} s to resume and finish")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming the interrupted search" in res.stdout
    # The console is the search's own: no Tune experiment table, no Optuna study notice.
    assert "Configuration for experiment" not in res.stdout + res.stderr
    assert "A new study created" not in res.stdout + res.stderr
    # Nothing finished was trained again.
    for p, ns in stamps.items():
        assert p.stat().st_mtime_ns == ns, p
    # Every trial's curve is whole: each epoch reported once, phases in order.
    for tid in (first, second):
        hist = json.loads((sdir / "trials" / tid / "history.json").read_text())
        assert [(h["phase"], h["phase_epoch"]) for h in hist] == [("uddn", 0), ("teacher", 0), ("student", 0)]
        for phase in ("uddn", "teacher", "student"):  # each phase trained on two workers
            blob = Storage.open(str(models / tid)).load_torch(f"{phase}.pt")
            assert {h["workers"] for h in blob["metrics"]["history"]} == {2}, (tid, phase)

    best = json.loads((sdir / "best.json").read_text())
    assert best["counts"] == {"completed": 2, "stopped_early": 0, "error": 0}
    assert {t["trial_id"] for t in best["trials"]} == {first, second}
    objectives = {t["trial_id"]: t["objective"] for t in best["trials"]}
    assert best["best"]["objective"] == max(objectives.values())
    assert 0.0 <= best["best"]["metrics"]["val_white_acc"] <= 1.0
    assert set(best["best"]["params"]) == {"lam", "T", "guidance", "denoise_lr"}
    # Tune's own record agrees: two trials in the experiment, with the same params.
    tune_params = {p.parent.name: json.loads(p.read_text()) for p in (sdir / "experiment").glob("*/params.json")}
    assert set(tune_params) == {first, second}
    assert tune_params[best["best"]["trial_id"]] == best["best"]["params"]

    # The best config loads as a pipeline config with the best values.
    bc = load_config(sdir / "best_config.yaml")
    p = best["best"]["params"]
    assert bc.name == "tiny-search-best"
    assert bc.distill.lam == pytest.approx(p["lam"]) and bc.distill.T == pytest.approx(p["T"])
    assert bc.denoise.guidance == p["guidance"] and bc.denoise.lr == pytest.approx(p["denoise_lr"])
    assert bc.data.num_identities == 3
    from PIL import Image

    with Image.open(sdir / "trials.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200

    # The Optuna study (TPE, seeded) recorded both trials, with Tune's params and final objectives.
    rec = json.loads((sdir / "optuna_trials.json").read_text())
    assert rec["sampler"] == "TPESampler"
    assert sorted(t["tune_trial_id"] for t in rec["trials"]) == sorted([first, second])
    for t in rec["trials"]:
        assert t["state"] == "COMPLETE"
        assert t["params"] == tune_params[t["tune_trial_id"]]
        assert t["value"] == pytest.approx(objectives[t["tune_trial_id"]])
    assert "best: trial" in res.stdout
