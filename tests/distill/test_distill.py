"""Knowledge transfer (Li & Wang 2019, eqs. 6-7) and defensive distillation (Papernot et al. 2016)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raydefense.distill import (
    defensive_distillation_loss,
    distillation_soft_targets,
    knowledge_transfer_loss,
    softmax_t,
    temperature_ce,
)
from raydefense.errors import ConfigError


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(p || q) written out from the definition."""
    return (p * (p.log() - q.log())).sum(-1).mean()


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(4, 6, generator=gen, dtype=torch.float64)
    delta = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    return teacher, delta


def test_softmax_t_definition_and_smoothing():
    z = torch.tensor([[1.0, 2.0, 4.0]])
    torch.testing.assert_close(softmax_t(z, 1), torch.softmax(z, -1))
    torch.testing.assert_close(softmax_t(z, 5), torch.exp(z / 5) / torch.exp(z / 5).sum())
    # Larger T -> flatter distribution (higher entropy).
    ent = [-(p * p.log()).sum() for p in (softmax_t(z, t) for t in (1, 2, 10))]
    assert ent[0] < ent[1] < ent[2]
    with pytest.raises(ConfigError, match="T must be"):
        softmax_t(z, 0)


def test_kt_loss_matches_eq6(logits):
    teacher, delta = logits
    student = teacher + delta
    lam, T = 0.7, 3.0
    hard = _kl(softmax_t(teacher, 1), softmax_t(student, 1))
    soft = _kl(softmax_t(teacher, T), softmax_t(student, T))
    torch.testing.assert_close(knowledge_transfer_loss(student, teacher, lam=lam, T=T), hard + lam * soft)
    scaled = knowledge_transfer_loss(student, teacher, lam=lam, T=T, scale_by_t2=True)
    expected_scaled = hard + lam * T**2 * soft
    torch.testing.assert_close(scaled, expected_scaled)


def test_kt_loss_zero_at_teacher_and_grows_away(logits):
    teacher, delta = logits
    losses = [float(knowledge_transfer_loss(teacher + t * delta, teacher, lam=0.5, T=4.0)) for t in (0, 0.5, 1, 2)]
    assert abs(losses[0]) < 1e-12
    assert losses[0] < losses[1] < losses[2] < losses[3]


def test_kt_loss_at_t1_terms_coincide(logits):
    teacher, delta = logits
    student = teacher + delta
    lam = 0.3
    loss = knowledge_transfer_loss(student, teacher, lam=lam, T=1.0)
    torch.testing.assert_close(loss, (1 + lam) * _kl(softmax_t(teacher, 1), softmax_t(student, 1)))


def test_kt_gradient_reaches_student_not_teacher(logits):
    teacher, delta = logits
    teacher = teacher.clone().requires_grad_(True)
    student = (teacher.detach() + delta).requires_grad_(True)
    knowledge_transfer_loss(student, teacher, lam=1.0, T=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,name", [
    ({"lam": 1.0, "T": 0.5}, "T"),
    ({"lam": 1.0, "T": float("nan")}, "T"),
    ({"lam": -0.1, "T": 2.0}, "lam"),
])
def test_kt_rejects_bad_hyperparameters(logits, kwargs, name):
    teacher, _ = logits
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        knowledge_transfer_loss(teacher, teacher, **kwargs)


def test_kt_rejects_mismatched_shapes(logits):
    teacher, _ = logits
    with pytest.raises(ValueError, match="differ in shape"):
        knowledge_transfer_loss(teacher[:, :3], teacher, lam=1.0, T=2.0)


def test_soft_targets(logits):
    teacher, _ = logits
    soft = distillation_soft_targets(teacher.requires_grad_(True), 20.0)
    assert not soft.requires_grad
    torch.testing.assert_close(soft.sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(soft, torch.softmax(teacher.detach() / 20.0, -1))


def test_defensive_distillation_minimised_at_teacher_logits(logits):
    teacher, delta = logits
    T = 10.0
    soft = distillation_soft_targets(teacher, T)
    student = teacher.clone().requires_grad_(True)
    at_teacher = defensive_distillation_loss(student, soft, T)
    at_teacher.backward()
    # Gibbs' inequality: the stationary point is the minimum; the gradient vanishes there ...
    assert student.grad.abs().max() < 1e-12
    # ... the minimum is the soft targets' entropy, and every other student does worse.
    torch.testing.assert_close(at_teacher.detach(), -(soft * soft.log()).sum(-1).mean())
    for t in (0.1, 0.5, 1.0, 3.0):
        assert defensive_distillation_loss(teacher + t * delta, soft, T) > at_teacher
    # A constant shift of the logits does not change the softmax: still the minimum.
    torch.testing.assert_close(defensive_distillation_loss(teacher + 5.0, soft, T), at_teacher.detach())


def test_temperature_ce():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(temperature_ce(logits, labels, 1.0), F.cross_entropy(logits, labels))
    torch.testing.assert_close(temperature_ce(logits, labels, 4.0), F.cross_entropy(logits / 4.0, labels))
    with pytest.raises(ConfigError, match="T must be"):
        temperature_ce(logits, labels, 0.9)
    with pytest.raises(ValueError, match="soft_targets"):
        defensive_distillation_loss(logits, torch.rand(2, 4), 2.0)
