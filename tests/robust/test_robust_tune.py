"""Tune over the adversarial-training knobs (issue 13), without Ray: ``tune.defense: uddn_kt_adv``
gives the robust knobs (training eps, PGD steps, robust-term weight) over robust.* keys, a trial's
values become its config, the phases and their results (objective val_pgd_acc under a clean floor),
and bad settings name their key."""
from __future__ import annotations

import pytest

from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.tune.space import apply_params, build_knobs, param_space
from raydefense.tune.trial import ROBUST_PHASES, TrialSpec, phase_result
from tests.conftest import REPO

ROBUST = ["tune.defense=uddn_kt_adv", "tune.metric=val_pgd_acc", "robust.defenses=[uddn_kt_adv]"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(f"{REPO}/configs/smoke.yaml", ROBUST)


def test_robust_space_and_trial_config(cfg):
    knobs = build_knobs(cfg, ["robust.beta=uniform(1, 8)"])
    assert [k.key for k in knobs] == ["robust.eps", "robust.steps", "robust.weight", "robust.beta"]
    assert set(param_space(knobs)) == {"eps", "steps", "weight", "robust.beta"}
    trial = apply_params(cfg, {"eps": 6 / 255, "steps": 3, "weight": 0.75, "robust.beta": 2.0}, knobs)
    assert (trial.robust.eps, trial.robust.steps, trial.robust.weight, trial.robust.beta) == (6 / 255, 3, 0.75, 2.0)
    assert trial.distill == cfg.distill  # only robust.* changes


def _spec(cfg):
    return TrialSpec(cfg=cfg.to_dict(), run=None, search=None, name="s", knobs=(), metric="val_pgd_acc", mode="max",
                     clean_floor=0.8, gpu=False, num_classes=4, defense="uddn_kt_adv")


def test_phase_results_of_a_robust_trial(cfg):
    spec = _spec(cfg)
    assert spec.phases == ROBUST_PHASES == ("uddn_adv", "student_adv")
    first = phase_result({"epoch": 0, "val_pgd_acc": 0.4, "val_clean_acc": 0.9}, phase="uddn_adv", last_epoch=1, spec=spec)
    assert first["objective"] == pytest.approx(0.4) and not first["complete"] and first["phase_index"] == 0
    # the student reports val_acc (clean images behind its UDDN): it is the clean accuracy of the floor
    last = phase_result({"epoch": 1, "val_pgd_acc": 0.5, "val_acc": 0.7}, phase="student_adv", last_epoch=1, spec=spec)
    assert last["complete"] and last["val_clean_acc"] == 0.7 and last["objective"] == pytest.approx(0.5 - 2.0)


@pytest.mark.parametrize("override, culprit", [
    (["tune.defense=uddn_kt_adv"], "tune.metric"),  # the default metric is the precomputed white-box accuracy
    (["tune.metric=val_pgd_acc"], "tune.metric"),  # not reported by uddn_kt trials
    (["tune.defense=madry"], "tune.defense"),
    ([*ROBUST, "tune.robust_eps=[0.0, 0.03]"], "tune.robust_eps"),
    ([*ROBUST, "tune.robust_steps=[3, 2]"], "tune.robust_steps"),
    ([*ROBUST, "tune.robust_weight=[0.5, 1.5]"], "tune.robust_weight"),
])
def test_bad_robust_tune_settings_name_the_key(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config(f"{REPO}/configs/smoke.yaml", override)


def test_robust_space_flag_is_checked(cfg):
    with pytest.raises(ConfigError, match="robust.weight"):
        build_knobs(cfg, ["robust.weight=uniform(0.5, 2)"])
    with pytest.raises(ConfigError, match="cannot be searched"):
        build_knobs(cfg, ["robust.student.epochs=int(1, 3)"])
