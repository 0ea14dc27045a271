"""Tests for raydefense.attacks.square (Square Attack, Andriushchenko et al. ECCV 2020): the ball,
the query budget (counted by the model itself), success where gradients are masked, the
p schedule, seeding by generator, model state, restarts and bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import PGD, create_attack
from raydefense.attacks.square import Square, square_margin, square_p_schedule

K = 5


class Linear(nn.Module):
    """Linear logits of the centred image, small bias: margins of order 1, so eps of a few /255
    fools some images and not others."""

    def __init__(self, k=K, d=3 * 4 * 4, seed=0, scale=1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(scale * torch.randn(k, d, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(0.1 * torch.randn(k, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return F.linear(x.flatten(1) - 0.5, self.weight, self.bias)


class Counting(nn.Module):
    """Counts, per image, how often the model saw it: each test image carries its index in pixel
    (0, 0, 0), in a band the attack cannot move it out of (see ``tagged_batch``)."""

    def __init__(self, inner, b):
        super().__init__()
        self.inner = inner
        self.register_buffer("seen", torch.zeros(b, dtype=torch.long))

    def forward(self, x):
        ids = torch.round(x[:, 0, 0, 0].detach() * 10).long() - 1
        self.seen += torch.bincount(ids, minlength=self.seen.numel())
        return self.inner(x)


class Constant(nn.Module):
    """Logits that ignore the input: nothing can fool it, so every query is spent."""

    def __init__(self, k=K):
        super().__init__()
        self.logits = nn.Parameter(torch.arange(k, dtype=torch.float64))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class Quantized(nn.Module):
    """A non-differentiable step in front of a linear model: the input gradient is exactly 0."""

    def __init__(self, inner, levels=4):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner(torch.round(x * self.levels) / self.levels)


def batch(b=6, lo=0.3, hi=0.7, seed=0, shape=(3, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(b, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, K, (b,), generator=gen)


def tagged_batch(b, seed=0):
    """Images whose pixel (0, 0, 0) is 0.1 + i/10 for image i (b <= 9): a perturbation of at most
    2/255 keeps round(10 * v) - 1 == i, so :class:`Counting` can tell the images apart."""
    assert b <= 9
    x, y = batch(b, seed=seed)
    x[:, 0, 0, 0] = 0.1 + torch.arange(b, dtype=torch.float64) / 10
    return x, y


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_stays_in_ball_and_unit_range_with_per_image_eps():
    x, _ = batch(6, lo=0.0, hi=1.0)
    model = Linear()
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct, so all are attacked
    eps = torch.tensor([0.0, 1, 2, 4, 8, 80], dtype=torch.float64) / 255
    attack = Square(model, eps=eps, n_queries=200, generator=gen(0))
    adv = attack(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    dist = (adv - x).abs().amax(dim=(1, 2, 3))
    assert (dist <= eps + 1e-12).all(), dist
    assert adv.min() >= 0 and adv.max() <= 1
    assert torch.equal(adv[0], x[0])  # eps 0: nothing moves, and it costs only the clean query
    assert attack.last_queries[0] == 1
    # Square works at the corners of the ball: a moved image uses its own (not a shared) eps.
    moved = dist > 0
    assert moved[1:].all()
    assert torch.allclose(dist[moved], eps[moved])


@pytest.mark.parametrize("restarts", [1, 3])
def test_query_budget_is_spent_exactly_on_an_unbreakable_model(restarts):
    b, n = 5, 30
    x, _ = tagged_batch(b)
    y = torch.full((b,), K - 1)  # Constant always predicts K - 1: never fooled
    model = Counting(Constant(), b)
    attack = Square(model, eps=2 / 255, n_queries=n, restarts=restarts, generator=gen(0))
    adv = attack(x, y)
    budget = 1 + restarts * n  # the clean query, then n per restart
    assert model.seen.tolist() == [budget] * b
    assert attack.last_queries.tolist() == [budget] * b
    assert ((adv - x).abs() <= 2 / 255 + 1e-12).all()


def test_query_count_matches_the_model_and_fooled_images_stop():
    b, n = 8, 400
    x, y = tagged_batch(b, seed=1)
    inner = Linear(scale=3.0)  # large weights: 2/255 fools some images, not all
    with torch.no_grad():
        y = inner(x).argmax(1)  # all correct at the start
    model = Counting(inner, b)
    attack = Square(model, eps=2 / 255, n_queries=n, generator=gen(0))
    adv = attack(x, y)
    assert torch.equal(model.seen, attack.last_queries)
    assert (attack.last_queries <= 1 + n).all()
    with torch.no_grad():
        fooled = inner(adv).argmax(1) != y
    assert 0 < int(fooled.sum()) < b, fooled  # the test needs both kinds
    assert (attack.last_queries[fooled] < 1 + n).all()  # stopped once fooled
    assert (attack.last_queries[~fooled] == 1 + n).all()  # the rest spent everything


def test_misclassified_images_are_returned_unchanged_after_one_query():
    model = Linear()
    x, _ = batch(4)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % K
    attack = Square(model, eps=8 / 255, n_queries=50, generator=gen(0))
    assert torch.equal(attack(x, wrong), x)
    assert attack.last_queries.tolist() == [1] * 4


def test_fools_where_the_input_gradient_is_zero():
    """Gradient masking: PGD gets no signal through a rounding step, Square does not need one."""
    inner = Linear(scale=2.0)
    model = Quantized(inner)
    x, _ = batch(16, lo=0.2, hi=0.8, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 16 / 255
    x_in = x.requires_grad_(True)
    assert torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)[0].abs().max() == 0
    torch.manual_seed(0)
    pgd = PGD(model, eps=eps, steps=10, random_start=False)(x.detach(), y)
    sq = Square(model, eps=eps, n_queries=300, generator=gen(0))(x.detach(), y)
    with torch.no_grad():
        acc_pgd = (model(pgd).argmax(1) == y).double().mean().item()
        acc_sq = (model(sq).argmax(1) == y).double().mean().item()
    assert acc_pgd == 1.0  # no gradient, no movement
    assert acc_sq <= 0.5, acc_sq


def test_as_strong_as_pgd_on_a_linear_model():
    model = Linear()
    x, _ = batch(32, seed=5)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 12 / 255
    torch.manual_seed(0)
    pgd = PGD(model, eps=eps, steps=20)(x, y)
    sq = Square(model, eps=eps, n_queries=500, generator=gen(0))(x, y)
    with torch.no_grad():
        fooled_pgd = model(pgd).argmax(1) != y
        fooled_sq = model(sq).argmax(1) != y
    assert fooled_pgd.sum() >= 8  # not a trivial case
    assert fooled_sq.sum() >= fooled_pgd.sum() - 1


def test_targeted_reaches_the_target():
    model = Linear()
    x, _ = batch(8, seed=2)
    with torch.no_grad():
        logits = model(x)
    target = logits.argsort(1, descending=True)[:, 1]  # the runner-up: reachable
    adv = Square(model, eps=16 / 255, n_queries=300, targeted=True, generator=gen(0))(x, target)
    with torch.no_grad():
        hit = model(adv).argmax(1) == target
    assert hit.double().mean() >= 0.75, hit


def test_loss_only_goes_down_and_ce_variant_runs():
    model = Linear()
    x, _ = batch(8, seed=4)
    with torch.no_grad():
        y = model(x).argmax(1)
        start = square_margin(model(x), y)
    for loss in ("margin", "ce"):
        adv = Square(model, eps=4 / 255, n_queries=100, loss=loss, generator=gen(1))(x, y)
        with torch.no_grad():
            end = square_margin(model(adv), y)
        assert (end < start).all() if loss == "margin" else (end <= start + 1e-9).float().mean() > 0.5


def test_generator_reproducible_and_leaves_global_rng_alone():
    model = Linear()
    x, y = batch(6)
    state = torch.get_rng_state()
    a = Square(model, eps=4 / 255, n_queries=60, generator=gen(7))(x, y)
    b = Square(model, eps=4 / 255, n_queries=60, generator=gen(7))(x, y)
    c = Square(model, eps=4 / 255, n_queries=60, generator=gen(8))(x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)  # without a generator: torch's global RNG
    d = Square(model, eps=4 / 255, n_queries=60)(x, y)
    torch.manual_seed(3)
    assert torch.equal(Square(model, eps=4 / 255, n_queries=60)(x, y), d)


def test_model_state_untouched():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, K))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch(4)
    Square(model.float(), eps=4 / 255, n_queries=20, generator=gen(0))(x.float(), y)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k].to(v.dtype)) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_restarts_never_worse_than_one_run():
    model = Linear()
    x, _ = batch(16, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    one = Square(model, eps=3 / 255, n_queries=40, generator=gen(0))(x, y)
    three = Square(model, eps=3 / 255, n_queries=40, restarts=3, generator=gen(0))(x, y)
    with torch.no_grad():
        m1, m3 = square_margin(model(one), y), square_margin(model(three), y)
    # The first restart draws the same numbers; later ones can only lower an image's best loss.
    assert (m3 <= m1 + 1e-12).all()


def test_p_schedule_matches_the_paper():
    # Stated for 10,000 iterations (Andriushchenko et al. 2020, their code's p_selection).
    expected = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 500: 8, 501: 16, 1000: 16, 1001: 32,
                2000: 32, 2001: 64, 4000: 64, 4001: 128, 6000: 128, 6001: 256, 8000: 256, 8001: 512, 9999: 512}
    for it, div in expected.items():
        assert square_p_schedule(0.8, it, 10000) == pytest.approx(0.8 / div), it
    # Rescaled to the budget: iteration 1 of 100 is iteration 100 of 10,000.
    assert square_p_schedule(0.8, 1, 100) == pytest.approx(0.8 / 4)
    assert square_p_schedule(0.8, 99, 100) == pytest.approx(0.8 / 512)


def test_margin_values():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(square_margin(logits, y), torch.tensor([2.0, -2.0]))
    assert torch.allclose(square_margin(logits, torch.tensor([1, 1]), targeted=True), torch.tensor([2.0, -1.0]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        square_margin(logits, torch.tensor([0, 3]))


def test_registry_and_repr():
    model = Linear()
    attack = create_attack("square", model, eps=2 / 255, n_queries=10)
    assert type(attack) is Square and attack.eps == 2 / 255 and attack.n_queries == 10
    assert "n_queries=10" in repr(attack)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_queries": 0}, "n_queries"),
    ({"n_queries": 2.5}, "n_queries"),
    ({"restarts": 0}, "restarts"),
    ({"p_init": 0.0}, "p_init"),
    ({"p_init": 1.5}, "p_init"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"generator": 3}, "generator"),
    ({"eps": 2.0}, "above 1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Square(Linear(), **kwargs)


def test_bad_inputs():
    model = Linear(d=3)
    with pytest.raises(ValueError, match="2 x 2"):
        Square(model, n_queries=5)(torch.rand(2, 3, 1, 1, dtype=torch.float64), torch.tensor([0, 1]))
    x, y = batch(2)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        Square(Linear(), n_queries=5)(x, torch.tensor([0, K]))
