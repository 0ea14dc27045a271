"""Tests for raydefense.attacks: budgets, loss direction, exact FGSM/I-FGSM relations, per-image eps,
model state untouched, input checks, the registry, restarts and EOT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import FGSM, IFGSM, PGD, Attack, create_attack, list_attacks
from raydefense.attacks.base import attack_loss
from raydefense.models import create_model

K = 5  # classes



class Linear(nn.Module):
    """A linear classifier on flattened images: CE is convex in the input, so a signed-gradient
    step provably raises it, and the sign of the gradient can be checked in closed form."""

    def __init__(self, shape=(3, 4, 4), k=K, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d = shape[0] * shape[1] * shape[2]
        self.weight = nn.Parameter(torch.randn(k, d, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(k, generator=gen, dtype=dtype))

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


def batch(b=4, shape=(3, 4, 4), lo=0.25, hi=0.75, dtype=torch.float64, seed=0):
    """Images away from 0 and 1 (so clamping does not interfere) and labels."""
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(b, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, K, (b,), generator=gen)
    return x, y


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


ATTACKS = {
    "fgsm": lambda m, **kw: FGSM(m, **kw),
    "ifgsm": lambda m, **kw: IFGSM(m, steps=4, **kw),
    "pgd": lambda m, **kw: PGD(m, steps=5, alpha=2 / 255, **kw),
    "pgd_restarts": lambda m, **kw: PGD(m, steps=3, restarts=2, **kw),
}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=K, width=4).eval()


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_within_ball_and_unit_range(name):
    torch.manual_seed(0)
    model = Linear()
    x, y = batch(lo=0.0, hi=1.0)  # include pixels near the borders: clamping must hold
    eps = torch.tensor([0.0, 1 / 255, 8 / 255, 0.3], dtype=torch.float64)
    adv = ATTACKS[name](model, eps=eps)(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    dist = (adv - x).abs().flatten(1).amax(dim=1)
    assert torch.all(dist <= eps + 1e-12), dist
    assert torch.equal(adv[0], x[0])  # eps 0 -> unchanged
    assert dist[3] > 8 / 255  # a larger eps is used, not a shared one


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_zero_returns_input(name, small):
    x, y = batch(dtype=torch.float32, shape=(3, 16, 16))
    adv = ATTACKS[name](small, eps=0.0)(x, y)
    assert torch.equal(adv, x)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_per_image_eps_on_cnn(name, small):
    x, y = batch(b=3, dtype=torch.float32, shape=(3, 16, 16))
    eps = [0.0, 4 / 255, 16 / 255]
    adv = ATTACKS[name](small, eps=eps)(x, y)
    dist = (adv - x).abs().flatten(1).amax(dim=1)
    assert torch.equal(adv[0], x[0])
    assert torch.all(dist <= torch.tensor(eps) + 1e-6)
    assert dist[2] > 4 / 255 + 1e-6


def test_fgsm_is_eps_sign_gradient_exactly():
    model = Linear()
    x, y = batch()
    eps = 4 / 255
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    expected = (x + eps * xr.grad.sign()).clamp(0, 1)
    assert torch.equal(FGSM(model, eps=eps)(x, y), expected)
    # every pixel moves by exactly eps (no zero gradients, no clamping in [0.25, 0.75])
    assert torch.allclose((FGSM(model, eps=eps)(x, y) - x).abs(), torch.full_like(x, eps))


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_levels_equal_one_fgsm_per_level_exactly(small, targeted):
    """Figure 7's curve from one gradient: every level equals FGSM at that eps bit for bit,
    including pixels clipped at 0 and 1 and a float16 input (one call per level there)."""
    from raydefense.attacks import fgsm_levels

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 16, 16, generator=gen)
    x[:, :, :2] = 0.0  # clipping at both ends
    x[:, :, -2:] = 1.0
    y = torch.randint(0, K, (6,), generator=gen)
    levels = [2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.0]
    calls = []
    handle = small.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = fgsm_levels(small, x, y, levels, targeted=targeted)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward for every level
    for e, adv in zip(levels, got):
        assert torch.equal(adv, FGSM(small, eps=e, targeted=targeted)(x, y))
    assert not torch.equal(got[0], got[3])
    half = fgsm_levels(small, x.half(), y, levels[:2])
    assert all(torch.equal(a, FGSM(small, eps=e)(x.half(), y)) for e, a in zip(levels[:2], half))
    with pytest.raises(ValueError, match="above 1"):
        fgsm_levels(small, x, y, [8.0])
    with pytest.raises(ValueError, match="one number"):
        fgsm_levels(small, x, y, [[0.1, 0.2]])


# ------------------------------------------------------------------ loss direction
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_untargeted_raises_loss_linear(name):
    torch.manual_seed(0)
    model = Linear()
    x, y = batch()
    adv = ATTACKS[name](model, eps=4 / 255)(x, y)
    assert torch.all(ce(model, adv, y) > ce(model, x, y))  # provable for a convex loss


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_targeted_lowers_loss_towards_target(name):
    torch.manual_seed(0)
    model = Linear()
    x, y = batch()
    target = (y + 1) % K
    adv = ATTACKS[name](model, eps=1 / 255, targeted=True)(x, target)
    assert torch.all(ce(model, adv, target) < ce(model, x, target))
    untargeted = ATTACKS[name](model, eps=1 / 255)(x, target)
    assert not torch.equal(untargeted, adv)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_untargeted_raises_loss_cnn(name, small):
    torch.manual_seed(0)
    x, y = batch(b=4, dtype=torch.float32, shape=(3, 16, 16))
    adv = ATTACKS[name](small, eps=8 / 255)(x, y)
    assert ce(small, adv, y).mean() > ce(small, x, y).mean()


def test_more_steps_at_least_as_strong_as_fgsm():
    model = Linear()
    x, y = batch(b=8)
    eps = 8 / 255
    fgsm = ce(model, FGSM(model, eps=eps)(x, y), y)
    pgd = ce(model, PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=False)(x, y), y)
    ifgsm8 = ce(model, create_attack("ifgsm8", model, eps=eps)(x, y), y)
    assert pgd.mean() >= fgsm.mean() - 1e-9
    assert ifgsm8.mean() >= fgsm.mean() - 1e-9


def test_ifgsm_one_step_equals_fgsm(small):
    x, y = batch(b=3, dtype=torch.float32, shape=(3, 16, 16), lo=0.0, hi=1.0)
    for eps in (8 / 255, [1 / 255, 0.0, 0.1]):
        assert torch.equal(IFGSM(small, eps=eps, steps=1)(x, y), FGSM(small, eps=eps)(x, y))
    model = Linear()
    xd, yd = batch()
    assert torch.equal(IFGSM(model, eps=3 / 255, steps=1, targeted=True)(xd, yd), FGSM(model, eps=3 / 255, targeted=True)(xd, yd))


def test_ifgsm_default_alpha_is_eps_over_steps():
    class Bowl(nn.Module):
        """Untargeted CE on label 1 is maximal at x = centre: the attack oscillates around it."""

        def __init__(self, centre):
            super().__init__()
            self.register_buffer("centre", centre)

        def forward(self, x):
            z0 = -1000 * ((x - self.centre) ** 2).flatten(1).sum(1)
            return torch.stack([z0, torch.zeros_like(z0)], dim=1)

    eps = 8 / 255
    x, _ = batch(b=2)
    y = torch.ones(2, dtype=torch.long)
    model = Bowl(x + 0.3 * eps)
    # alpha = eps/4: +0.25 (below 0.3), +0.5 (above), +0.25, +0.5 -> ends at x + eps/2
    adv = IFGSM(model, eps=eps, steps=4)(x, y)
    assert torch.allclose(adv - x, torch.full_like(x, eps / 2), atol=1e-12)
    assert torch.equal(adv, IFGSM(model, eps=eps, steps=4, alpha=eps / 4)(x, y))
    # alpha = eps would end where it started (+1, 0, +1, 0)
    assert torch.allclose(IFGSM(model, eps=eps, steps=4, alpha=eps)(x, y), x, atol=1e-12)


def test_pgd_random_start_differs_and_is_seeded():
    model = Linear()
    x, y = batch()
    torch.manual_seed(1)
    a = PGD(model, eps=8 / 255, steps=1)(x, y)
    torch.manual_seed(1)
    b = PGD(model, eps=8 / 255, steps=1)(x, y)
    torch.manual_seed(2)
    c = PGD(model, eps=8 / 255, steps=1)(x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_start = PGD(model, eps=8 / 255, alpha=8 / 255, steps=1, random_start=False)(x, y)
    assert torch.equal(no_start, FGSM(model, eps=8 / 255)(x, y))


def test_pgd_restarts_keep_the_best_per_image():
    model = Linear()
    x, y = batch(b=8)
    eps = 8 / 255
    torch.manual_seed(3)
    best = PGD(model, eps=eps, steps=2, restarts=4)(x, y)
    torch.manual_seed(3)
    singles = [PGD(model, eps=eps, steps=2)(x, y) for _ in range(4)]  # the same four runs
    losses = torch.stack([ce(model, s, y) for s in singles])
    fooled = torch.stack([model(s).argmax(1) != y for s in singles])
    for i in range(x.shape[0]):
        candidates = losses[:, i][fooled[:, i]] if fooled[:, i].any() else losses[:, i]
        assert torch.isclose(ce(model, best[i : i + 1], y[i : i + 1])[0], candidates.max())


def test_pgd_dlr_loss_runs_and_raises_margin():
    model = Linear()
    x, y = batch()
    adv = PGD(model, eps=4 / 255, steps=5, loss="dlr")(x, y)
    with torch.no_grad():
        assert (attack_loss(model(adv), y, loss="dlr") > attack_loss(model(x), y, loss="dlr")).all()
    with pytest.raises(ValueError, match="at least 3 classes"):
        attack_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), loss="dlr")


def test_pgd_eot_averages_gradients():
    class Noisy(nn.Module):
        """A randomised model: counts forward passes."""

        def __init__(self):
            super().__init__()
            self.inner = Linear()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x + 0.01 * torch.randn_like(x))

    model = Noisy()
    x, y = batch()
    adv = PGD(model, eps=4 / 255, steps=3, eot_samples=5)(x, y)
    assert model.calls == 15
    assert ((adv - x).abs() <= 4 / 255 + 1e-12).all()


# ------------------------------------------------------------------ model and inputs untouched
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_model_state_and_inputs_untouched(name):
    model = create_model("small_cnn", num_classes=K, width=4)
    model.train()
    model.net.features[0].eval()  # a mixed state must come back as it was
    params = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    x, y = batch(dtype=torch.float32, shape=(3, 16, 16))
    x.requires_grad_(True)
    x_before = x.detach().clone()
    adv = ATTACKS[name](model, eps=8 / 255)(x, y)
    assert model.training and not model.net.features[0].training and model.net.features[1].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())  # BN stats too
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert x.requires_grad and x.grad is None and torch.equal(x.detach(), x_before)
    assert not adv.requires_grad and adv.grad_fn is None


def test_works_under_no_grad_and_inference_mode(small):
    x, y = batch(dtype=torch.float32, shape=(3, 16, 16))
    expected = FGSM(small, eps=4 / 255)(x, y)
    with torch.no_grad():
        assert torch.equal(FGSM(small, eps=4 / 255)(x, y), expected)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        assert torch.equal(FGSM(small, eps=4 / 255)(xi, yi), expected)


def test_model_mode_restored_after_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        FGSM(model)(*batch(dtype=torch.float32))
    assert model.training


# ------------------------------------------------------------------ boundary checks
@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long), "4-D"),
        (torch.randint(0, 2, (2, 3, 4, 4)), torch.zeros(2, dtype=torch.long), "float"),
        (torch.rand(2, 3, 4, 4) + 1.0, torch.zeros(2, dtype=torch.long), r"\[0, 1\].*max"),
        (torch.full((2, 3, 4, 4), float("nan")), torch.zeros(2, dtype=torch.long), r"\[0, 1\]"),
        (torch.rand(2, 3, 4, 4), torch.zeros(3, dtype=torch.long), "one entry per image"),
        (torch.rand(2, 3, 4, 4), torch.zeros(2), "integer"),
        (torch.rand(2, 3, 4, 4), [0, 1], "1-D tensor"),
    ],
)
def test_bad_inputs_rejected(images, labels, match):
    model = Linear(dtype=torch.float32)
    with pytest.raises(ValueError, match="FGSM: .*" + match):
        FGSM(model)(images, labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": -0.1}, ">= 0"),
        ({"eps": 8}, "did you mean 8/255"),
        ({"eps": float("nan")}, "finite"),
        ({"eps": [[0.1, 0.2]]}, "1-D"),
        ({"eps": [0.1, 2.0]}, r"\[0, 1\]"),
        ({"eps": "big"}, "float or a 1-D sequence"),
    ],
)
def test_bad_eps_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FGSM(Linear(), **kwargs)


def test_per_image_eps_length_must_match():
    with pytest.raises(ValueError, match="3 values for a batch of 4"):
        FGSM(Linear(), eps=[0.1, 0.1, 0.1])(*batch())


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError, match="steps"):
        IFGSM(Linear(), steps=0)
    with pytest.raises(ValueError, match="restarts"):
        PGD(Linear(), restarts=0)
    with pytest.raises(ValueError, match="eot_samples"):
        PGD(Linear(), eot_samples=True)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        PGD(Linear(), loss="hinge")
    with pytest.raises(TypeError, match="nn.Module"):
        FGSM(lambda x: x)


def test_output_on_model_device_and_input_dtype():
    model = Linear()
    x, y = batch()
    adv = PGD(model, steps=1)(x, y)
    assert adv.device == next(model.parameters()).device and adv.dtype == torch.float64


# ------------------------------------------------------------------ registry
def test_registry_names():
    assert list_attacks() == ["apgd", "apgd_dlr", "fgsm", "ifgsm", "ifgsm2", "ifgsm4", "ifgsm8", "pgd", "square"]
    model = Linear()
    assert create_attack("apgd", model, eps=2 / 255).loss == "ce"
    assert create_attack("apgd_dlr", model, eps=2 / 255).loss == "dlr"
    for name, cls, steps in [("fgsm", FGSM, None), ("ifgsm2", IFGSM, 2), ("ifgsm4", IFGSM, 4), ("ifgsm8", IFGSM, 8), ("pgd", PGD, 10)]:
        attack = create_attack(name, model, eps=2 / 255)
        assert type(attack) is cls and attack.eps == 2 / 255
        assert isinstance(attack, Attack)
        if steps is not None:
            assert attack.steps == steps
    assert create_attack("ifgsm", model, steps=3).steps == 3
    x, y = batch()
    assert torch.equal(create_attack("ifgsm4", model, eps=4 / 255)(x, y), IFGSM(model, eps=4 / 255, steps=4)(x, y))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown attack 'cw'.*fgsm, ifgsm, ifgsm2, ifgsm4, ifgsm8, pgd"):
        create_attack("cw", Linear())
    with pytest.raises(ValueError, match="'ifgsm4' fixes steps=4"):
        create_attack("ifgsm4", Linear(), steps=2)


def test_attack_gradient_gradcheck_of_loss():
    """The objective the attacks climb is differentiable in float64 (both losses)."""
    model = Linear()
    x, y = batch(b=2)
    x.requires_grad_(True)
    for loss in ("ce", "dlr"):
        assert torch.autograd.gradcheck(lambda t: attack_loss(model(t), y, loss=loss), (x,), fast_mode=True)
