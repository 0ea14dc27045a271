"""Gradient attacks in ``[0, 1]`` pixel space, torchattacks calling convention.

``attack = FGSM(model, eps=8/255); adv = attack(images, labels)``. FGSM and I-FGSM with 2, 4
and 8 steps make the attack data of Li & Wang (2019, section 5); PGD (with EOT) is for the
adaptive evaluation against the whole defended model. ``create_attack(name, model, **kw)`` builds
one by name: ``'fgsm'``, ``'ifgsm'``, ``'ifgsm2'``, ``'ifgsm4'``, ``'ifgsm8'``, ``'pgd'``, ``'apgd'``, ``'apgd_dlr'``.
"""
from raydefense.attacks.base import Attack, attack_loss, create_attack, list_attacks, register_attack
from raydefense.attacks.fgsm import FGSM, fgsm_levels
from raydefense.attacks.ifgsm import IFGSM
from raydefense.attacks.pgd import PGD
from raydefense.attacks.apgd import APGD
from raydefense.attacks.square import Square  # noqa: F401  registers 'square' (Andriushchenko et al., ECCV 2020)

__all__ = ["Attack", "FGSM", "IFGSM", "PGD", "APGD", "create_attack", "fgsm_levels", "list_attacks", "register_attack",
           "attack_loss"]
