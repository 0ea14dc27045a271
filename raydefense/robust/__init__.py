"""Evaluation and training against an attacker who knows the defense (issue 13), pure PyTorch.

* :mod:`raydefense.robust.masking`: the gradient-masking checks (Carlini et al. 2019; Athalye
  et al. 2018) as pure functions over measured accuracies, and their markdown table.
* :mod:`raydefense.robust.online`: online PGD examples for adversarial training (Madry et al.
  2018) and the TRADES / ARD-style robust losses for ``pgd_at`` and ``uddn_kt_adv``.

The gradient-free attack these need is :class:`raydefense.attacks.Square` (registered as
``'square'``). Nothing here imports Ray.
"""
from raydefense.robust.masking import (
    Accuracy,
    CheckResult,
    check_eps_monotone,
    check_gradient_free,
    check_large_eps,
    check_stronger_attack,
    check_transfer,
    differs,
    flagged,
    masking_checks,
    render_markdown,
)
from raydefense.robust.online import ard_kt_loss, online_pgd, trades_loss

__all__ = [
    "Accuracy",
    "CheckResult",
    "ard_kt_loss",
    "check_eps_monotone",
    "check_gradient_free",
    "check_large_eps",
    "check_stronger_attack",
    "check_transfer",
    "differs",
    "flagged",
    "masking_checks",
    "online_pgd",
    "render_markdown",
    "trades_loss",
]
