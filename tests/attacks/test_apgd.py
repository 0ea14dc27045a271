"""Tests for raydefense.attacks.apgd (APGD, Croce & Hein 2020): the checkpoint schedule, the
budget, optimality on a linear model, step-size halving, restarts that only re-attack what
is left, EOT, model state and bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import PGD
from raydefense.attacks.apgd import APGD, apgd_checkpoints

K = 5



class Linear(nn.Module):
    """Linear logits: the CE maximiser over an L-inf ball (away from the [0, 1] walls) is known."""

    def __init__(self, k=K, d=3 * 4 * 4, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, d, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(k, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


class Constant(nn.Module):
    """Logits that ignore the input: no attack can change anything."""

    def __init__(self, k=K):
        super().__init__()
        self.logits = nn.Parameter(torch.arange(k, dtype=torch.float64))
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def batch(b=4, lo=0.3, hi=0.7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(b, 3, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, K, (b,), generator=gen)


def test_checkpoints_follow_the_paper():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 2, 3, 7, 20, 250):
        w = apgd_checkpoints(steps)
        assert w == sorted(set(w)) and 1 <= w[0] and w[-1] <= steps
    assert apgd_checkpoints(1) == [1]
    with pytest.raises(ValueError, match="steps"):
        apgd_checkpoints(0)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_stays_in_ball_and_unit_range_with_per_image_eps(loss):
    model = Linear()
    x, y = batch(6, lo=0.0, hi=1.0)
    eps = torch.tensor([0.0, 1, 2, 4, 8, 16], dtype=torch.float64) / 255
    adv = APGD(model, eps=eps, steps=10, loss=loss)(x, y)
    assert adv.shape == x.shape and not adv.requires_grad
    assert ((adv - x).abs().amax(dim=(1, 2, 3)) <= eps + 1e-12).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv[0], x[0])  # eps 0: nothing moves


def test_reaches_the_exact_optimum_on_a_linear_model():
    """For linear logits and two classes the CE maximiser in the ball is x - eps sign(w_y - w_o)."""
    model = Linear(k=2)
    x, _ = batch(8)
    y = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(3))
    eps = 4 / 255
    direction = model.weight[y] - model.weight[1 - y]  # (B, D)
    best = (x.flatten(1) - eps * direction.sign()).reshape_as(x)
    adv = APGD(model, eps=eps, steps=20)(x, y)
    with torch.no_grad():
        got = F.cross_entropy(model(adv), y, reduction="none")
        opt = F.cross_entropy(model(best), y, reduction="none")
    assert torch.allclose(got, opt, rtol=0, atol=1e-9)


def test_at_least_as_strong_as_pgd_on_a_small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, K)).double()
    x, y = batch(16, lo=0.0, hi=1.0)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correctly classified
    eps = 2 / 255
    torch.manual_seed(1)
    apgd_loss = F.cross_entropy(model(APGD(model, eps=eps, steps=30)(x, y)), y).item()
    torch.manual_seed(1)
    pgd_loss = F.cross_entropy(model(PGD(model, eps=eps, alpha=eps / 4, steps=30)(x, y)), y).item()
    assert apgd_loss >= pgd_loss - 1e-6


def test_step_halves_at_every_checkpoint_without_progress():
    """A model whose loss never moves fails condition (1) at each checkpoint: eta = 2 eps / 2^#checkpoints."""
    x, y = batch(3)
    eps = 8 / 255
    attack = APGD(Constant(), eps=eps, steps=10)
    attack(x, y)
    halvings = len(apgd_checkpoints(10))
    assert torch.allclose(attack.last_step_size, torch.full((3,), 2 * eps / 2 ** halvings, dtype=torch.float64))


def test_step_not_halved_while_the_loss_keeps_rising():
    """One step from the clean image on linear logits raises the loss: neither condition holds at
    the checkpoint (w_1 = 1), so the step stays 2 eps."""
    model = Linear()
    x, y = batch(4)
    attack = APGD(model, eps=8 / 255, steps=1, random_start=False)
    attack(x, y)
    assert torch.allclose(attack.last_step_size, torch.full((4,), 2 * 8 / 255, dtype=torch.float64))


def test_restarts_only_attack_images_not_yet_fooled():
    model = Constant()  # predicts class K-1 for everything
    x, _ = batch(4)
    y = torch.tensor([K - 1, 0, K - 1, 1])  # images 1 and 3 are "fooled" from the start
    APGD(model, eps=4 / 255, steps=2, restarts=3)(x, y)
    # first restart: the whole batch; later ones: the two images still classified correctly
    assert model.calls[:3] == [4, 4, 4] and set(model.calls[3:]) == {2}


def test_eot_averages_forward_passes():
    model = Constant()
    x, y = batch(2)
    APGD(model, eps=4 / 255, steps=3, eot_samples=4)(x, y)
    assert len(model.calls) == (3 + 1) * 4  # start point + 3 steps, 4 samples each


def test_model_state_and_inputs_untouched():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(0.5), nn.Linear(16, K)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(4)
    x0 = x.clone()
    APGD(model, eps=4 / 255, steps=3)(x, y)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x0)


def test_dlr_needs_three_classes():
    model = Linear(k=2)
    x, _ = batch(2)
    with pytest.raises(ValueError, match="at least 3 classes"):
        APGD(model, eps=4 / 255, steps=2, loss="dlr")(x, torch.tensor([0, 1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"restarts": 0}, "restarts"), ({"eot_samples": 0}, "eot_samples"),
    ({"loss": "hinge"}, "unknown loss"), ({"rho": 1.5}, "rho"), ({"momentum": -0.1}, "momentum"),
    ({"eps": 8}, "above 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APGD(Linear(), **kwargs)
