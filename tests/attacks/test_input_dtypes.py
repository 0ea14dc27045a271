"""Every registered attack accepts every input its checks admit (issue 10, item 12): labels of any
integer dtype give exactly the int64 result; images of any float dtype give a valid attack in
that dtype; eps as a float, a NumPy scalar, a 0-d tensor or one value per image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks import create_attack, list_attacks
from raydefense.attacks.base import attack_loss

K = 5
EPS = 8 / 255
# Few steps keep the registry sweep fast; 'ifgsm2'.. fix their own steps.
KWARGS = {"ifgsm": {"steps": 2}, "pgd": {"steps": 2}, "apgd": {"steps": 3}, "apgd_dlr": {"steps": 3}}
INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


class Linear(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(K, 48, generator=gen, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(K, generator=gen, dtype=dtype))

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight, self.bias)


def data(dtype=torch.float32, b=6):
    gen = torch.Generator().manual_seed(1)
    x = (0.2 + 0.6 * torch.rand(b, 3, 4, 4, generator=gen)).to(dtype)
    y = torch.randint(0, K, (b,), generator=gen)
    return x, y


def run(name, model, x, y, eps=EPS):
    torch.manual_seed(123)  # random starts (PGD, APGD) draw the same numbers in every call
    return create_attack(name, model, eps=eps, **KWARGS.get(name, {}))(x, y)


@pytest.mark.parametrize("name", list_attacks())
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_integer_labels_of_any_dtype_match_int64(name, dtype):
    model = Linear()
    x, y = data()
    expected = run(name, model, x, y)
    got = run(name, model, x, y.to(dtype))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_attack_loss_takes_any_integer_labels(dtype):
    logits = torch.randn(4, K, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 4, 2])
    for loss in ("ce", "dlr"):
        assert torch.equal(attack_loss(logits, y.to(dtype), loss=loss), attack_loss(logits, y, loss=loss))


@pytest.mark.parametrize("name", list_attacks())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_images_of_any_float_dtype(name, dtype):
    model = Linear()  # float32 weights: the attack computes in float32 and answers in the caller's dtype
    x, y = data(dtype)
    adv = run(name, model, x, y)
    assert adv.dtype == dtype and adv.shape == x.shape
    assert (adv >= 0).all() and (adv <= 1).all()
    eps = torch.tensor(EPS, dtype=dtype)
    assert ((adv.double() - x.double()).abs() <= eps.double() + 1e-12).all()
    # The same attack as on float32 images, up to the rounding of the caller's dtype.
    ref = run(name, model, x.float(), y)
    step = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 1e-6
    # sign() of a gradient near 0 may flip between dtypes: the images agree almost everywhere.
    close = (adv.double() - ref.double()).abs() <= 2 * step + 1e-6
    assert close.double().mean() > 0.9


def test_float64_model_with_float32_images():
    model = Linear(torch.float64)
    x, y = data(torch.float32)
    adv = run("fgsm", model, x, y)
    assert adv.dtype == torch.float32
    assert torch.allclose(adv, run("fgsm", model, x.double(), y).float(), atol=1e-6)


@pytest.mark.parametrize("name", list_attacks())
def test_eps_as_float_numpy_0d_tensor_or_per_image(name):
    model = Linear()
    x, y = data()
    expected = run(name, model, x, y, eps=EPS)
    for eps in (np.float32(EPS), np.float64(EPS), torch.tensor(EPS), torch.tensor(EPS, dtype=torch.float64)):
        got = run(name, model, x, y, eps=eps)
        assert torch.allclose(got, expected, atol=1e-6), type(eps)
    per_image = run(name, model, x, y, eps=torch.full((x.shape[0],), EPS))
    assert torch.allclose(per_image, expected, atol=1e-6)
    per_image_list = run(name, model, x, y, eps=[EPS] * x.shape[0])
    assert torch.allclose(per_image_list, expected, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor(True), "float"),
    (torch.tensor(2.0), "above 1"),
    (torch.tensor(-0.1), ">= 0"),
    (np.float32(np.nan), "finite"),
])
def test_bad_0d_eps_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        create_attack("fgsm", Linear(), eps=bad)


def test_labels_out_of_range_rejected_at_the_boundary():
    model = Linear()
    x, y = data()
    with pytest.raises(ValueError, match=">= 0"):
        create_attack("fgsm", model)(x, torch.full_like(y, -1))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        create_attack("fgsm", model)(x, torch.full_like(y, K))
