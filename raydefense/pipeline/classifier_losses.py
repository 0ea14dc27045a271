"""The classifier losses: a registry, like the guided losses of the denoiser.

- ``ce``: cross-entropy on labels: the target and surrogate (section 5), the KT teacher
  trained on denoised images (section 4.2);
- ``kt``: knowledge transfer (equation 6) from a frozen teacher at temperature T with weight
  lambda: the published student;
- ``dcn``: cross-entropy plus the contractive penalty of Gu & Rigazio (2015), one forward pass;
- ``temp_ce`` / ``soft``: defensive distillation (Papernot et al. 2016): a teacher trained
  at temperature T, then a student on its soft labels at the same T, deployed at T = 1.

Each entry is ``fn(model, x, y, inputs) -> scalar`` over images ``x`` ``(B, 3, H, W)`` in [0, 1]
and labels ``y`` ``(B,)``; the work is done by the building blocks (:mod:`raydefense.distill`,
:func:`raydefense.defenses.dcn_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossInputs:
    """What a classifier loss may need beyond the model, the batch and its labels."""

    teacher: Optional[torch.nn.Module] = None  # frozen, for 'kt' and 'soft'
    T: float = 1.0  # temperature of 'kt', 'temp_ce' and 'soft'
    lam: float = 0.0  # lambda of equation 6 ('kt')
    dcn_weight: float = 0.0  # contractive strength ('dcn')
    label_smoothing: float = 0.0  # 'ce'
    generator: Optional[torch.Generator] = None  # DCN's random projections


def _ce(model, x, y, a: LossInputs) -> torch.Tensor:
    return F.cross_entropy(model(x), y, label_smoothing=a.label_smoothing)


def _kt(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import knowledge_transfer_loss

    with torch.no_grad():
        t_logits = a.teacher(x)
    return knowledge_transfer_loss(model(x).float(), t_logits.float(), lam=a.lam, T=a.T)


def _dcn(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.defenses import dcn_loss

    # One forward pass through the (data-parallel) model serves both terms.
    return dcn_loss(model, x, y, weight=a.dcn_weight, generator=a.generator)


def _temp_ce(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import temperature_ce

    return temperature_ce(model(x).float(), y, a.T)


def _soft(model, x, y, a: LossInputs) -> torch.Tensor:
    from raydefense.distill import defensive_distillation_loss, distillation_soft_targets

    with torch.no_grad():
        soft = distillation_soft_targets(a.teacher(x).float(), a.T)
    return defensive_distillation_loss(model(x).float(), soft, a.T)


#: Registry: loss name -> ``fn(model, x, y, inputs) -> scalar`` (see the module docstring).
CLASSIFIER_LOSSES: dict[str, Callable[[Any, torch.Tensor, torch.Tensor, LossInputs], torch.Tensor]] = {
    "ce": _ce,
    "kt": _kt,
    "dcn": _dcn,
    "temp_ce": _temp_ce,
    "soft": _soft,
}
LOSSES = tuple(CLASSIFIER_LOSSES)
