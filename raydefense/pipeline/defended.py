"""The defenses a run evaluates, and the one place that assembles "preprocess + classifier".

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
pgd_at         -               pgd_at        (issue 13: PGD adversarial training)
uddn_kt_adv    UDDN_adv        student_adv   (issue 13: UDDN + KT trained against whole-model PGD)
=============  ==============  ==========

:func:`load_parts` loads each part once; the tables (:class:`raydefense.pipeline.evaluate.DefenseBank`),
the whole-model attacks (:mod:`raydefense.pipeline.adaptive`) and the export all build on it, so
they evaluate the same function: a denoiser's output is clamped to [0, 1] before the classifier.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from raydefense.pipeline.artifacts import load_artifact
from raydefense.pipeline.run import RunContext

DEFENSES: dict[str, tuple[Optional[str], str]] = {
    "none": (None, "target"),
    "dae": ("dae", "target"),
    "pixel_guided": ("pixel_guided", "target"),
    "uddn": ("uddn", "target"),
    "uddn_kt": ("uddn", "student"),
    "jpeg": ("jpeg", "target"),
    "dcn": (None, "dcn"),
    "distillation": (None, "distillation"),
    "pgd_at": (None, "pgd_at"),
    "uddn_kt_adv": ("uddn_adv", "student_adv"),
}
DENOISERS = ("dae", "pixel_guided", "uddn")


def available_defenses(ctx: RunContext) -> tuple[dict[str, tuple[Optional[str], str]], dict[str, str]]:
    """Defenses whose parts were trained in this run, and why the others are missing."""
    have, missing = {}, {}
    cfg = ctx.cfg
    for name, (pre, clf) in DEFENSES.items():
        if name == "jpeg" and "jpeg" not in cfg.baselines.enabled:
            missing[name] = "not in baselines.enabled"
            continue
        needed = [clf] + ([pre] if pre and pre != "jpeg" else [])
        absent = [n for n in needed if not ctx.layout.has_model(n)]
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
    if name in ("pgd_at", "uddn_kt_adv") and name not in cfg.robust.defenses:
        return "left out by the config (robust.defenses)"
    return "its models were not trained in this run"


class UnitClamp(nn.Module):
    """Clamp to [0, 1]: a denoiser's output is clamped before the classifier, as in the tables."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 1)


def load_parts(storage, defenses: dict[str, tuple[Optional[str], str]], *, jpeg_quality: int, jpeg_mode: str,
               device) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(preprocess by name, classifier by name)`` for ``defenses``, each loaded once.

    A denoiser comes as ``Sequential(denoiser, UnitClamp())``; JPEG as :class:`raydefense.defenses.JPEG`
    in ``jpeg_mode`` ('real' for the tables, 'bpda' where gradients must pass: both run the real
    codec forward). Raises StorageError when a part's ``models/<name>.pt`` is missing or corrupt.
    """
    from raydefense.defenses import JPEG

    pre: dict[str, nn.Module] = {}
    clf: dict[str, nn.Module] = {}
    for p, c in defenses.values():
        if p == "jpeg" and p not in pre:
            pre[p] = JPEG(quality=jpeg_quality, mode=jpeg_mode)
        elif p and p not in pre:
            pre[p] = nn.Sequential(load_artifact(storage, p, device), UnitClamp())
        if c not in clf:
            clf[c] = load_artifact(storage, c, device)
    return pre, clf


def build_defended_models(storage, defenses: dict[str, tuple[Optional[str], str]], *, jpeg_quality: int,
                          device) -> dict[str, nn.Module]:
    """``name -> DefendedModel(classifier, preprocess)``: the exact function the tables evaluate
    (denoiser output clamped to [0, 1]), with JPEG in BPDA mode (real codec forward)."""
    from raydefense.defenses import DefendedModel

    pre, clf = load_parts(storage, defenses, jpeg_quality=jpeg_quality, jpeg_mode="bpda", device=device)
    return {name: DefendedModel(clf[c], pre[p] if p else None).eval() for name, (p, c) in defenses.items()}
