"""GNR (Li & Wang 2019, section 2): generator, critic, gradient penalty, WGAN-GP step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydefense.errors import ConfigError
from raydefense.gnr import (
    CRITIC_NORMS,
    Critic,
    DeconvUnit,
    Generator,
    critic_loss,
    critic_step,
    generator_loss,
    generator_step,
    gradient_penalty,
    make_optimizers,
    train_step,
)



TINY_G = dict(z_dim=8, widths=(8, 8, 4), kernel_size=3)
TINY_D = dict(widths=(4, 8, 8, 8), kernel_size=3)


class LinearCritic(nn.Module):
    """F(x) = <w, flatten(x)>: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


# --- generator ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 80, 160, 75, (75, 60)])
def test_generator_shapes(size):
    gen = Generator(image_size=size, channels=3, **TINY_G)
    noise = gen(torch.randn(2, 8))
    h, w = (size, size) if isinstance(size, int) else size
    assert noise.shape == (2, 3, h, w)


def test_deconv_unit_doubles_size_with_shortcut():
    unit = DeconvUnit(4, 6, kernel_size=5).eval()
    x = torch.randn(2, 4, 5, 7)
    out = unit(x)
    assert out.shape == (2, 6, 10, 14)
    up = unit.up(x)
    torch.testing.assert_close(out, up + unit.body(up))  # shortcut around the three convs


def test_generator_noise_bounded_and_bound_is_reached():
    gen = Generator(image_size=16, channels=3, max_noise=8 / 255, **TINY_G)
    with torch.no_grad():
        # Crank the output layer so tanh saturates: the bound must hold and be reached.
        gen.to_noise.weight.mul_(1e4)
        noise = gen(torch.randn(4, 8))
    assert noise.abs().max() <= 8 / 255 + 1e-7
    assert noise.abs().max() > 0.99 * 8 / 255


def test_generator_sample_seeded_and_on_model_dtype():
    gen = Generator(image_size=16, channels=1, **TINY_G).double().eval()
    a = gen.sample(3, generator=torch.Generator().manual_seed(0))
    b = gen.sample(3, generator=torch.Generator().manual_seed(0))
    c = gen.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_rejects_bad_arguments_and_inputs():
    with pytest.raises(ConfigError, match="widths"):
        Generator(image_size=16, widths=(8, 8))
    with pytest.raises(ConfigError, match="max_noise"):
        Generator(image_size=16, max_noise=0.0)
    with pytest.raises(ConfigError, match="image_size"):
        Generator(image_size=0)
    with pytest.raises(ConfigError, match="kernel_size"):
        Generator(image_size=16, kernel_size=4)
    gen = Generator(image_size=16, **TINY_G)
    with pytest.raises(ValueError, match="z of shape"):
        gen(torch.randn(2, 9))


# --- critic ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", CRITIC_NORMS)
@pytest.mark.parametrize("size", [32, 75])
def test_critic_runs_for_every_norm(norm, size):
    critic = Critic(image_size=size, channels=3, norm=norm, **TINY_D)
    x = torch.randn(3, 3, size, size, requires_grad=True)
    score = critic(x)
    assert score.shape == (3,)
    score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_critic_layer_norm_is_per_sample_batch_norm_is_not():
    """Why 'layer' is the default: a sample's score must not depend on the rest of the batch."""
    x = torch.randn(4, 1, 16, 16)
    for norm, independent in (("layer", True), ("batch", False)):
        critic = Critic(image_size=16, channels=1, norm=norm, **TINY_D).train()
        alone = critic(x[:1])
        together = critic(x)[:1]
        assert torch.allclose(alone, together, atol=1e-5) is independent, norm


def test_critic_bad_norm_and_bad_input():
    with pytest.raises(ValueError, match="'spectral'"):
        Critic(image_size=16, norm="spectral")
    critic = Critic(image_size=16, channels=3, **TINY_D)
    with pytest.raises(ValueError, match="Critic expects"):
        critic(torch.randn(2, 3, 17, 16))


# --- gradient penalty and losses ---------------------------------------------------------

def test_gradient_penalty_matches_per_sample_autograd():
    torch.manual_seed(0)
    critic = Critic(image_size=8, channels=2, norm="layer", **TINY_D).double()
    real = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    fake = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    eps = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)

    expected = []
    for i in range(3):
        xi = (eps[i] * real[i] + (1 - eps[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(xi).sum(), xi)
        expected.append((g.norm() - 1) ** 2)
    expected = torch.stack(expected).mean()

    got = gradient_penalty(critic, real, fake, eps=eps)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gradient_penalty_of_linear_critic_is_exact():
    w = torch.randn(2 * 4 * 4, dtype=torch.float64)
    real = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    fake = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    # ||w|| = 1: a 1-Lipschitz critic with unit gradient everywhere -> no penalty.
    gp = gradient_penalty(LinearCritic(w / w.norm()), real, fake, generator=gen)
    assert gp.abs() < 1e-20
    # ||w|| = 3: the gradient norm is 3 everywhere -> (3 - 1)^2 = 4.
    gp = gradient_penalty(LinearCritic(3 * w / w.norm()), real, fake, generator=gen)
    torch.testing.assert_close(gp, torch.tensor(4.0, dtype=torch.float64))


def test_gradient_penalty_is_seeded_and_backpropagates_to_critic():
    critic = Critic(image_size=8, channels=1, **TINY_D)
    real, fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    a = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3))
    b = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    a.backward()
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    with pytest.raises(ValueError, match="eps must have shape"):
        gradient_penalty(critic, real, fake, eps=torch.rand(3))
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(critic, real, fake[:2])


def test_critic_and_generator_loss_values():
    w = torch.randn(16, dtype=torch.float64)
    critic = LinearCritic(3 * w / w.norm())
    real = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    fake = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    loss, stats = critic_loss(critic, real, fake, gp_weight=10.0)
    f_real = (real.flatten(1) @ critic.w).mean()
    f_fake = (fake.flatten(1) @ critic.w).mean()
    torch.testing.assert_close(stats["wasserstein"], (f_real - f_fake).detach())
    torch.testing.assert_close(stats["gradient_penalty"], torch.tensor(4.0, dtype=torch.float64))
    torch.testing.assert_close(loss, f_fake - f_real + 40.0)
    torch.testing.assert_close(generator_loss(critic, fake), -f_fake)
    with pytest.raises(ConfigError, match="gp_weight"):
        critic_loss(critic, real, fake, gp_weight=-1.0)


def test_critic_loss_does_not_train_the_generator():
    gen = Generator(image_size=8, channels=1, **TINY_G)
    critic = Critic(image_size=8, channels=1, **TINY_D)
    loss, _ = critic_loss(critic, torch.randn(2, 1, 8, 8), gen.sample(2))
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert any(p.grad is not None for p in critic.parameters())


# --- a few WGAN-GP steps -----------------------------------------------------------------

def test_train_step_moves_generator_toward_toy_noise():
    """Real noise is sign noise of magnitude m; the generator starts far below m in |noise|."""
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    m = 8 / 255
    gen = Generator(image_size=8, channels=1, z_dim=8, widths=(16, 16, 8), kernel_size=3)
    critic = Critic(image_size=8, channels=1, widths=(8, 16, 16, 16), kernel_size=3)
    g_opt, c_opt = make_optimizers(gen, critic, lr=5e-4)

    def mean_abs_over_m() -> float:
        gen.eval()
        with torch.no_grad():
            noise = gen.sample(256, generator=torch.Generator().manual_seed(1))
        gen.train()
        return float(noise.abs().mean()) / m

    def real_batches():
        while True:
            yield m * torch.sign(torch.randn(16, 1, 8, 8, generator=rng))

    before = mean_abs_over_m()
    batches = real_batches()
    for _ in range(50):
        stats = train_step(gen, critic, g_opt, c_opt, batches, n_critic=3, rng=rng)
    after = mean_abs_over_m()
    assert set(stats) >= {"wasserstein", "gradient_penalty", "generator_loss"}
    assert abs(before - 1) > 0.6  # measured: 0.84
    assert abs(after - 1) < 0.4  # measured: 0.12
    assert all(p.requires_grad for p in critic.parameters())  # restored after the G step


def test_train_step_needs_enough_batches():
    gen = Generator(image_size=8, channels=1, **TINY_G)
    critic = Critic(image_size=8, channels=1, **TINY_D)
    g_opt, c_opt = make_optimizers(gen, critic)
    with pytest.raises(ValueError, match="ran out after 1"):
        train_step(gen, critic, g_opt, c_opt, [torch.randn(2, 1, 8, 8)], n_critic=2)


def test_generator_step_freezes_the_critic_and_trains_only_the_generator():
    """The standard WGAN-GP generator step: no gradient reaches the critic's parameters, the
    critic is unchanged, the generator moves, and requires_grad is restored afterwards."""
    torch.manual_seed(0)
    gen = Generator(image_size=8, channels=1, **TINY_G)
    critic = Critic(image_size=8, channels=1, **TINY_D)
    g_opt, c_opt = make_optimizers(gen, critic, lr=1e-2)
    before_c = [p.detach().clone() for p in critic.parameters()]
    before_g = [p.detach().clone() for p in gen.parameters()]
    z = torch.randn(4, TINY_G["z_dim"])
    loss = generator_step(critic, g_opt, lambda: gen(z))
    assert loss.ndim == 0 and not loss.requires_grad
    assert all(p.grad is None for p in critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before_c, critic.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_g, gen.parameters()))
    assert all(p.requires_grad for p in critic.parameters())


def test_critic_step_trains_only_the_critic_and_weights_its_loss():
    torch.manual_seed(0)
    critic = LinearCritic(torch.randn(16))
    opt = torch.optim.SGD(critic.parameters(), lr=1.0)
    real, fake = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4, requires_grad=True)
    w0 = critic.w.detach().clone()
    stats = critic_step(critic, opt, real, fake, gp_weight=0.0, loss_weight=0.5)
    # d/dw (E[F(fake)] - E[F(real)]) = mean(fake) - mean(real); SGD lr 1 with weight 0.5.
    expected = w0 - 0.5 * (fake.detach().flatten(1).mean(0) - real.flatten(1).mean(0))
    assert torch.allclose(critic.w.detach(), expected, atol=1e-6)
    assert fake.grad is None  # fake is detached: the critic step never trains the generator
    assert set(stats) >= {"wasserstein", "gradient_penalty", "loss"}
