"""Tests for raydefense.robust.masking: the comparison rule, each check on hand-made numbers
(pass, fail, not run), the summary and the markdown table; and, end to end on tiny models with
real attacks, that the checks flag deliberately masked models (saturated logits, a rounding step)
and pass an undefended one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import PGD, Square
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

E2, E4, E8 = 2 / 255, 4 / 255, 8 / 255


# ------------------------------------------------------------------ records and the rule
def test_accuracy_record_and_conversions():
    a = Accuracy(30, 40)
    assert a.value == 0.75
    lo, hi = a.interval
    assert 0 < lo < 0.75 < hi < 1
    assert Accuracy.of((30, 40)) == a == Accuracy.of(0.75, 40) == Accuracy.of({"accuracy": 0.75, "n": 40, "ci95": [0, 1]})
    assert Accuracy.of(a) is a
    assert "75.0%" in str(a) and "n=40" in str(a)
    assert Accuracy.of((np.int64(3), np.int32(4))) == Accuracy(3, 4)
    with pytest.raises(ValueError, match="two integers"):
        Accuracy.of((2.7, 10))
    with pytest.raises(ValueError, match="whole number"):
        Accuracy.of(0.3, 7)
    with pytest.raises(ValueError, match="needs n"):
        Accuracy.of(0.5)
    with pytest.raises(ValueError, match="correct"):
        Accuracy(5, 4)
    with pytest.raises(ValueError, match="n >= 1"):
        Accuracy(0, 0)
    with pytest.raises(ValueError, match="'accuracy' and 'n'"):
        Accuracy.of({"accuracy": 0.5})


def test_differs_needs_each_estimate_outside_the_other_interval():
    assert differs(Accuracy(90, 100), Accuracy(50, 100)) == 1
    assert differs(Accuracy(50, 100), Accuracy(90, 100)) == -1
    assert differs(Accuracy(50, 100), Accuracy(50, 100)) == 0
    assert differs(Accuracy(55, 100), Accuracy(50, 100)) == 0  # within noise
    # The same gap is noise with 10 images and a difference with 1000.
    assert differs(Accuracy(6, 10), Accuracy(4, 10)) == 0
    assert differs(Accuracy(600, 1000), Accuracy(400, 1000)) == 1


# ------------------------------------------------------------------ each check
def test_eps_monotone():
    ok = check_eps_monotone({E2: (80, 100), E4: (60, 100), E8: (62, 100)})  # a small rise is noise
    assert ok.passed is True and ok.check == "eps_monotone"
    bad = check_eps_monotone({E2: (40, 100), E4: (45, 100), E8: (70, 100)})  # a slow rise: 2 -> 8 caught
    assert bad.passed is False
    assert bad.details["rises"] == [[E2, E8], [E4, E8]]
    assert "40.0%" in bad.numbers and "70.0%" in bad.numbers and "8/255" in bad.numbers
    assert check_eps_monotone({E8: (3, 10)}).passed is None
    with pytest.raises(ValueError, match="eps"):
        check_eps_monotone({-1.0: (1, 2), E2: (1, 2)})


def test_large_eps():
    assert check_large_eps(0.5, (0, 100)).passed is True
    assert check_large_eps(0.5, (1, 24)).passed is True  # one survivor of 24: consistent with ~0
    bad = check_large_eps(0.5, (3, 24))
    assert bad.passed is False and "12.5%" in bad.numbers and "127.5/255" in bad.numbers
    assert check_large_eps(1.0, (20, 100)).passed is False
    assert check_large_eps(1.0, (20, 100), tolerance=0.5).passed is True
    with pytest.raises(ValueError, match="tolerance"):
        check_large_eps(1.0, (0, 10), tolerance=1.0)


def test_stronger_attack_both_directions():
    assert check_stronger_attack((50, 200), (47, 200)).passed is True
    lower = check_stronger_attack((100, 200), (40, 200), what="2x steps")
    assert lower.passed is False and "not converged" in lower.numbers and "2x steps" in lower.numbers
    higher = check_stronger_attack((40, 200), (100, 200), what="2x restarts")
    assert higher.passed is False and "unstable" in higher.numbers


def test_gradient_free_and_transfer_compare_with_the_best_attack_per_eps():
    gradient = {"pgd": {E4: (60, 200), E8: (30, 200)}, "apgd": {E4: (50, 200), E8: (10, 200)}}
    assert check_gradient_free({E4: (55, 200), E8: (12, 200)}, gradient).passed is True
    bad = check_gradient_free({E4: (52, 200), E8: (0, 200)}, gradient)  # Square beats APGD at 8/255
    assert bad.passed is False and bad.details["stronger_at"] == [E8]
    # against PGD alone 0/200 vs 30/200 also fails; against APGD at 4/255 a small gap is fine
    assert check_transfer({E4: (190, 200)}, gradient).passed is True
    assert check_transfer({E4: (10, 200)}, gradient).passed is False
    assert check_transfer({E2: (10, 200)}, gradient).passed is None  # no shared eps


def test_masking_checks_reports_every_check_and_flags():
    gradient = {"pgd": {E2: (80, 100), E8: (20, 100)}}
    full = masking_checks(gradient=gradient, gradient_free={E8: (25, 100)}, transfer={E8: (50, 100)},
                          large_eps=(0.5, (0, 100)), stronger=[("PGD 2x steps", (20, 100), (18, 100))])
    assert [c.check for c in full] == ["eps_monotone", "large_eps", "stronger_attack", "gradient_free", "transfer"]
    assert all(c.passed is True for c in full)
    partial = masking_checks(gradient=gradient)
    assert [c.passed for c in partial] == [True, None, None, None, None]
    masked = masking_checks(gradient=gradient, gradient_free={E8: (2, 100)})
    results = {"none": full, "uddn": masked, "jpeg": partial}
    assert flagged(results) == ["uddn"]
    with pytest.raises(ValueError, match="gradient"):
        masking_checks(gradient={})


def test_render_markdown():
    results = {"uddn|kt": [CheckResult("large_eps", False, "40.0% at 127.5/255"), CheckResult("transfer", None, "not measured")],
               "none": [CheckResult("large_eps", True, "0.0%")]}
    text = render_markdown(results)
    lines = text.splitlines()
    assert lines[0] == "| defense | check | result | numbers |"
    assert "| uddn\\|kt | large_eps | **FAIL** | 40.0% at 127.5/255 |" in lines
    assert "| uddn\\|kt | transfer | not run | not measured |" in lines
    assert "| none | large_eps | PASS | 0.0% |" in lines
    assert "Flagged (a masking check failed): uddn|kt." in text
    assert "No defense failed" in render_markdown({"none": results["none"]})
    assert results["none"][0].to_dict() == {"check": "large_eps", "passed": True, "numbers": "0.0%", "details": {}}


# ------------------------------------------------------------------ end to end on tiny models
K, D, N = 4, 48, 200


class LinearNet(nn.Module):
    """Linear logits of the centred image; ``scale`` saturates them, ``levels`` rounds the input
    first (a non-differentiable step): the two classic ways to mask gradients."""

    def __init__(self, weight, *, scale=1.0, levels=None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.scale, self.levels = scale, levels

    def forward(self, x):
        if self.levels:
            x = torch.round(x * self.levels) / self.levels
        return self.scale * F.linear(x.flatten(1) - 0.5, self.weight)


@pytest.fixture(scope="module")
def task():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(K, D, generator=gen)
    y = torch.arange(N) % K
    x = (0.5 + 0.04 * means[y] + 0.06 * torch.randn(N, D, generator=gen)).clamp(0, 1).view(N, 3, 4, 4)
    surrogate = LinearNet(means + 0.5 * torch.randn(K, D, generator=torch.Generator().manual_seed(5)))
    return means, x, y, surrogate


def measure(model, surrogate, x, y):
    """What the evaluation measures per defense, on ``N`` images: PGD-10 and PGD-20 at 4 and
    8/255, PGD at eps 0.5, Square (200 queries) and PGD transferred from the surrogate."""
    def acc(adv):
        with torch.no_grad():
            return Accuracy(int((model(adv).argmax(1) == y).sum()), len(y))

    torch.manual_seed(0)
    pgd = {e: acc(PGD(model, eps=e, steps=10)(x, y)) for e in (E4, E8)}
    pgd20 = acc(PGD(model, eps=E8, steps=20)(x, y))
    big = acc(PGD(model, eps=0.5, steps=10, alpha=0.1)(x, y))
    square = {e: acc(Square(model, eps=e, n_queries=200, generator=torch.Generator().manual_seed(0))(x, y)) for e in (E4, E8)}
    transfer = {e: acc(PGD(surrogate, eps=e, steps=10)(x, y)) for e in (E4, E8)}
    return masking_checks(gradient={"pgd": pgd}, gradient_free=square, transfer=transfer, large_eps=(0.5, big),
                          stronger=[("PGD 2x steps at 8/255", pgd[E8], pgd20)])


def test_undefended_model_passes_every_check(task):
    means, x, y, surrogate = task
    results = measure(LinearNet(means), surrogate, x, y)
    assert all(c.passed is True for c in results), render_markdown({"none": results})


@pytest.mark.parametrize("masking", ["saturated_logits", "rounding_step"])
def test_masked_model_is_flagged(task, masking):
    means, x, y, surrogate = task
    model = LinearNet(means, scale=1e4) if masking == "saturated_logits" else LinearNet(means, levels=16)
    results = measure(model, surrogate, x, y)
    by_name = {c.check: c.passed for c in results}
    # PGD gets (almost) no gradient: Square and transfer beat it, and a huge eps does not reach 0.
    assert by_name["gradient_free"] is False, render_markdown({masking: results})
    assert by_name["large_eps"] is False
    assert by_name["transfer"] is False
    assert flagged({masking: results, "none": []}) == [masking]
