"""UDDN, DAE (Li & Wang 2019, section 3, eq. 4) and the guided losses (eq. 5)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydefense.denoise import (
    C2,
    C3,
    DAE,
    GUIDED_LOSSES,
    UDDN,
    C,
    Fuse,
    GuidanceModel,
    feature_guided_loss,
    guided_loss,
    logits_guided_loss,
    pixel_guided_loss,
)
from raydefense.errors import ConfigError

TINY = (4, 8, 8, 8, 8)



class TinyClassifier(nn.Module):
    """Implements the GuidanceModel contract: logits, pooled features, head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _randomize_output(model: UDDN) -> UDDN:
    """Give the zero-initialized output conv random weights, so tests see real outputs."""
    head = model.to_image if isinstance(model, DAE) else model.to_noise
    with torch.no_grad():
        head.weight.normal_(0, 0.1)
        head.bias.normal_(0, 0.1)
    return model


# --- network -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [UDDN, DAE])
@pytest.mark.parametrize("size", [32, 64, 75, 80, 96, 160, (45, 31)])
def test_shapes_preserved(cls, size):
    h, w = (size, size) if isinstance(size, int) else size
    model = _randomize_output(cls(widths=TINY))
    x = torch.rand(2, 3, h, w)
    assert model(x).shape == x.shape
    assert model.predict_noise(x).shape == x.shape


@pytest.mark.parametrize("train", [True, False])
def test_forward_is_input_minus_predicted_noise(train):
    torch.manual_seed(0)
    model = _randomize_output(UDDN(widths=TINY)).train(train)
    x = torch.rand(2, 3, 24, 24)
    noise = model.predict_noise(x)
    assert noise.abs().max() > 1e-3  # not trivially zero
    assert torch.equal(model(x), x - noise)  # eq. 4, exactly


@pytest.mark.parametrize("train", [True, False])
def test_dae_reconstructs_the_image_without_a_residual(train):
    """The paper's DAE reconstructs x_hat itself (section 3.2); predict_noise is x - x_hat."""
    torch.manual_seed(0)
    model = _randomize_output(DAE(widths=TINY)).train(train)
    assert not hasattr(model, "to_noise")
    x = torch.rand(2, 3, 24, 24)
    x_hat = model(x)
    torch.testing.assert_close(model.predict_noise(x), x - x_hat)
    # No identity path: the same decoder map without the input added, i.e. the head's output.
    torch.testing.assert_close(x_hat, model.to_image(model._decode(x)))
    # (test_dae_reaches_output_only_through_bottleneck: cut the bottleneck and x_hat no longer
    # depends on x at all, which a residual output x - dx_hat would.)


def test_uddn_identity_at_init():
    model = UDDN(widths=TINY)
    x = torch.rand(2, 3, 33, 33)
    assert torch.equal(model(x), x)
    assert torch.count_nonzero(model.predict_noise(x)) == 0


def test_dae_starts_at_mid_grey():
    """Zero-initialised reconstruction head with bias 0.5: x_hat = 0.5 everywhere at init."""
    x = torch.rand(2, 3, 33, 33)
    torch.testing.assert_close(DAE(widths=TINY)(x), torch.full_like(x, 0.5))


def test_residual_dae_weights_do_not_load():
    """Weights of a network with a noise head (UDDN layout) must not load silently into the DAE."""
    with pytest.raises(RuntimeError, match="to_noise|to_image"):
        DAE(widths=TINY).load_state_dict(UDDN(widths=TINY, lateral=False).state_dict())


def test_no_clamp_by_default_and_clamp_option():
    x = torch.rand(2, 3, 16, 16)
    loose = UDDN(widths=TINY)
    with torch.no_grad():
        loose.to_noise.bias.fill_(-0.5)  # dx_hat = -0.5 -> x_hat = x + 0.5 leaves [0, 1]
    assert loose(x).max() > 1.0
    clamped = UDDN(widths=TINY, clamp_output=True)
    clamped.load_state_dict(loose.state_dict())
    out = clamped(x)
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, loose(x).clamp(0, 1))


def test_decoder_widths_with_and_without_lateral():
    w = (4, 6, 8, 10, 12)
    uddn, dae = UDDN(widths=w), DAE(widths=w)
    # Decoder blocks, deep to shallow (scales 3, 2, 1, 0): feedback + lateral vs feedback only.
    assert [b.c1.conv.in_channels for b in uddn.decoder] == [12 + 10, 10 + 8, 8 + 6, 6 + 4]
    assert [b.c1.conv.in_channels for b in dae.decoder] == [12, 10, 8, 6]
    assert [type(b) for b in uddn.decoder] == [C3, C3, C3, C2]
    assert not dae.lateral and uddn.lateral


@pytest.mark.parametrize("cls,has_lateral", [(UDDN, True), (DAE, False)])
def test_dae_reaches_output_only_through_bottleneck(cls, has_lateral):
    """Cut the bottleneck's graph: only lateral paths can still carry a gradient to x."""
    torch.manual_seed(0)
    model = _randomize_output(cls(widths=TINY)).eval()
    handle = model.encoder[-1].register_forward_hook(lambda mod, inp, out: out.detach())
    x = torch.rand(2, 3, 20, 20, requires_grad=True)
    # The UDDN's head output is its noise estimate; the DAE's is the reconstruction itself.
    out = model(x) if cls is DAE else model.predict_noise(x)
    handle.remove()
    (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    if has_lateral:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None  # x is not in the graph at all once the bottleneck is cut


def test_dae_ignores_encoder_skip_values():
    """Change only the copy of the first encoder map that the decoder would see.

    The forward hook adds 1 to the first encoder map; a pre-hook on the next encoder block
    hands it the original values, so the bottleneck is unchanged and only a lateral
    connection can carry the change: the UDDN's output must move, the DAE's must not.
    """
    torch.manual_seed(0)
    x = torch.rand(2, 3, 20, 20)
    for cls, moves in ((DAE, False), (UDDN, True)):
        model = _randomize_output(cls(widths=TINY)).eval()
        base = model(x)
        saved = {}

        def shift(module, inputs, output):
            saved["original"] = output
            return output + 1.0

        def restore(module, inputs):
            return (saved["original"],)

        h1 = model.encoder[0].register_forward_hook(shift)
        h2 = model.encoder[1].register_forward_pre_hook(restore)
        out = model(x)
        h1.remove()
        h2.remove()
        assert (not torch.allclose(out, base)) is moves, cls.__name__


@pytest.mark.parametrize("block", [C, C2, C3])
@pytest.mark.parametrize("stride", [1, 2])
def test_blocks_gradcheck(block, stride):
    torch.manual_seed(0)
    module = block(2, 3, stride=stride).double().eval()
    for m in module.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert module(x).shape == (1, 3, 3 if stride == 2 else 5, 3 if stride == 2 else 5)
    assert torch.autograd.gradcheck(module, (x,))


def test_c2_c3_connections():
    """C2 adds c1's output to c2's; C3 feeds cat(c1, c2) to c3 and sums all three."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    c2 = C2(3, 4).eval()
    h1 = c2.c1(x)
    torch.testing.assert_close(c2(x), c2.c2(h1) + h1)
    c3 = C3(3, 4).eval()
    h1 = c3.c1(x)
    h2 = c3.c2(h1)
    torch.testing.assert_close(c3(x), h1 + h2 + c3.c3(torch.cat((h1, h2), 1)))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_fuse_odd_sizes_and_gradcheck(mode):
    fuse = Fuse(mode=mode)
    feedback = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    lateral = torch.randn(1, 3, 10, 7, dtype=torch.float64, requires_grad=True)
    out = fuse(feedback, lateral)
    assert out.shape == (1, 5, 10, 7)
    assert torch.equal(out[:, 2:], lateral)
    assert fuse(feedback, size=(9, 9)).shape == (1, 2, 9, 9)
    assert torch.autograd.gradcheck(lambda f, l: fuse(f, l), (feedback, lateral))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="widths"):
        UDDN(widths=(4, 8, 8))
    with pytest.raises(ConfigError, match="'bicubic'"):
        UDDN(widths=TINY, upsample="bicubic")
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        UDDN(widths=TINY)(torch.rand(2, 1, 16, 16))


# --- guided losses -----------------------------------------------------------------------

def test_guidance_protocol():
    assert isinstance(TinyClassifier(), GuidanceModel)


@pytest.mark.parametrize("kind", sorted(GUIDED_LOSSES))
def test_losses_zero_iff_equal(kind):
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    x = torch.rand(2, 3, 12, 12)
    assert guided_loss(kind, model, x.clone(), x) == 0
    assert guided_loss(kind, model, (x + 0.1 * torch.randn_like(x)).clamp(0, 1), x) > 0


def test_loss_values_match_definitions():
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    x = torch.rand(3, 3, 12, 12)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(pixel_guided_loss(x_hat, x), (x_hat - x).abs().mean())
    torch.testing.assert_close(logits_guided_loss(model, x_hat, x), (model(x_hat) - model(x)).abs().mean())
    torch.testing.assert_close(
        feature_guided_loss(model, x_hat, x), (model.features(x_hat) - model.features(x)).abs().mean()
    )
    torch.testing.assert_close(guided_loss("features", model, x_hat, x), feature_guided_loss(model, x_hat, x))
    torch.testing.assert_close(guided_loss("pixel", None, x_hat, x), pixel_guided_loss(x_hat, x))


@pytest.mark.parametrize("kind", ["logits", "features", "pixel"])
def test_gradients_reach_denoiser_not_frozen_model(kind):
    torch.manual_seed(0)
    model = TinyClassifier().eval().requires_grad_(False)  # the caller freezes the target
    denoiser = _randomize_output(UDDN(widths=TINY))
    x = torch.rand(2, 3, 16, 16)
    x_adv = (x + 0.03 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    guided_loss(kind, model, denoiser(x_adv), x).backward()
    assert all(p.grad is None for p in model.parameters())
    grads = [p.grad for p in denoiser.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_pixel_weight_adds_the_pixel_squared_error_to_guided_kinds_only():
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    x = torch.rand(3, 3, 12, 12)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    for kind in ("logits", "features"):
        torch.testing.assert_close(guided_loss(kind, model, x_hat, x, pixel_weight=2.5),
                                   guided_loss(kind, model, x_hat, x) + 2.5 * ((x_hat - x) ** 2).mean())
    torch.testing.assert_close(guided_loss("pixel", None, x_hat, x, pixel_weight=2.5), pixel_guided_loss(x_hat, x))
    with pytest.raises(ValueError, match="pixel_weight"):
        guided_loss("logits", model, x_hat, x, pixel_weight=-1.0)


@pytest.mark.parametrize("kind", ["logits", "features"])
def test_a_precomputed_reference_gives_the_same_loss_without_a_clean_forward(kind):
    """guided_loss(reference=guidance_reference(x)) is the loss of eq. 5 without looking at x
    through the model again (what the UDDN loop does once per row instead of once per step)."""
    from raydefense.denoise import guidance_reference

    torch.manual_seed(0)
    model = TinyClassifier().eval().requires_grad_(False)
    x = torch.rand(3, 3, 12, 12)
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    ref = guidance_reference(kind, model, x)
    assert ref is not None and not ref.requires_grad
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    try:
        with_ref = guided_loss(kind, model, x_hat, x, pixel_weight=3.0, reference=ref)
    finally:
        handle.remove()
    if kind == "logits":
        assert len(seen) == 1 and seen[0] is x_hat  # only the denoised images went through the model
    torch.testing.assert_close(with_ref, guided_loss(kind, model, x_hat, x, pixel_weight=3.0))
    other = guided_loss(kind, model, x_hat, x, reference=ref + 1.0)
    assert not torch.allclose(other, guided_loss(kind, model, x_hat, x))  # the reference is really used
    assert guidance_reference("pixel", None, x) is None


def test_clean_branch_has_no_graph():
    """The target f_l(x) is computed under no_grad: x gets no gradient even if it asks for one."""
    model = TinyClassifier().eval()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    x_hat = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits_guided_loss(model, x_hat, x).backward()
    assert x.grad is None and x_hat.grad is not None


def test_unknown_kind_and_bad_shapes():
    model = TinyClassifier()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="'perceptual'.*pixel, logits, features"):
        guided_loss("perceptual", model, x, x)
    with pytest.raises(ValueError, match="same shape"):
        pixel_guided_loss(x[:1], x)
    with pytest.raises(ValueError, match="needs a target model"):
        guided_loss("logits", None, x, x)
