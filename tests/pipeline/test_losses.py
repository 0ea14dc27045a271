"""The classifier losses registry and the optimizer names (pure PyTorch, no Ray)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.pipeline.classifiers import CLASSIFIER_LOSSES, LossInputs, RobustInputs
from raydefense.pipeline.training import OPTIMIZERS, make_optimizer


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))


@pytest.mark.parametrize("name", sorted(CLASSIFIER_LOSSES))
def test_every_loss_is_a_finite_scalar_that_trains_only_the_model(name):
    model, teacher = _model(0), _model(1).requires_grad_(False)
    x, y = torch.rand(6, 3, 4, 4), torch.randint(0, 5, (6,))
    inputs = LossInputs(teacher=teacher, T=2.0, lam=0.5, dcn_weight=0.1, generator=torch.Generator().manual_seed(0),
                        robust=RobustInputs(eps=8 / 255, steps=2, weight=0.5), preprocess=nn.Identity())
    loss = CLASSIFIER_LOSSES[name](model, x, y, inputs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_ce_and_dcn_are_the_building_blocks():
    from raydefense.defenses import dcn_loss

    model = _model(0)
    x, y = torch.rand(6, 3, 4, 4), torch.randint(0, 5, (6,))
    ce = CLASSIFIER_LOSSES["ce"](model, x, y, LossInputs(label_smoothing=0.1))
    assert torch.allclose(ce, F.cross_entropy(model(x), y, label_smoothing=0.1))
    got = CLASSIFIER_LOSSES["dcn"](model, x, y, LossInputs(dcn_weight=0.3, generator=torch.Generator().manual_seed(4)))
    want = dcn_loss(model, x, y, weight=0.3, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(got, want)
    assert got > F.cross_entropy(model(x), y)  # the contractive penalty is positive for a linear map


def test_optimizer_names_mean_what_they_say():
    params = [nn.Parameter(torch.zeros(2))]
    assert type(make_optimizer(params, name="adam", lr=1e-3, weight_decay=0.1)) is torch.optim.Adam
    assert type(make_optimizer(params, name="adamw", lr=1e-3, weight_decay=0.1)) is torch.optim.AdamW
    assert type(make_optimizer(params, name="sgd", lr=1e-3, weight_decay=0.1)) is torch.optim.SGD
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer(params, name="lamb", lr=1e-3, weight_decay=0.1)
    from raydefense.config import OPTIMIZERS as CONFIG_NAMES
    from raydefense.config import TrainConfig

    assert set(CONFIG_NAMES) == set(OPTIMIZERS)
    assert TrainConfig().optimizer == "adamw"  # what every preset trained with before the names were fixed
