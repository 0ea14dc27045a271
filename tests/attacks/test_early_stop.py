"""``early_stop`` in PGD and APGD (the evaluation's setting): an image stops at its first
fooling iterate. It must never make the attack weaker, must stay in the ball, and must spend
fewer gradient rows when images fall early."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import PGD
from raydefense.attacks.apgd import APGD

K = 5


class CountingLinear(nn.Module):
    """Linear logits in float64; counts the rows of every forward pass."""

    def __init__(self, seed=0, scale=1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(scale * torch.randn(K, 3 * 4 * 4, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(K, dtype=torch.float64))
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return F.linear(x.flatten(1), self.weight, self.bias)


def clean_batch(model, b=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image right clean
    model.rows = 0
    return x, y


def fooled(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(1) != y


def make(kind, model, eps, early, restarts=1, steps=10):
    if kind == "pgd":
        return PGD(model, eps=eps, alpha=eps / 4, steps=steps, restarts=restarts, early_stop=early)
    return APGD(model, eps=eps, steps=steps, restarts=restarts, early_stop=early)


@pytest.mark.parametrize("kind", ["pgd", "apgd"])
@pytest.mark.parametrize("eps", [0.01, 0.03, 0.1])  # PGD-10 breaks about 8%, 38%, 86% of them
@pytest.mark.parametrize("restarts", [1, 3])
def test_early_stop_is_never_weaker_and_stays_in_the_ball(kind, eps, restarts):
    model = CountingLinear()
    x, y = clean_batch(model)
    runs = {}
    for early in (False, True):
        torch.manual_seed(0)
        adv = make(kind, model, eps, early, restarts).with_image_seeds(list(range(len(x))))(x, y)
        assert (adv - x).abs().max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
        runs[early] = fooled(model, adv, y)
    # Same random starts (image seeds): every image the classic attack breaks, the early-stopped
    # one breaks too (its fooling iterate is kept instead of walked past).
    assert bool((runs[True] | ~runs[False]).all())
    if kind == "apgd":  # APGD returns a fooling point either way: the same images fall
        assert torch.equal(runs[True], runs[False])


@pytest.mark.parametrize("kind", ["pgd", "apgd"])
def test_early_stop_spends_fewer_rows_when_images_fall_early(kind):
    model = CountingLinear()
    x, y = clean_batch(model)
    used = {}
    for early in (False, True):
        model.rows = 0
        adv = make(kind, model, 0.3, early).with_image_seeds(list(range(len(x))))(x, y)
        used[early] = model.rows
        assert bool(fooled(model, adv, y).all())  # a large budget breaks every image
    assert used[True] < 0.5 * used[False], used


def test_pgd_early_stop_keeps_the_first_fooling_iterate():
    """An image fooled by the random start is returned as that start, untouched by steps."""
    model = CountingLinear()
    x, y = clean_batch(model, b=16)
    eps = 0.3
    seeds = list(range(len(x)))
    start = PGD(model, eps=eps).with_image_seeds(seeds).uniform_start(x, torch.tensor(eps, dtype=x.dtype))
    at_start = fooled(model, start, y)
    assert at_start.any()
    adv = PGD(model, eps=eps, alpha=eps / 4, steps=5, early_stop=True).with_image_seeds(seeds)(x, y)
    assert torch.equal(adv[at_start], start[at_start])


def test_pgd_early_stop_restarts_only_attack_what_is_left():
    model = CountingLinear()
    x, y = clean_batch(model, b=32)
    attack = PGD(model, eps=0.03, alpha=0.01, steps=4, restarts=3, early_stop=True).with_image_seeds(range(32))
    model.rows = 0
    adv = attack(x, y)
    broken = int(fooled(model, adv, y).sum())
    assert 0 < broken < 32  # a budget that breaks some images, not all
    # Without shrinking, 3 restarts x (4 gradient + 1 check) passes over 32 rows = 480 rows.
    assert model.rows - 32 < 480


def test_pgd_early_stop_per_image_eps_and_eot():
    model = CountingLinear()
    x, y = clean_batch(model, b=12)
    eps = torch.linspace(0.0, 0.05, 12, dtype=torch.float64)
    adv = PGD(model, eps=eps, alpha=eps / 4, steps=6, eot_samples=2, early_stop=True)(x, y)
    assert bool(((adv - x).abs().flatten(1).amax(1) <= eps + 1e-12).all())
    assert torch.equal(adv[0], x[0])  # eps 0: nothing moves
    assert "early_stop=True" in repr(PGD(model, early_stop=True))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_early_stop_under_no_grad_and_inference_mode(mode):
    model = CountingLinear()
    x, y = clean_batch(model)
    with mode():
        for attack in (PGD(model, eps=0.1, early_stop=True, restarts=2), APGD(model, eps=0.1, steps=5, early_stop=True)):
            adv = attack(x, y)
            assert (adv - x).abs().max() <= 0.1 + 1e-12
            assert bool(fooled(model, adv, y).any())
