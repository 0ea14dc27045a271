"""Baseline defences (JPEG, DCN) and the defended-model wrapper."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.defenses import (
    JPEG,
    JPEG_MODES,
    DefendedModel,
    contractive_penalty,
    dcn_loss,
    jpeg_compress,
    jpeg_compress_differentiable,
)
from raydefense.denoise import UDDN
from raydefense.errors import ConfigError



def smooth_images(b: int, c: int, h: int, w: int, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Natural-ish images: upsampled low-frequency content plus a little pixel noise, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(b, c, h // 8 + 1, w // 8 + 1, generator=gen)
    x = F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    x = x + 0.02 * torch.randn(b, c, h, w, generator=gen)
    return x.clamp(0, 1).to(dtype)


class TinyClassifier(nn.Module):
    """Implements the models' contract: logits, pooled features, head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --- JPEG --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (75, 75), (40, 24)])
def test_real_jpeg_changes_image_a_little(channels, size):
    x = smooth_images(2, channels, *size)
    y = jpeg_compress(x, quality=75)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    diff = (y - x).abs().mean()
    assert 1e-3 < diff < 0.05  # measured: 0.014 (gray) - 0.025 (RGB)
    # Decoded pixels are whole uint8 levels.
    torch.testing.assert_close(y * 255, (y * 255).round(), atol=1e-4, rtol=0)


def test_real_jpeg_quality_orders_distortion():
    x = smooth_images(2, 3, 32, 32)
    d = {q: float((jpeg_compress(x, quality=q) - x).abs().mean()) for q in (10, 50, 100)}
    assert d[100] < d[50] < d[10]


def test_real_jpeg_batch_shapes_and_dtype():
    x = smooth_images(6, 3, 16, 16, dtype=torch.float64)
    flat = jpeg_compress(x, quality=60)
    assert flat.dtype == torch.float64
    assert torch.equal(jpeg_compress(x.reshape(2, 3, 3, 16, 16), quality=60), flat.reshape(2, 3, 3, 16, 16))
    assert torch.equal(jpeg_compress(x[0], quality=60), flat[0])


@pytest.mark.parametrize("size", [(32, 32), (75, 75)])
def test_differentiable_jpeg_close_to_real_and_has_gradients(size):
    x = smooth_images(2, 3, *size).requires_grad_(True)
    real = jpeg_compress(x, quality=75)
    approx = jpeg_compress_differentiable(x, quality=75)
    assert approx.shape == x.shape
    gap = (approx - real).abs().mean()
    assert gap < 0.012  # measured: 0.007
    assert gap < 0.5 * (x - real).abs().mean()  # much closer to the codec than the input is
    (grad,) = torch.autograd.grad(approx.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_differentiable_jpeg_grayscale():
    x = smooth_images(2, 1, 24, 24)
    approx = jpeg_compress_differentiable(x, quality=75)
    assert approx.shape == x.shape
    assert (approx - jpeg_compress(x, quality=75)).abs().mean() < 0.01  # measured: 0.004


def test_bpda_forward_is_real_codec_backward_is_identity():
    x = smooth_images(2, 3, 24, 24).requires_grad_(True)
    y = JPEG(quality=50, mode="bpda")(x)
    assert torch.equal(y.detach(), jpeg_compress(x, quality=50))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("mode", JPEG_MODES)
def test_module_matches_functions(mode):
    x = smooth_images(2, 3, 16, 16)
    out = JPEG(quality=40, mode=mode)(x)
    fn = jpeg_compress_differentiable if mode == "differentiable" else jpeg_compress
    torch.testing.assert_close(out, fn(x, quality=40))


def test_real_mode_gives_no_gradient():
    x = smooth_images(1, 3, 16, 16).requires_grad_(True)
    assert not JPEG(mode="real")(x).requires_grad


def test_jpeg_bad_inputs():
    x = smooth_images(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="quality"):
        jpeg_compress(x, quality=0)
    with pytest.raises(ConfigError, match="quality"):
        JPEG(quality=101)
    with pytest.raises(ConfigError, match="'fast'"):
        JPEG(mode="fast")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        jpeg_compress(x * 255, quality=75)
    with pytest.raises(ValueError, match="C in"):
        jpeg_compress_differentiable(torch.rand(1, 2, 16, 16))


# --- DCN ---------------------------------------------------------------------------------

class Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def test_contractive_penalty_exact_with_orthonormal_projections():
    torch.manual_seed(0)
    k, d = 4, 2 * 3 * 3
    w = torch.randn(k, d, dtype=torch.float64)
    x = torch.rand(3, 2, 3, 3, dtype=torch.float64)
    basis = math.sqrt(k) * torch.eye(k, dtype=torch.float64)  # mean_k ||W^T sqrt(K) e_k||^2 = ||W||_F^2
    got = contractive_penalty(Linear(w), x, projections=basis)
    torch.testing.assert_close(got, w.pow(2).sum())


def test_contractive_penalty_random_estimate_converges():
    torch.manual_seed(0)
    w = torch.randn(5, 12, dtype=torch.float64)
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    est = contractive_penalty(Linear(w), x, num_projections=400, generator=torch.Generator().manual_seed(0))
    assert abs(float(est.detach()) / float(w.pow(2).sum()) - 1) < 0.15  # 1600 draws: ~3% s.d.


def test_contractive_penalty_zero_for_constant_model():
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return self.b.expand(x.shape[0], 5)

    x = torch.rand(3, 3, 4, 4)
    pen = contractive_penalty(Constant(), x, num_projections=3)
    assert pen == 0
    pen.backward()  # still part of a graph, so a training loop can use it unconditionally


def test_contractive_penalty_trains_parameters_and_is_seeded():
    model = TinyClassifier()
    x = torch.rand(2, 3, 8, 8)
    a = contractive_penalty(model, x, num_projections=2, generator=torch.Generator().manual_seed(1))
    b = contractive_penalty(model, x, num_projections=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a > 0
    a.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad.abs().sum() > 0


def test_dcn_loss_is_ce_plus_weighted_penalty():
    torch.manual_seed(0)
    model = TinyClassifier()
    x = torch.rand(3, 3, 8, 8)
    labels = torch.tensor([0, 3, 1])
    ce = F.cross_entropy(model(x), labels)
    torch.testing.assert_close(dcn_loss(model, x, labels, weight=0.0), ce)
    pen = contractive_penalty(model, x, generator=torch.Generator().manual_seed(2))
    got = dcn_loss(model, x, labels, weight=0.5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, ce + 0.5 * pen)
    with pytest.raises(ConfigError, match="weight"):
        dcn_loss(model, x, labels, weight=-1.0)
    with pytest.raises(ConfigError, match="num_projections"):
        contractive_penalty(model, x, num_projections=0)


# --- defended model ----------------------------------------------------------------------

def test_defended_model_composes():
    torch.manual_seed(0)
    clf = TinyClassifier().eval()
    den = UDDN(widths=(4, 8, 8, 8, 8)).eval()
    with torch.no_grad():
        den.to_noise.weight.normal_(0, 0.1)
    model = DefendedModel(clf, den)
    x = torch.rand(2, 3, 20, 20)
    torch.testing.assert_close(model(x), clf(den(x)))
    torch.testing.assert_close(model.features(x), clf.features(den(x)))
    logits, feats = model.forward_with_features(x)
    torch.testing.assert_close(logits, clf(den(x)))
    torch.testing.assert_close(model.head(feats), logits)
    torch.testing.assert_close(DefendedModel(clf)(x), clf(x))  # no preprocess = no defence


def test_gradients_flow_through_the_whole_pipeline():
    torch.manual_seed(0)
    clf = TinyClassifier().eval()
    den = UDDN(widths=(4, 8, 8, 8, 8)).eval()
    with torch.no_grad():
        den.to_noise.weight.normal_(0, 0.1)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(DefendedModel(clf, den)(x).sum(), x)
    # The UDDN is not the identity here, so the pipeline's gradient differs from the classifier's.
    (grad_clf,) = torch.autograd.grad(clf(x).sum(), x)
    assert grad.abs().sum() > 0 and not torch.allclose(grad, grad_clf)
    # With a BPDA JPEG in front, the gradient is the classifier's at the compressed image.
    jpeg_model = DefendedModel(clf, JPEG(quality=75, mode="bpda"))
    (grad_jpeg,) = torch.autograd.grad(jpeg_model(x).sum(), x)
    xj = jpeg_compress(x, quality=75).requires_grad_(True)
    (expected,) = torch.autograd.grad(clf(xj).sum(), xj)
    torch.testing.assert_close(grad_jpeg, expected)
