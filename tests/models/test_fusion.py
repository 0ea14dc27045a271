"""raydefense.models.fusion: the frozen networks' inference form (BatchNorm folded into convolutions),
and load_artifact handing it out only for frozen loads."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raydefense.denoise import DAE, UDDN
from raydefense.gnr.networks import Generator
from raydefense.models import create_model
from raydefense.models.fusion import fold_batch_norm
from raydefense.pipeline.artifacts import load_artifact, save_artifact
from raydefense.storage import Storage


def _with_running_stats(net: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """``net`` after a few training-mode forwards (BatchNorm statistics away from 0/1), in eval mode,
    with weights scaled off their initialisation (a zero-initialised output layer would hide errors)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        net.train()
        for _ in range(steps):
            net(make_input())
    return net.eval()


def _bn_count(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("name", ["facenet", "inception_v3", "mobilenet_v2", "googlenet", "small_cnn"])
def test_classifier_folds_every_batch_norm_and_keeps_logits_features_and_input_gradients(name):
    model = _with_running_stats(create_model(name, num_classes=4), lambda: torch.rand(4, 3, 80, 80))
    before = _bn_count(model)
    folded = copy.deepcopy(model)
    n = fold_batch_norm(folded)
    assert n == before > 0 and _bn_count(folded) == 0
    x = torch.rand(3, 3, 80, 80)
    assert _close(model(x), folded(x))
    # Equation 5's layer l = -2 goes through the same submodules: the fold must hold there too.
    assert _close(model.features(x), folded.features(x))
    # What attacks use: the gradient of the loss with respect to the input.
    grads = []
    for net in (model, folded):
        xx = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(net(xx), torch.tensor([0, 1, 2])).backward()
        grads.append(xx.grad)
    # A pre-activation within rounding of 0 can take the other side of a ReLU, so compare the
    # gradients as wholes (relative L2 distance), not element by element.
    assert (grads[0] - grads[1]).norm() <= 1e-2 * grads[0].norm()
    # Same sign almost everywhere: FGSM's step is sign(grad).
    assert (grads[0].sign() == grads[1].sign()).float().mean() > 0.99


@pytest.mark.parametrize("make", [lambda: UDDN(widths=(8, 16, 32, 64, 64)), lambda: DAE(widths=(8, 16, 32, 64, 64))])
def test_denoisers_fold_and_denoise_the_same(make):
    net = _with_running_stats(make(), lambda: torch.rand(4, 3, 80, 80))
    folded = copy.deepcopy(net)
    assert fold_batch_norm(folded) == _bn_count(net) > 0
    x = torch.rand(2, 3, 80, 80)
    assert _close(net(x), folded(x))
    assert (net(x) - x).abs().max() > 0.1  # the check compares real outputs, not the identity


def test_generator_transposed_convolutions_fold():
    gen = _with_running_stats(Generator(image_size=80, z_dim=8, widths=(16, 8, 4), max_noise=0.06),
                              lambda: torch.randn(4, 8))
    folded = copy.deepcopy(gen)
    # Every BatchNorm but the projection's, which follows a Linear and a reshape, not a convolution.
    assert fold_batch_norm(folded) == _bn_count(gen) - 1 > 0 and _bn_count(folded) == 1
    assert any(isinstance(m, nn.ConvTranspose2d) and m.bias is not None for m in folded.modules())
    z = torch.randn(3, 8)
    assert _close(gen(z), folded(z), rel=1e-4)


def test_a_training_mode_model_is_refused_with_the_culprit_named():
    net = create_model("small_cnn", num_classes=3).eval()
    net.net.features.train()
    with pytest.raises(ValueError, match="training mode: net.features"):
        fold_batch_norm(net)


def test_a_convolution_whose_output_is_used_twice_is_left_alone():
    """Only known data flows are folded: a custom block that reuses conv's output is not touched."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = _with_running_stats(Reuse(), lambda: torch.rand(2, 3, 8, 8))
    folded = copy.deepcopy(net)
    assert fold_batch_norm(folded) == 0
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(net(x), folded(x))


def test_grouped_convolutions_fold_and_grouped_transposed_ones_are_left_alone():
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.ConvTranspose2d(8, 8, 2, stride=2, groups=4), nn.BatchNorm2d(8))
    net = _with_running_stats(net, lambda: torch.rand(2, 4, 6, 6))
    folded = copy.deepcopy(net)
    assert fold_batch_norm(folded) == 1 and isinstance(folded[1], nn.Identity) and _bn_count(folded) == 1
    x = torch.rand(2, 4, 6, 6)
    assert _close(net(x), folded(x))


def test_load_artifact_folds_frozen_loads_only(tmp_path):
    storage = Storage.open(str(tmp_path))
    model = _with_running_stats(create_model("small_cnn", num_classes=3), lambda: torch.rand(4, 3, 32, 32))
    save_artifact(storage, "clf", model, {"kind": "classifier", "arch": "small_cnn", "num_classes": 3}, config={})
    frozen = load_artifact(storage, "clf")
    trainable = load_artifact(storage, "clf", frozen=False)
    assert _bn_count(frozen) == 0 and not any(p.requires_grad for p in frozen.parameters())
    # A trainable load is the network as saved: it keeps its BatchNorm and saves back the same keys.
    assert _bn_count(trainable) == _bn_count(model) > 0
    assert trainable.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(2, 3, 32, 32)
    assert _close(frozen(x), model(x)) and torch.allclose(trainable(x), model(x))
    # The frozen classifier computes in channels-last; what it hands back keeps the caller's layout.
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in frozen.modules()
               if isinstance(m, torch.nn.Conv2d))
    xx = x.clone().requires_grad_(True)
    frozen(xx).sum().backward()
    assert xx.grad.is_contiguous()
