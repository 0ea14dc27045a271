"""Model entry points accept what their checks admit (issue 10, items 12-13): any float image
dtype; state dicts without BatchNorm's num_batches_tracked (as torch accepts); never real missing weights."""
from __future__ import annotations

import pytest
import torch

from raydefense.errors import ModelError
from raydefense.models import create_model

K = 4


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=K)


def _without_counters(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def test_torch_itself_accepts_the_stripped_state_dict(small):
    sd = _without_counters(small.state_dict())
    assert len(sd) < len(small.state_dict())
    fresh = create_model("small_cnn", num_classes=K)
    fresh.load_state_dict(sd, strict=True)  # the reference behaviour


@pytest.mark.parametrize("name", ["small_cnn", "facenet", "mobilenet_v2"])
def test_missing_num_batches_tracked_is_accepted(name):
    torch.manual_seed(0)
    source = create_model(name, num_classes=K)
    for m in source.modules():  # make the weights and running stats distinguishable from a fresh init
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.running_mean.uniform_(-1, 1)
    sd = {k: v for k, v in source.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    stripped = len(source.net.state_dict()) - len(sd)
    assert stripped > 0
    loaded = create_model(name, num_classes=K, pretrained=sd)
    for k, v in sd.items():
        assert torch.equal(loaded.net.state_dict()[k], v), k


def test_real_missing_weight_is_still_refused(small):
    sd = _without_counters(small.state_dict())
    weight = next(k for k in sd if k.endswith("running_mean"))
    conv = next(k for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
    for drop in (weight, conv):
        bad = {k: v for k, v in sd.items() if k != drop}
        with pytest.raises(ModelError, match="1 missing keys"):
            create_model("small_cnn", num_classes=K, pretrained=bad)


def test_unexpected_key_is_still_refused(small):
    sd = dict(small.state_dict())
    sd["net.extra.weight"] = torch.zeros(3)
    with pytest.raises(ModelError, match="unexpected keys"):
        create_model("small_cnn", num_classes=K, pretrained=sd)


# ----------------------------------------------------------------------------- image dtypes (item 12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_forward_takes_any_float_image_dtype(small, dtype):
    small.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = small(x)
    got = small(x.to(dtype))
    assert got.dtype == torch.float32  # the model's dtype
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert torch.allclose(got, ref, atol=tol, rtol=tol)
    # Gradients reach the caller's images through the cast (what attacks need).
    xi = x.to(dtype).requires_grad_(True)
    small.features(xi).sum().backward()
    assert xi.grad is not None and xi.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused_with_a_hint(small, dtype):
    with pytest.raises(ValueError, match="float images in \\[0, 1\\].*255"):
        small(torch.zeros(1, 3, 32, 32, dtype=dtype))
