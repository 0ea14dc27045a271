"""Section 1: our attacks against torchattacks' on the same model, batch, eps and step sizes.

What is measured: wall-clock seconds of one attack call ``attack(images, labels)`` on a batch
(``time.perf_counter`` around the call, CPU or CUDA-synchronised), ours and torchattacks'
alternately in the same process (:func:`~rdbench.stats.interleave`, one warm-up round dropped).
Reported per pair and image size: the speed ratio ``ours / torchattacks`` (= their seconds over
ours, per round; >= 1 means ours is at least as fast) and each side's images/s.

The pairs (eps = 8/255 for both sides, L-inf, untargeted cross-entropy):

==================  ======================================  ==========================================
pair                ours (``raydefense.attacks`` registry)  torchattacks 3.5.1
==================  ======================================  ==========================================
FGSM                ``fgsm``                                ``FGSM(eps)``
I-FGSM4 / BIM       ``ifgsm4`` (alpha = eps / 4)            ``BIM(eps, alpha=eps / 4, steps=4)``
PGD-10              ``pgd`` (alpha 2/255, 10 steps, random  ``PGD(eps, alpha=2/255, steps=10,
                    start, 1 restart)                       random_start=True)``
APGD                ``apgd`` (CE, ``steps``, 1 restart,     ``APGD(norm='Linf', eps, steps,
                    rho 0.75)                               n_restarts=1, loss='ce', rho=0.75)``
==================  ======================================  ==========================================

The model is FaceNet as the project builds it (``create_model('facenet', num_classes=12)``,
random initialisation, no download; inputs in [0, 1], the model normalises), in eval mode; the
images are the project's synthetic faces (:func:`raydefense.data.render_identity_images`).
The labels are the model's own predictions: torchattacks' APGD only attacks images the model
classifies correctly (``perturb``: ``ind_to_fool = acc.nonzero()``), so with true labels and a
random model it would skip most of the batch and time almost nothing.

Before timing, each pair is checked to be comparable: both outputs lie in [0, 1] and within eps
of the input (L-inf, 1e-6 slack); for the deterministic pairs (FGSM, I-FGSM4/BIM) the fraction of
pixels on which both agree is recorded (expected ~1.0); the fraction of images each one fools is
recorded for all. A pair that fails the check fails the section.

Our attacks differentiate the model with its BatchNorms folded into the convolutions and
channels-last weights, for the length of each call (``Attack.fold_batch_norm``, on by default),
torchattacks the model as given: the pairs compare what each library does with the same model. Per size, the rows of
:func:`_inference_form_rows` split that ratio: the fold's net gain (ours against ours with the
fold off), the attack code's own speed (ours against torchattacks, both handed the folded
network: the same operations on both sides) and the cost of folding at each call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .results import Row, Section
from .stats import interleave, paired_ratios

__all__ = ["AttackPair", "attack_pairs", "load_torchattacks", "run_attacks", "check_pair"]

EPS = 8 / 255
PGD_ALPHA = 2 / 255


@dataclass(frozen=True)
class AttackPair:
    """One comparison: our registry name and kwargs, torchattacks' class name and kwargs."""

    label: str
    ours: str
    ours_kwargs: dict[str, Any]
    theirs: str
    theirs_kwargs: dict[str, Any]
    deterministic: bool


def attack_pairs(*, eps: float = EPS, apgd_steps: int = 10) -> list[AttackPair]:
    """The four pairs of the module docstring with their step sizes spelled out."""
    return [
        AttackPair("FGSM vs FGSM", "fgsm", {}, "FGSM", {}, True),
        AttackPair("I-FGSM4 vs BIM(steps=4)", "ifgsm4", {}, "BIM", {"alpha": eps / 4, "steps": 4}, True),
        AttackPair("PGD-10 vs PGD(steps=10)", "pgd", {"alpha": PGD_ALPHA, "steps": 10, "random_start": True, "restarts": 1},
                   "PGD", {"alpha": PGD_ALPHA, "steps": 10, "random_start": True}, False),
        AttackPair(f"APGD-{apgd_steps} vs APGD(steps={apgd_steps})", "apgd",
                   {"steps": apgd_steps, "restarts": 1, "loss": "ce", "rho": 0.75},
                   "APGD", {"norm": "Linf", "steps": apgd_steps, "n_restarts": 1, "loss": "ce", "rho": 0.75}, False),
    ]


def load_torchattacks() -> tuple[Optional[Any], Optional[str]]:
    """``(torchattacks module, None)``, or ``(None, why not)`` when it cannot be imported."""
    try:
        import torchattacks
    except ImportError as exc:
        return None, (f"torchattacks is not installed ({exc}); install it with "
                      "`pip install --no-deps torchattacks scipy` (it is not a project dependency: it pins "
                      "requests~=2.25.1, and imports scipy)")
    return torchattacks, None


def _images(n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` synthetic faces ``(n, 3, size, size)`` in [0, 1] (identities 0, 1, ... in turn)."""
    from raydefense.data import render_identity_images
    from raydefense.pipeline.runtime import images_to_tensor
    import numpy as np

    per = max(1, -(-n // 8))
    ims = [render_identity_images(i, list(range(per)), image_size=size, seed=seed) for i in range(8)]
    return images_to_tensor(np.concatenate(ims)[:n])


def check_pair(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, *, eps: float,
               deterministic: bool) -> dict[str, float]:
    """Comparability of two adversarial batches for the same ``x``; ValueError when either leaves
    [0, 1] or the eps-ball. Returns max L-inf distances and, when ``deterministic``, the fraction of
    pixels on which they agree (to 1e-5)."""
    out: dict[str, float] = {}
    for side, adv in (("ours", ours), ("theirs", theirs)):
        adv = adv.detach().to(x.device, x.dtype)
        linf = float((adv - x).abs().max())
        if linf > eps + 1e-6 or float(adv.min()) < 0 or float(adv.max()) > 1:
            raise ValueError(f"{side}: output outside [0, 1] or the eps-ball (max |adv - x| = {linf:.6f}, eps {eps:.6f})")
        out[f"linf_{side}"] = linf
    if deterministic:
        out["pixels_agree"] = float(((ours.to(x.device) - theirs.to(x.device)).abs() <= 1e-5).float().mean())
    return out


def _fooled(model: torch.nn.Module, adv: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) != labels).float().mean())


def run_attacks(section: Section, *, sizes: list[int], batch: int, rounds: int, warmup: int = 1,
                large_rounds: Optional[int] = None, apgd_steps: int = 10, model_name: str = "facenet",
                num_classes: int = 12, theirs: Any = None, device: str = "cpu",
                log: Callable[[str], None] = print) -> None:
    """Fill ``section`` with the rows of the module docstring (``theirs``: the torchattacks module,
    or a stand-in with the same classes in tests). ``large_rounds`` (default ``rounds``) applies
    to sizes of 128 px and more, where one round costs about four times as much."""
    from raydefense.attacks import create_attack
    from raydefense.models import create_model

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    section.notes.append(f"eps {EPS:.5f} (8/255) both sides; BIM alpha = eps/4 (= our I-FGSM4's eps/steps); PGD alpha "
                         f"2/255, 10 steps, random start; APGD {apgd_steps} steps, CE, 1 restart, rho 0.75")
    section.notes.append(f"{model_name} (random init, eval mode), batch {batch}, labels = the model's predictions, "
                         f"torch threads {torch.get_num_threads()}, device {device}; seconds per attack call, "
                         f"interleaved ours/theirs, {warmup} warm-up round(s) dropped")
    section.notes.append("torchattacks' APGD returns the clean image where it fooled nothing (its perturb keeps "
                         "adv = x there), ours the highest-loss point: linf_theirs can be 0 while both ran every step "
                         "on every image (the labels make every image 'correct', so torchattacks attacks them all)")
    for size in sizes:
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=num_classes).to(device).eval()
        x = _images(batch, size).to(device)
        with torch.no_grad():
            y = model(x).argmax(1)
        for pair in attack_pairs(apgd_steps=apgd_steps):
            ours = create_attack(pair.ours, model, eps=EPS, **pair.ours_kwargs)
            their = getattr(theirs, pair.theirs)(model, eps=EPS, **pair.theirs_kwargs)
            torch.manual_seed(1)
            adv_ours = ours(x, y)
            torch.manual_seed(1)
            adv_theirs = their(x, y)
            check = check_pair(adv_ours, adv_theirs, x, eps=EPS, deterministic=pair.deterministic)
            check["fooled_ours"], check["fooled_theirs"] = _fooled(model, adv_ours, y), _fooled(model, adv_theirs, y)
            n_rounds = large_rounds if large_rounds is not None and size >= 128 else rounds
            times = interleave({"ours": lambda: ours(x, y), "theirs": lambda: their(x, y)},
                               rounds=n_rounds, warmup=warmup, sync=sync)
            name = f"{pair.label} @ {size} px"
            section.rows.append(Row.of(f"{name}: ours/torchattacks speed", paired_ratios(times["theirs"], times["ours"]),
                                       "x", ratio=True, check=check, batch=batch))
            section.rows.append(Row.of(f"{name}: ours", [batch / t for t in times["ours"]], "img/s",
                                       seconds=times["ours"]))
            section.rows.append(Row.of(f"{name}: torchattacks", [batch / t for t in times["theirs"]], "img/s",
                                       seconds=times["theirs"]))
            r = section.rows[-3].summary
            log(f"  {name}: ours/torchattacks {r.median:.3f}x [{r.min:.3f}, {r.max:.3f}]  check {_fmt(check)}")
        _inference_form_rows(section, model, x, y, theirs=theirs, size=size, rounds=n_rounds, warmup=warmup, sync=sync, log=log)


def _inference_form_rows(section: Section, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, theirs: Any,
                         size: int, rounds: int, warmup: int, sync, log: Callable[[str], None]) -> None:
    """Where the pairs' ratio comes from, for FGSM and I-FGSM4, four contenders interleaved:
    ours as the pairs ran it (BatchNorms folded, channels-last, for the length of each call;
    :class:`raydefense.models.fusion.FoldedBatchNorms`), ours with ``fold_batch_norm = False``
    (the model as given), and ours and torchattacks both on the model's inference form (a folded
    copy, :func:`raydefense.models.fusion.inference_form`, which leaves ours nothing to fold).
    Rows: the fold's net gain (ours / ours as given), the attack code alone (ours / torchattacks
    on the same folded network: the same operations on both sides) and what folding at each call
    costs (ours on the model as built / ours on the folded copy), each with the fraction of output
    pixels on which both agree."""
    import copy

    from raydefense.attacks import create_attack
    from raydefense.models.fusion import inference_form

    fast = inference_form(copy.deepcopy(model))
    for label, name, cls, kw in (("FGSM", "fgsm", "FGSM", {}), ("I-FGSM4", "ifgsm4", "BIM", {"alpha": EPS / 4, "steps": 4})):
        ours, plain, ours_fast = (create_attack(name, m, eps=EPS) for m in (model, model, fast))
        plain.fold_batch_norm = False
        their = getattr(theirs, cls)(fast, eps=EPS, **kw)
        outputs = {"ours": ours(x, y), "plain": plain(x, y), "ours_fast": ours_fast(x, y), "theirs": their(x, y)}
        times = interleave({"ours": lambda: ours(x, y), "plain": lambda: plain(x, y),
                            "ours_fast": lambda: ours_fast(x, y), "theirs": lambda: their(x, y)},
                           rounds=rounds, warmup=warmup, sync=sync)
        for what, num, den in (("ours (BatchNorms folded) / ours on the model as given", "plain", "ours"),
                               ("ours / torchattacks, both on the inference form", "theirs", "ours_fast"),
                               ("ours on the model as built / on its inference form (folding at each call)",
                                "ours_fast", "ours")):
            agree = float(((outputs[num] - outputs[den]).abs() <= 1e-5).float().mean())
            section.rows.append(Row.of(f"{label} @ {size} px: {what}", paired_ratios(times[num], times[den]), "x",
                                       ratio=True, check={"pixels_agree": agree}, batch=len(x)))
            r = section.rows[-1].summary
            log(f"  {label} @ {size} px: {what} {r.median:.3f}x [{r.min:.3f}, {r.max:.3f}]  pixels agree {agree:.4f}")


def _fmt(check: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in check.items())
