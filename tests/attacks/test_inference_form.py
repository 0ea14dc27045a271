"""Attacks differentiate the model's inference form (BatchNorm folded into a copy): the same
adversarial images as on the model as given, the caller's model untouched, and the copy remade
whenever the model's weights or structure change (raydefense.models.fusion.InferenceFormCache)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydefense.attacks import create_attack

K = 5


def convnet(seed: int = 0) -> nn.Sequential:
    """Conv + BatchNorm + ReLU twice, then a linear head, in float64, with BatchNorm statistics
    and affine parameters far from the identity (so an unfolded and a folded pass differ in
    work, not in function)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
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


def bn_calls(model: nn.Module) -> list[int]:
    """A counter of forward calls into ``model``'s BatchNorm layers."""
    calls = [0]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", ["fgsm", "ifgsm4", "apgd"])
def test_the_folded_attack_makes_the_same_images_without_running_the_given_batch_norms(name):
    net, (x, y) = convnet(), data()
    calls = bn_calls(net)
    torch.manual_seed(3)
    folded = create_attack(name, net, eps=8 / 255)(x, y)
    assert calls[0] == 0, "the attack ran the given model's BatchNorm layers, not the folded copy"
    torch.manual_seed(3)
    reference = as_given(name, net)(x, y)
    assert calls[0] > 0
    # float64: folding moves gradients by ~1e-16, far from flipping any sign.
    assert torch.allclose(folded, reference, rtol=0, atol=1e-12)
    assert (folded - x).abs().max() > 0


def test_the_given_model_keeps_its_modules_weights_statistics_flags_and_mode():
    net, (x, y) = convnet(), data()
    net.train()
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    create_attack("pgd", net, eps=8 / 255, steps=3)(x, y)
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net) == 2
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


def test_the_copy_is_reused_while_nothing_changes_and_remade_after_an_optimiser_step():
    net, (x, y) = convnet(), data()
    attack = create_attack("fgsm", net, eps=8 / 255)
    first = attack(x, y)
    copy = attack._inference_form.get(net)
    attack(x, y)
    assert attack._inference_form.get(net) is copy
    nn.Linear(2, 2)  # registers parameters elsewhere (torchattacks does on each call): nothing of net's changed
    attack(x, y)
    assert attack._inference_form.get(net) is copy
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    stepped = attack(x, y)
    assert attack._inference_form.get(net) is not copy
    assert not torch.equal(stepped, first)
    assert torch.allclose(stepped, as_given("fgsm", net)(x, y), rtol=0, atol=1e-12)


def test_the_copy_is_remade_after_load_state_dict_with_assign_and_after_a_swapped_layer():
    net, (x, y) = convnet(), data()
    attack = create_attack("fgsm", net, eps=8 / 255)
    attack(x, y)
    # New tensors assigned (not copied in place): same shapes, other values.
    net.load_state_dict(convnet(seed=7).state_dict(), assign=True)
    assert torch.allclose(attack(x, y), as_given("fgsm", net)(x, y), rtol=0, atol=1e-12)
    with torch.no_grad():
        net[3] = nn.Conv2d(6, 8, 3, padding=1).double()
    assert torch.allclose(attack(x, y), as_given("fgsm", net)(x, y), rtol=0, atol=1e-12)


def test_a_model_with_nothing_to_fold_is_used_as_given():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, K)).double()
    attack = create_attack("fgsm", net, eps=8 / 255)
    x, y = data()
    attack(x, y)
    assert attack._inference_form.get(net) is net


def test_a_data_parallel_wrapper_is_used_as_given():
    net = nn.DataParallel(convnet())
    attack = create_attack("fgsm", net, eps=8 / 255)
    x, y = data()
    assert torch.allclose(attack(x, y), as_given("fgsm", net)(x, y), rtol=0, atol=1e-12)
    assert attack._inference_form.get(net) is net
