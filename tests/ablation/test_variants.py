"""The ablation's variants and the runs and configs they map to (no Ray)."""
from __future__ import annotations

import dataclasses
import os

import pytest

from raydefense.ablation.variants import (BASE, BASE_STAGES, COMMON_OVERRIDES, DEFAULT_KT, FULL, build_plan,
                                          default_variants, kt_name, parse_custom, parse_kt, run_config, run_name)
from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.pipeline.run import RunLayout
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cfg():
    return load_config(os.path.join(REPO, "configs", "default.yaml"))


def configs(cfg, plan, seed=0):
    return {spec.key: run_config(cfg, spec, seed) for spec in plan.runs}


def test_default_plan_has_every_variant_of_the_issue(cfg):
    plan = build_plan(cfg, seeds=3)
    assert cfg.denoise.guidance == "logits"
    assert [v.name for v in plan.variants] == [
        "full", "none", "no_kt", "no_gnr", "features", "pixel", "dae", *(kt_name(*p) for p in DEFAULT_KT)]
    assert plan.seeds == (cfg.seed, cfg.seed + 1, cfg.seed + 2)
    rows = {v.name: (v.run, v.defense) for v in plan.variants}
    assert rows["full"] == ("full", "uddn_kt")
    assert rows["none"] == ("full", "none") and rows["no_kt"] == ("full", "uddn")  # rows of the full run
    assert rows["no_gnr"] == ("no_gnr", "uddn_kt")
    assert rows["features"] == ("guidance-features", "uddn_kt") and rows["pixel"] == ("guidance-pixel", "uddn_kt")
    assert rows["dae"] == ("dae", "dae")
    assert rows["kt_lam1_T16"] == ("kt_lam1_T16", "uddn_kt")
    # base first, the full run before every run that borrows from it
    keys = [r.key for r in plan.runs]
    assert keys[:2] == [BASE, FULL]
    for r in plan.runs:
        assert all(keys.index(dep) < keys.index(r.key) for dep in r.after)
    assert plan.run("kt_lam4_T4").after == (BASE, FULL) and plan.run("dae").after == (BASE, FULL)
    assert plan.run("no_gnr").after == (BASE,) and plan.run(BASE).after == ()


def test_each_variant_changes_one_thing_in_its_config(cfg):
    plan = build_plan(cfg, seeds=3)
    c = configs(cfg, plan, seed=1)
    full = c[FULL]
    assert full.name == "s1-full" and full.seed == 1
    assert set(full.eval.adaptive_defenses) == {"uddn_kt", "uddn", "none"}  # whole-model numbers of three rows
    assert full.baselines.enabled == () and full.denoise.baselines == () and full.models.extra_targets == ()
    assert full.denoise == dataclasses.replace(cfg.denoise, baselines=())
    assert (full.distill, full.gnr) == (cfg.distill, cfg.gnr)
    assert c["no_gnr"].gnr.augment_ratio == 0 and c["no_gnr"].gnr.enabled  # no generated pairs, same attack sets
    assert c["guidance-features"].denoise.guidance == "features"
    assert c["guidance-pixel"].denoise.guidance == "pixel"
    assert c["dae"].denoise.baselines == ("dae",) and not c["dae"].distill.enabled
    assert c["dae"].eval.adaptive_defenses == ("dae",)
    assert (c["kt_lam1_T1"].distill.lam, c["kt_lam1_T1"].distill.T) == (1.0, 1.0)
    assert (c["kt_lam4_T4"].distill.lam, c["kt_lam4_T4"].distill.T) == (4.0, 4.0)
    assert c["kt_lam4_T4"].distill.teacher == full.distill.teacher  # the borrowed teacher is the right one
    for key, rc in c.items():
        assert rc.name == run_name(1, key)
        if key not in (BASE, FULL):  # every other run differs from the full run only where its variant says
            diff = {k for k in _flat(rc) if _flat(rc)[k] != _flat(full)[k]} - {"name"}
            assert diff and all(k.startswith(("gnr.", "denoise.", "distill.", "eval.")) for k in diff), (key, diff)


def _flat(c):
    from raydefense.config import flatten

    return flatten(c.to_dict())


STAGE_INPUTS = {  # the config sections each shared stage reads
    "prepare": ("seed", "data."),
    "models": ("seed", "data.", "models."),
    "attack": ("seed", "data.", "models.", "attack.", "gnr.enabled"),  # attack_plan depends on gnr.enabled
    "gnr": ("seed", "data.", "models.", "attack.", "gnr."),
}


def test_a_run_shares_only_stages_made_with_its_own_settings(cfg):
    """Every run reads the base run's outputs of its shared stages: each must have been made by the
    config the run would have made them with."""
    plan = build_plan(cfg, seeds=2, variants=["all"])
    for seed in plan.seeds:
        c = configs(cfg, plan, seed)
        base = _flat(c[BASE])
        for spec in plan.runs:
            mine = _flat(c[spec.key])
            for stage in spec.base_stages:
                differ = [k for k in mine if k.startswith(STAGE_INPUTS[stage]) and mine[k] != base[k]]
                assert not differ, (spec.key, stage, differ)
    assert plan.run("no_gnr").base_stages == ("prepare", "models", "attack")
    assert plan.run("no_gnr").borrows == ((BASE, RunLayout.model_rel("gnr_generator")),)
    assert plan.run("real_noise").base_stages == ("prepare", "models")  # its attack sets differ (gnr.enabled)
    assert plan.run(FULL).base_stages == BASE_STAGES


def test_borrowed_artifacts_do_not_depend_on_what_the_borrower_changes(cfg):
    plan = build_plan(cfg, seeds=1, variants=["all"])
    c = configs(cfg, plan)
    for spec in plan.runs:
        for key, rel in spec.borrows:
            if rel == RunLayout.model_rel("uddn"):  # the UDDN: denoise.guidance, widths, epochs, ...
                assert _flat(c[spec.key])["denoise.guidance"] == _flat(c[key])["denoise.guidance"]
            if rel == RunLayout.model_rel("teacher"):
                assert c[spec.key].distill.teacher == c[key].distill.teacher


def test_the_full_run_does_not_depend_on_the_selection(cfg):
    small = build_plan(cfg, seeds=1, variants=["no_gnr"])
    large = build_plan(cfg, seeds=1, variants=["all"])
    assert run_config(cfg, small.run(FULL), 0) == run_config(cfg, large.run(FULL), 0)
    assert run_config(cfg, small.run(BASE), 0) == run_config(cfg, large.run(BASE), 0)
    assert [v.name for v in small.variants] == ["full", "no_gnr"]
    assert any("full defense is added" in n for n in small.notes)
    assert [r.key for r in small.runs] == [BASE, FULL, "no_gnr"]  # only the runs needed


def test_all_and_optional_variants(cfg):
    plan = build_plan(cfg, seeds=1, variants=["all"])
    names = [v.name for v in plan.variants]
    assert {"real_noise", "pixel_guided"} <= set(names) and set(default_variants(cfg)) - {"kt"} <= set(names)
    c = configs(cfg, plan)
    assert not c["real_noise"].gnr.enabled
    assert c["pixel_guided"].denoise.baselines == ("pixel_guided",)


def test_guidance_variants_follow_the_config():
    cfg = load_config(os.path.join(REPO, "configs", "default.yaml"), ["denoise.guidance=features"])
    plan = build_plan(cfg, seeds=1)
    assert [v.name for v in plan.variants if v.run.startswith("guidance-")] == ["pixel", "logits"]
    with pytest.raises(ConfigError, match="already uses denoise.guidance=features"):
        build_plan(cfg, seeds=1, variants=["features"])


def test_kt_pairs(cfg):
    assert parse_kt("1:1, 0.5:2") == ((1.0, 1.0), (0.5, 2.0))
    for bad in ("1", "a:2", "1:2:3", "", "1:nan"):
        with pytest.raises(ConfigError, match="--kt"):
            parse_kt(bad)
    plan = build_plan(cfg, seeds=1, variants=["kt", "kt_lam0.5_T2"], kt=[(1.0, 4.0), (2.0, 2.0)])
    assert [v.name for v in plan.variants] == ["full", "kt_lam2_T2", "kt_lam0.5_T2"]
    assert any("kt_lam1_T4 is the full defense" in n for n in plan.notes)  # (1, 4) is the config's own
    with pytest.raises(ConfigError, match="distill.T"):
        build_plan(cfg, seeds=1, variants=["kt_lam1_T0.5"])  # T >= 1 (equation 7)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"variants": ["nope"]}, "--variants 'nope': unknown variant"),
    ({"variants": ["logits"]}, "already uses denoise.guidance=logits"),
    ({"seeds": 0}, "--seeds 0"),
])
def test_bad_selections_name_the_culprit(cfg, kwargs, culprit):
    with pytest.raises(ConfigError) as info:
        build_plan(cfg, **{"seeds": 1, **kwargs})
    assert culprit in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, key", [("gnr.enabled=false", "gnr.enabled"), ("gnr.augment_ratio=0", "gnr"),
                                           ("distill.enabled=false", "distill.enabled")])
def test_a_full_defense_without_a_part_is_refused(cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        build_plan(cfg.replace([override]), seeds=1)


def test_common_overrides_leave_out_what_the_ablation_does_not_measure():
    assert "baselines.enabled=[]" in COMMON_OVERRIDES and "models.extra_targets=[]" in COMMON_OVERRIDES


def test_custom_variants(cfg):
    assert parse_custom("pix0=denoise.pixel_weight=0; distill.T=2") == ("pix0", ("denoise.pixel_weight=0",
                                                                               "distill.T=2"))
    plan = build_plan(cfg, seeds=1, variants=["full"], custom=[("wide", ("denoise.widths=[16, 32, 64, 128, 128]",)),
                                                               ("aug2", ("gnr.augment_ratio=2",))])
    assert [v.name for v in plan.variants] == ["full", "wide", "aug2"]
    c = configs(cfg, plan)
    assert c["wide"].denoise.widths == (16, 32, 64, 128, 128) and c["wide"].name == "s0-wide"
    assert plan.run("wide").base_stages == BASE_STAGES
    # A new augment ratio reruns the GNR's augmentation with the base's generator.
    assert c["aug2"].gnr.augment_ratio == 2 and plan.run("aug2").base_stages == ("prepare", "models", "attack")
    assert plan.run("aug2").borrows == ((BASE, RunLayout.model_rel("gnr_generator")),)


@pytest.mark.parametrize("custom, culprit", [
    (("x", ("models.target=small_cnn",)), "'models.target' cannot vary"),
    (("x", ("distill.enabled=false",)), "'distill.enabled' cannot vary"),
    (("x", ("denoise.epochs=0",)), "denoise.epochs"),
    (("x", ("distill.lam=1.0",)), "changes nothing"),
    (("dae", ("distill.lam=2",)), "built-in variant"),
])
def test_bad_custom_variants_name_the_culprit(cfg, custom, culprit):
    with pytest.raises(ConfigError) as info:
        build_plan(cfg, seeds=1, custom=[custom])
    assert culprit in str(info.value) and "\n" not in str(info.value)
    for bad in ("x", "x=", "a b=distill.T=2", "=distill.T=2"):
        with pytest.raises(ConfigError, match="--custom"):
            parse_custom(bad)


def test_the_base_stages_are_the_pipeline_s_first_four():
    from raydefense.pipeline.runner import STAGE_NAMES

    assert BASE_STAGES == STAGE_NAMES[:4] and STAGE_NAMES[4:] == ("denoise", "distill", "baselines", "robust", "evaluate")
