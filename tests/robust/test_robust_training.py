"""The robust defenses' training pieces without Ray (issue 13): the classifier losses 'pgd_at' and
'ard_kt' on tiny tensors (online examples differ per batch, stay in their ball, leave the parameters'
gradients to the loss alone, train a tiny model), RobustInputs' budgets, the loop arguments and the
config section's validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.config import load_config
from raydefense.errors import ConfigError
from raydefense.pipeline.classifier_losses import CLASSIFIER_LOSSES, LossInputs, RobustInputs
from raydefense.pipeline.loop_args import ClassifierArgs
from tests.conftest import REPO

K = 3


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, K))


def batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 6, 6, generator=g), torch.randint(0, K, (b,), generator=g)


def test_budgets_fixed_and_per_image():
    r = RobustInputs(eps=4 / 255, steps=4)
    assert torch.equal(r.budgets(3, device="cpu", generator=None), torch.full((3,), 4 / 255))
    assert torch.allclose(r.alphas(torch.full((2,), 0.04)), torch.full((2,), 0.025))
    r = RobustInputs(eps=8 / 255, steps=4, eps_min=2 / 255, step_size=0.01)
    e = r.budgets(500, device="cpu", generator=torch.Generator().manual_seed(0))
    assert e.min() >= 2 / 255 and e.max() <= 8 / 255 and e.std() > 0.005
    assert torch.equal(r.alphas(e), torch.full_like(e, 0.01))


@pytest.mark.parametrize("kind", ["ce", "mixed", "trades"])
def test_pgd_at_loss_uses_fresh_examples_each_batch(kind, monkeypatch):
    from raydefense.pipeline import classifier_losses as CL
    import raydefense.robust as R

    seen = []
    real = R.online_pgd

    def spy(*args, **kwargs):
        adv = real(*args, **kwargs)
        seen.append((args[1].clone(), adv, kwargs["eps"]))
        return adv

    monkeypatch.setattr(R, "online_pgd", spy)
    r = RobustInputs(eps=8 / 255, steps=2, loss="trades" if kind == "trades" else "ce",
                     weight=0.5 if kind == "mixed" else 1.0)
    a = LossInputs(robust=r, generator=torch.Generator().manual_seed(0))
    model = net()
    x, y = batch()
    l1 = CL.CLASSIFIER_LOSSES["pgd_at"](model, x, y, a)
    l2 = CL.CLASSIFIER_LOSSES["pgd_at"](model, x, y, a)
    assert l1.ndim == 0 and torch.isfinite(l1)
    (x1, adv1, eps1), (_, adv2, _) = seen
    assert not torch.equal(adv1, adv2)  # fresh random start each batch
    assert ((adv1 - x1).abs().amax(dim=(1, 2, 3)) <= eps1 + 1e-7).all() and adv1.min() >= 0 and adv1.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # the attack left the parameters alone
    l1.backward()
    assert all(p.grad is not None for p in model.parameters())
    if kind == "ce":  # weight 1: Madry et al.'s loss, the CE on the adversarial batch alone
        assert l2.item() == pytest.approx(F.cross_entropy(model(adv2), y).item(), rel=1e-5)


def test_ard_kt_loss_attacks_through_the_denoiser_and_matches_its_definition(monkeypatch):
    import raydefense.robust as R
    from raydefense.robust import ard_kt_loss

    seen = []
    real = R.online_pgd
    monkeypatch.setattr(R, "online_pgd", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    pre = nn.Sequential(nn.Conv2d(3, 3, 1)).eval()
    for p in pre.parameters():
        p.requires_grad_(False)
    teacher, student = net(1).eval(), net(2)
    r = RobustInputs(eps=8 / 255, steps=2, weight=0.7)
    a = LossInputs(robust=r, teacher=teacher, lam=0.5, T=2.0, preprocess=pre,
                   generator=torch.Generator().manual_seed(0))
    x, y = batch()
    loss = CLASSIFIER_LOSSES["ard_kt"](student, x, y, a)
    whole = seen[0]
    assert isinstance(whole, nn.Sequential) and whole[0] is pre and whole[1] is student
    # Same random start again: the definition, Goldblum et al. eq. 3 with the KT loss.
    adv = real(whole, x, y, eps=torch.full((8,), 8 / 255), steps=2, alpha=torch.full((8,), 2.5 * 8 / 255 / 2),
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = ard_kt_loss(student(pre(adv)), teacher(pre(x)), alpha=0.3, lam=0.5, T=2.0,
                             student_clean_logits=student(pre(x)))
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_pgd_at_training_makes_a_tiny_model_more_robust_than_plain_training():
    """The registered loss against plain CE, same init, data and steps (the toy task of
    tests/robust/test_online.py): whole-model PGD accuracy is higher, clean accuracy stays."""
    from raydefense.attacks import PGD

    g = torch.Generator().manual_seed(0)
    means = torch.randn(K, 48, generator=g)
    y = torch.arange(256) % K
    x = (0.5 + 0.04 * means[y] + 0.06 * torch.randn(256, 48, generator=g)).clamp(0, 1).view(256, 3, 4, 4)
    eps = 8 / 255

    def train(loss_name):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, K))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        a = LossInputs(robust=RobustInputs(eps=eps, steps=3), generator=torch.Generator().manual_seed(1))
        for _ in range(10):
            for i in range(0, 256, 64):
                opt.zero_grad()
                CLASSIFIER_LOSSES[loss_name](model, x[i:i + 64], y[i:i + 64], a).backward()
                opt.step()
        torch.manual_seed(2)
        adv = PGD(model.eval(), eps=eps, steps=10)(x, y)
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item(), (model(adv).argmax(1) == y).float().mean().item()

    (clean_std, robust_std), (clean_at, robust_at) = train("ce"), train("pgd_at")
    assert clean_std > 0.9 and clean_at > 0.9
    assert robust_at > robust_std + 0.1, (robust_std, robust_at)


def test_loop_args_need_the_robust_settings():
    from raydefense.config import TrainConfig

    common = {"task": "t", "arch": "small_cnn", "num_classes": 3, "train": TrainConfig(), "artifact": "t"}
    with pytest.raises(ValueError, match="robust settings"):
        ClassifierArgs(loss="pgd_at", **common)
    with pytest.raises(ValueError, match="preprocess"):
        ClassifierArgs(loss="ard_kt", teacher="teacher", robust={"eps": 0.03, "steps": 2}, **common)
    args = ClassifierArgs(loss="ard_kt", teacher="teacher", preprocess="uddn_adv", robust={"eps": 0.03, "steps": 2},
                          **common)
    cfg = load_config(f"{REPO}/configs/smoke.yaml")
    assert ClassifierArgs.from_loop_config(args.loop_config(cfg, None)) == args


@pytest.mark.parametrize("override, culprit", [
    ("robust.defenses=[pgd_at, madry]", "robust.defenses"),
    ("robust.eps=8", "robust.eps"),
    ("robust.eps_min=0.5", "robust.eps_min"),
    ("robust.weight=1.5", "robust.weight"),
    ("robust.loss=mart", "robust.loss"),
    ("robust.eval_defenses=[nope]", "robust.eval_defenses"),
    ("robust.headline_eps=0.1", "robust.headline_eps"),
    ("robust.square_queries=0", "robust.square_queries"),
    ("robust.pgd_at_init=student", "robust.pgd_at_init"),
])
def test_bad_robust_config_names_the_key(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")) as info:
        load_config(f"{REPO}/configs/smoke.yaml", [override])
    assert "\n" not in str(info.value)


def test_default_preset_trains_no_robust_defense_and_stage_order():
    from raydefense.pipeline.defended import DEFENSES
    from raydefense.pipeline.runner import STAGE_NAMES

    cfg = load_config(f"{REPO}/configs/default.yaml")
    assert cfg.robust.defenses == () and cfg.robust.eval_defenses == ()
    assert STAGE_NAMES.index("robust") == STAGE_NAMES.index("evaluate") - 1
    assert DEFENSES["pgd_at"] == (None, "pgd_at") and DEFENSES["uddn_kt_adv"] == ("uddn_adv", "student_adv")
