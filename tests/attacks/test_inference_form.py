"""Attacks differentiate the model with its BatchNorms folded (raydefense.models.fusion.
FoldedBatchNorms, swapped into the model for the length of a call): the same adversarial images as
on the model as given, from the weights and attributes as they are at each call, and the caller's
model back as it was afterwards, also after an error and under two threads."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from raydefense.attacks import create_attack
from raydefense.models.fusion import count_foldable

K = 5


class Scaled(nn.Module):
    """Multiplies by a plain float attribute (not a tensor: nothing a weight check would see)."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


def convnet(seed: int = 0) -> nn.Sequential:
    """Conv + BatchNorm + ReLU twice, then a linear head, in float64, with BatchNorm statistics
    and affine parameters far from the identity (so an unfolded and a folded pass differ in
    work, not in function)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), Scaled(),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, K)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net


def data(b: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(b, 3, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, K, (b,), generator=gen))


def as_given(name: str, model: nn.Module, **kw):
    attack = create_attack(name, model, eps=8 / 255, **kw)
    attack.fold_batch_norm = False
    return attack


@pytest.fixture
def bn_calls():
    """A counter of forward calls into BatchNorm layers, through torch's global forward hook (a
    hook on the layers themselves would keep them from being folded)."""
    calls = [0]

    def count(module, *_):
        if isinstance(module, nn.BatchNorm2d):
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    yield calls
    handle.remove()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float64: folding moves gradients by ~1e-16, far from flipping any sign.
    return torch.allclose(a, b, rtol=0, atol=1e-12)


def tree(model: nn.Module) -> list[tuple[str, int]]:
    return [(name, id(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("name", ["fgsm", "ifgsm4", "apgd"])
def test_the_folded_attack_makes_the_same_images_without_running_the_given_batch_norms(name, bn_calls):
    net, (x, y) = convnet(), data()
    calls = bn_calls
    torch.manual_seed(3)
    folded = create_attack(name, net, eps=8 / 255)(x, y)
    assert calls[0] == 0, "the attack ran the model's BatchNorm layers: nothing was folded"
    torch.manual_seed(3)
    reference = as_given(name, net)(x, y)
    assert calls[0] > 0
    assert same(folded, reference) and (folded - x).abs().max() > 0


def test_the_given_model_is_back_as_it_was_modules_weights_statistics_flags_and_modes():
    net, (x, y) = convnet(), data()
    net.train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags, modules = [p.requires_grad for p in net.parameters()], tree(net)
    create_attack("pgd", net, eps=8 / 255, steps=3)(x, y)
    assert tree(net) == modules
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def _change_weights_by_optimiser(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


@pytest.mark.parametrize("change", [
    _change_weights_by_optimiser,
    lambda net, x, y: net[0].weight.data.mul_(-3),  # through .data: no version counter moves
    lambda net, x, y: net[1].running_var.data.mul_(4),
    lambda net, x, y: setattr(net[4], "eps", 0.5),
    lambda net, x, y: setattr(net[5], "factor", -2.0),  # a plain attribute of another module
    lambda net, x, y: net.load_state_dict(convnet(seed=7).state_dict(), assign=True),
    lambda net, x, y: net.__setitem__(3, nn.Conv2d(6, 8, 3, padding=1).double()),
], ids=["optimiser", "data", "running-var", "eps", "attribute", "assign", "swapped-layer"])
def test_each_call_folds_the_model_as_it_is_then(change):
    net, (x, y) = convnet(), data()
    attack = create_attack("fgsm", net, eps=8 / 255)
    first = attack(x, y)
    change(net, x, y)
    net.eval()
    again = attack(x, y)
    assert not torch.equal(again, first)
    assert same(again, as_given("fgsm", net)(x, y))


def test_an_error_inside_the_attack_puts_the_model_back():
    net, (x, _) = convnet(), data()
    modules = tree(net)
    with pytest.raises(ValueError, match="class indices"):
        create_attack("fgsm", net, eps=8 / 255)(x, torch.full((len(x),), K + 3))
    assert tree(net) == modules and sum(isinstance(m, nn.BatchNorm2d) for m in net) == 2


def test_two_threads_attacking_one_model_get_the_unfolded_images():
    net, (x, y) = convnet(), data()
    attack, reference = create_attack("ifgsm4", net, eps=8 / 255), as_given("ifgsm4", net)(x, y)
    modules, out, errors = tree(net), [None] * 4, []

    def work(i):
        try:
            out[i] = attack(x, y)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(same(o, reference) for o in out)
    assert tree(net) == modules and attack.model is net


def test_two_threads_attacking_a_model_and_a_sequential_holding_it_leave_both_as_they_were():
    net, (x, y) = convnet(), data()
    outer = nn.Sequential(nn.Identity(), net)
    modules, errors = tree(outer), []
    reference = as_given("fgsm", net)(x, y)

    def work(model):
        attack = create_attack("fgsm", model, eps=8 / 255)
        try:
            for _ in range(20):
                assert same(attack(x, y), reference)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in (net, outer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and tree(outer) == modules


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_hooked_layers_are_left_alone_so_their_hooks_run_and_legacy_weight_norm_stays_current():
    net, (x, y) = convnet(), data()
    seen = []
    net[1].register_forward_hook(lambda *_: seen.append(1))
    assert count_foldable(net) == 1
    attack = create_attack("fgsm", net, eps=8 / 255)
    attack(x, y)
    assert seen
    net[4].register_forward_pre_hook(lambda *_: seen.append(4))  # after a call: no registration hook sees it
    attack(x, y)
    assert 4 in seen
    legacy = convnet()
    nn.utils.weight_norm(legacy[0])  # computes the weight in a forward pre-hook
    attack = create_attack("fgsm", legacy, eps=8 / 255)
    attack(x, y)
    _change_weights_by_optimiser(legacy, x, y)
    legacy.eval()
    assert same(attack(x, y), as_given("fgsm", legacy)(x, y))


class Residual(nn.Sequential):
    """A Sequential whose own forward uses the convolution's output twice: not foldable."""

    def forward(self, x):
        h = self[0](x)
        return torch.relu(self[1](h) + h)


def test_sequential_subclasses_with_their_own_forward_and_parametrized_convolutions_are_left_alone():
    res = nn.Sequential(Residual(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)), nn.Flatten(),
                        nn.Linear(3 * 64, K)).double()
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.BatchNorm2d(4),
                           nn.Flatten(), nn.Linear(4 * 64, K)).double()
    for net in (res, normed):
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
        net.eval()
        assert count_foldable(net) == 0
        x, y = data()
        assert same(create_attack("fgsm", net, eps=8 / 255)(x, y), as_given("fgsm", net)(x, y))


def test_a_data_parallel_wrapper_runs_as_given(bn_calls):
    net = nn.DataParallel(convnet())
    calls = bn_calls
    x, y = data()
    assert same(create_attack("fgsm", net, eps=8 / 255)(x, y), as_given("fgsm", net)(x, y))
    assert calls[0] == 2 * 2  # both BatchNorms, in both attacks
