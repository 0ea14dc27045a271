"""The robust evaluation actor's batching without Ray or trained models: runs that differ only in
eps or random start go through the model as one replicated call; that must give each image the
same answer as attacking it group by group, in any chunk size, and the actor's flags must
never claim robustness on an image the defense gets wrong clean."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.pipeline.robust_eval import RobustEvalActor, _correct

K = 5


class Linear(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(K, 3 * 4 * 4, generator=gen, dtype=torch.float64))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return F.linear(x.flatten(1).double(), self.weight)


def actor(models, max_rows=512, eps=(0.01, 0.03, 0.1)):
    a = object.__new__(RobustEvalActor)  # the constructor loads a run's models; set its state by hand
    a.device, a.models = torch.device("cpu"), models
    a.eot = {n: 1 for n in models}
    a.surrogate = Linear(seed=7)
    a.eps, a.headline, a.large = list(eps), eps[1], 0.5
    a.steps, a.restarts, a.apgd_steps, a.queries = 5, 1, 5, 20
    a.seed, a.max_rows = 3, max_rows
    return a


def images(n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 4, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["pgd", "apgd"])
@pytest.mark.parametrize("max_rows", [512, 7])
def test_replicated_call_equals_group_by_group(kind, max_rows):
    model = Linear()
    x = images()
    with torch.no_grad():
        y = model(x).argmax(1)
    index = np.arange(100, 100 + len(x))
    a = actor({"m": model}, max_rows=max_rows)
    attack = a._pgd_fn(steps=5, restarts=1, eot=1) if kind == "pgd" else a._apgd_fn("ce", 1)
    groups = [(e, ("m", kind, k)) for k, e in enumerate(a.eps)] + [(a.headline, ("m", kind, "again"))]
    together = a._replicated(model, attack, x, y, index, groups)
    for (e, key), got in zip(groups, together):
        alone = _correct(model, attack(model, x, y, torch.full((len(x),), e, dtype=x.dtype), a._seeds(index, *key)), y)
        assert np.array_equal(got, alone), key
    assert together[0].sum() >= together[2].sum()  # a larger eps breaks at least as many here


def test_flags_never_above_clean_and_fewer_calls_than_one_per_group():
    model = Linear()
    x = images(n=16)
    y = torch.arange(16) % K  # about a fifth right clean
    a = actor({"m": model})
    batch = {"image": (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), "label": y.numpy(),
             "index": np.arange(16)}
    model.calls = 0
    out = a(batch)
    clean = out["m:clean"]
    assert 0 < clean.sum() < 16
    for key, flags in out.items():
        if key.startswith("m:"):
            assert not (flags & ~clean).any(), key  # wrong clean: never robust
    for k in range(3):
        worst = out[f"m:pgd:{k}"] & out[f"m:apgd_ce:{k}"] & out[f"m:apgd_dlr:{k}"] & out[f"m:square:{k}"]
        assert worst.sum() <= min(out[f"m:{a_}:{k}"].sum() for a_ in ("pgd", "apgd_ce", "apgd_dlr", "square"))
    # One call per pass for every replicated attack: clean + class count, PGD (steps + 1 passes,
    # then its check), PGD 2x steps, APGD-CE and -DLR (steps + 1 each, then a check), Square
    # (queries + 1, then a check), the transfer checks. Group by group the PGD runs alone would
    # take 6 x (steps + 2) = 42 calls and APGD 2 x 3 x (steps + 2) = 42.
    bound = 2 + (a.steps + 2) + (2 * a.steps + 2) + 2 * (a.apgd_steps + 2) + (a.queries + 2) + 3
    assert model.calls <= bound, (model.calls, bound)
