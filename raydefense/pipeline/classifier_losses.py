"""The classifier losses: a registry, like the guided losses of the denoiser.

- ``ce``: cross-entropy on labels: the target and surrogate (section 5), the KT teacher
  trained on denoised images (section 4.2);
- ``kt``: knowledge transfer (equation 6) from a frozen teacher at temperature T with weight
  lambda: the published student;
- ``dcn``: cross-entropy plus the contractive penalty of Gu & Rigazio (2015), one forward pass;
- ``temp_ce`` / ``soft``: defensive distillation (Papernot et al. 2016): a teacher trained
  at temperature T, then a student on its soft labels at the same T, deployed at T = 1;
- ``pgd_at``: PGD adversarial training (Madry et al., ICLR 2018) on examples made online against
  the current model, or TRADES (Zhang et al., ICML 2019) (issue 13);
- ``ard_kt``: the student behind a frozen denoiser, knowledge transfer on examples made online
  through denoiser + student (Adversarially Robust Distillation, Goldblum et al., AAAI 2020).

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
    generator: Optional[torch.Generator] = None  # DCN's random projections; online PGD's random starts
    robust: Optional["RobustInputs"] = None  # 'pgd_at' and 'ard_kt'
    preprocess: Optional[torch.nn.Module] = None  # frozen denoiser in front of the model ('ard_kt')


@dataclass(frozen=True)
class RobustInputs:
    """The online attack and robust term of 'pgd_at' / 'ard_kt' (``robust.*`` of the config).

    ``eps`` the L-inf budget in [0, 1] units, each image's drawn from U[eps_min, eps] when
    ``eps_min`` is set; ``steps`` PGD steps of ``step_size`` (None: 2.5 eps / steps);
    ``loss`` 'ce' or 'trades'; ``weight`` of the robust term in [0, 1]; ``beta`` TRADES' weight.
    """

    eps: float
    steps: int
    eps_min: Optional[float] = None
    step_size: Optional[float] = None
    loss: str = "ce"
    weight: float = 1.0
    beta: float = 6.0

    def budgets(self, n: int, *, device, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Per-image eps ``(n,)`` on ``device`` (uniform in [eps_min, eps] if eps_min is set)."""
        if self.eps_min is None or self.eps_min == self.eps:
            return torch.full((n,), float(self.eps), device=device)
        where = generator.device if generator is not None else "cpu"
        u = torch.rand(n, generator=generator, device=where).to(device)
        return self.eps_min + (self.eps - self.eps_min) * u

    def alphas(self, eps: torch.Tensor) -> torch.Tensor:
        return torch.full_like(eps, float(self.step_size)) if self.step_size else 2.5 * eps / self.steps


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


def _online(model, x, y, a: LossInputs, *, loss: str = "ce") -> torch.Tensor:
    """PGD examples for this batch against ``model``'s current weights (without DDP's wrapper:
    the attack's input gradients must not touch DDP's gradient reduction)."""
    from raydefense.pipeline.artifacts import unwrap
    from raydefense.robust import online_pgd

    r = a.robust
    if r is None:
        raise ValueError("the 'pgd_at' / 'ard_kt' losses need LossInputs.robust (the online attack's settings)")
    eps = r.budgets(x.shape[0], device=x.device, generator=a.generator)
    return online_pgd(unwrap(model), x, y, eps=eps, steps=r.steps, alpha=r.alphas(eps), loss=loss,
                      generator=a.generator)


def _pgd_at(model, x, y, a: LossInputs) -> torch.Tensor:
    """Madry et al. (2018): CE on online PGD examples, mixed with the clean CE by ``1 - weight``;
    with ``loss='trades'``, TRADES (Zhang et al. 2019, eq. 5; KL inner maximisation)."""
    from raydefense.robust import trades_loss

    r = a.robust
    if r.loss == "trades":
        x_adv = _online(model, x, y, a, loss="kl")
        clean, adv = model(torch.cat([x, x_adv])).float().chunk(2)
        return trades_loss(clean, adv, beta=r.beta, labels=y)
    x_adv = _online(model, x, y, a)
    if r.weight >= 1.0:
        return F.cross_entropy(model(x_adv), y, label_smoothing=a.label_smoothing)
    # One forward pass over clean and adversarial images (DDP: one forward per backward).
    clean, adv = model(torch.cat([x, x_adv])).float().chunk(2)
    return ((1 - r.weight) * F.cross_entropy(clean, y, label_smoothing=a.label_smoothing)
            + r.weight * F.cross_entropy(adv, y, label_smoothing=a.label_smoothing))


def _ard_kt(model, x, y, a: LossInputs) -> torch.Tensor:
    """ARD-style knowledge transfer behind the frozen denoiser ``a.preprocess`` (Goldblum et al.
    2020, eq. 3, with Li & Wang's KT loss, eq. 6): x_adv by PGD through denoiser + student."""
    from raydefense.pipeline.artifacts import unwrap
    from raydefense.robust import ard_kt_loss

    pre = a.preprocess
    if pre is None or a.teacher is None:
        raise ValueError("the 'ard_kt' loss needs LossInputs.preprocess (the frozen denoiser) and a teacher")
    x_adv = _online(torch.nn.Sequential(pre, unwrap(model)), x, y, a)
    with torch.no_grad():
        dx, dx_adv = pre(x), pre(x_adv)
        t_logits = a.teacher(dx).float()
    clean, adv = model(torch.cat([dx, dx_adv])).float().chunk(2)
    return ard_kt_loss(adv, t_logits, alpha=1.0 - a.robust.weight, lam=a.lam, T=a.T, student_clean_logits=clean)


#: Registry: loss name -> ``fn(model, x, y, inputs) -> scalar`` (see the module docstring).
CLASSIFIER_LOSSES: dict[str, Callable[[Any, torch.Tensor, torch.Tensor, LossInputs], torch.Tensor]] = {
    "ce": _ce,
    "kt": _kt,
    "dcn": _dcn,
    "temp_ce": _temp_ce,
    "soft": _soft,
    "pgd_at": _pgd_at,
    "ard_kt": _ard_kt,
}
LOSSES = tuple(CLASSIFIER_LOSSES)
