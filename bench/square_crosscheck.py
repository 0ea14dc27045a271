"""Cross-check raydefense's Square Attack against the authors' reference implementation.

The reference is ``square_attack_linf`` in ``attack.py`` of github.com/max-andr/square-attack
(Andriushchenko, Croce, Flammarion & Hein, ECCV 2020; BSD-3-Clause). It is not a dependency
and not copied into this repository: the script loads it from a local copy you make once::

    git clone https://github.com/max-andr/square-attack /tmp/square-attack
    # or, from a bare mirror:  mkdir /tmp/square-attack && \\
    #   git --git-dir=/path/to/square-attack.git archive HEAD attack.py utils.py | tar -x -C /tmp/square-attack
    SQUARE_ATTACK_REF=/tmp/square-attack python bench/square_crosscheck.py      # or --ref /tmp/square-attack

What it does: per seed, renders a small synthetic face set (raydefense.data.synthetic), trains a
tiny CNN on it (a few seconds on CPU), and attacks the correctly classified test images with both
implementations at the same eps, p_init and query budget; it prints, per eps, each one's success
rate and mean / median queries of the successful images. Both are randomised (and the reference
re-seeds NumPy with 0 inside every call), so the comparison is of distributions over seeds,
models and images, not image by image.

How the reference is loaded: ``attack.py`` imports at module level its own ``models`` (TensorFlow
and checkpoints of the paper's models) and ``data`` (ImageNet loaders), neither needed by
``square_attack_linf``; the loader puts empty stand-ins for those two names in ``sys.modules``
while the file is imported, then removes them. The reference's model interface (``predict`` on
NumPy images, ``loss`` with its margin loss, from its ``models.Model``) is re-created in
:class:`RefModel` with the same definition. Its per-iteration log is silenced.

Query counts are made comparable: the reference counts the starting point as query 1 and is
given only correctly classified images; raydefense's ``last_queries`` also counts the clean
prediction, which is subtracted here.

Takes about 5 minutes on an idle 2-core machine with the defaults (the reference loops over
images in Python; ~10-30 s per eps and seed for each implementation), 10-15 on a loaded one.

Measured (2 cores, torch 2.14.1 CPU, reference at commit ea95eeb; 8 identities at 32 px, tiny CNN
25 epochs, 1000 queries; success = fraction of the correctly classified test images fooled):

    p_init 0.3, seeds 0-2 (147 images)    success rate        mean / median queries of successes
                                          reference  ours     reference      ours
      2/255                               0.129      0.129    115 / 7        151 / 11
      4/255                               0.238      0.245    104 / 20       124 / 14
      8/255                               0.435      0.408    123 / 12       118 / 9
    p_init 0.8, seeds 3-5 (130 images)
      2/255                               0.154      0.169     77 / 20       181 / 78
      4/255                               0.308      0.285    130 / 6         72 / 14
      8/255                               0.508      0.531    100 / 6        115 / 9

    p_init 0.8, 16 identities, 300 queries, seeds 6-7 (232 images)
      4/255                               0.211      0.220     57 / 24        47 / 17
      8/255                               0.448      0.448     54 / 16        57 / 14

Success at the budget agrees within one to three images per seed; query counts of the few
successful images are noisy both ways (a handful of late successes move the means). The early
success curve (within 10 queries) was lower for ours in the seeds 3-5 run (0.046 / 0.123 / 0.277
vs 0.077 / 0.169 / 0.292) and higher in the seeds 6-7 run (0.103 / 0.207 vs 0.078 / 0.190):
noise, not a systematic gap.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raydefense.attacks.square import Square
from raydefense.data.synthetic import make_synthetic_faces


def load_reference(path: str) -> types.ModuleType:
    """Import ``attack.py`` (and its ``utils.py``) from the reference checkout at ``path``."""
    attack_py = os.path.join(path, "attack.py")
    if not os.path.isfile(attack_py):
        raise SystemExit(f"square_crosscheck: no attack.py under {path!r}; see this script's docstring for how to get it")
    stubs = {name: types.ModuleType(name) for name in ("models", "data")}
    spec_utils = importlib.util.spec_from_file_location("utils", os.path.join(path, "utils.py"))
    utils = importlib.util.module_from_spec(spec_utils)
    spec_utils.loader.exec_module(utils)
    saved = {name: sys.modules.get(name) for name in ("models", "data", "utils")}
    sys.modules.update(stubs)
    sys.modules["utils"] = utils
    try:
        spec = importlib.util.spec_from_file_location("square_reference_attack", attack_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old

    class _Quiet:
        def print(self, message: str) -> None:  # the reference logs every iteration
            pass

    module.log = _Quiet()  # a global the reference's __main__ sets
    return module


class RefModel:
    """The reference's model interface around a torch model (its ``models.Model.predict`` / ``loss``)."""

    def __init__(self, model: nn.Module, batch: int = 256):
        self.model, self.batch = model, batch

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        out = [self.model(torch.from_numpy(x[i:i + self.batch]).float()).double().numpy()
               for i in range(0, len(x), self.batch)]
        return np.concatenate(out) if out else np.zeros((0, 0))

    @staticmethod
    def loss(y: np.ndarray, logits: np.ndarray, targeted: bool = False, loss_type: str = "margin_loss") -> np.ndarray:
        """The reference's definition: margin = z_y - max_{i != y} z_i (y one-hot, bool)."""
        if loss_type != "margin_loss":
            raise ValueError(f"only the margin loss is wired here, got {loss_type!r}")
        correct = (logits * y).sum(1, keepdims=True)
        diff = correct - logits
        diff[y] = np.inf
        margin = diff.min(1, keepdims=True)
        return (margin * -1 if targeted else margin).flatten()


def tiny_cnn(num_classes: int) -> nn.Module:
    layers, cin = [], 3
    for cout in (16, 32, 64):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def make_task(seed: int, *, identities: int, size: int, epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained on synthetic faces, and its correctly classified test images."""
    images, labels = make_synthetic_faces(num_identities=identities, images_per_identity=40, image_size=size, seed=seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels).long()
    test = (torch.arange(len(y)) % 40) >= 30
    torch.manual_seed(seed)
    model = tiny_cnn(identities)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = x[~test], y[~test]
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        ok = model(x[test]).argmax(1) == y[test]
    print(f"seed {seed}: clean test accuracy {ok.double().mean():.3f} ({int(ok.sum())}/{int(test.sum())})")
    return model, x[test][ok], y[test][ok]


def run_reference(ref, model, x, y, *, eps, n_queries, p_init, k):
    onehot = np.zeros((len(y), k), dtype=bool)
    onehot[np.arange(len(y)), y.numpy()] = True
    with tempfile.TemporaryDirectory() as tmp:
        queries, x_adv = ref.square_attack_linf(RefModel(model), x.numpy().astype(np.float64), onehot,
                                                np.ones(len(y), dtype=bool), eps, n_queries, p_init,
                                                os.path.join(tmp, "metrics"), False, "margin_loss")
    with torch.no_grad():
        fooled = model(torch.from_numpy(x_adv).float()).argmax(1) != y
    dist = np.abs(x_adv - x.numpy()).max()
    return fooled.numpy(), np.asarray(queries), dist


def run_ours(model, x, y, *, eps, n_queries, p_init, seed):
    attack = Square(model, eps=eps, n_queries=n_queries, p_init=p_init, generator=torch.Generator().manual_seed(seed))
    adv = attack(x, y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    return fooled.numpy(), (attack.last_queries - 1).numpy(), (adv - x).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=os.environ.get("SQUARE_ATTACK_REF"),
                        help="directory with the reference attack.py and utils.py (default: $SQUARE_ATTACK_REF)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eps", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="in /255 units")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--p-init", type=float, default=0.3, help="0.3: the paper's value for robust models; the reference CLI defaults to 0.05, AutoAttack uses 0.8")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.ref:
        raise SystemExit("square_crosscheck: pass --ref DIR or set SQUARE_ATTACK_REF (see the docstring)")
    torch.set_num_threads(args.threads)
    # The reference takes np.mean of empty arrays while no image is fooled yet (NaN, harmless).
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")
    ref = load_reference(args.ref)
    totals: dict[tuple[str, float], list] = {}
    for seed in args.seeds:
        model, x, y = make_task(seed, identities=args.identities, size=args.size, epochs=args.epochs)
        for eps255 in args.eps:
            eps = eps255 / 255
            for name in ("reference", "raydefense"):
                start = time.perf_counter()
                if name == "reference":
                    fooled, queries, dist = run_reference(ref, model, x, y, eps=eps, n_queries=args.queries,
                                                          p_init=args.p_init, k=args.identities)
                else:
                    fooled, queries, dist = run_ours(model, x, y, eps=eps, n_queries=args.queries,
                                                     p_init=args.p_init, seed=seed)
                took = time.perf_counter() - start
                assert dist <= eps + 1e-6, f"{name} left the ball: {dist} > {eps}"
                assert queries.max() <= args.queries, f"{name} exceeded the budget: {queries.max()}"
                q = queries[fooled]
                print(f"  seed {seed} eps {eps255:g}/255 {name:10s}: success {fooled.mean():.3f} ({int(fooled.sum())}/{len(fooled)}), "
                      f"queries of successes mean {q.mean() if len(q) else float('nan'):.1f} median "
                      f"{np.median(q) if len(q) else float('nan'):.0f}, max |delta| {dist * 255:.3f}/255, {took:.1f} s")
                totals.setdefault((name, eps255), []).append((fooled, queries))
    print(f"\nAll seeds {args.seeds}, budget {args.queries} queries, p_init {args.p_init}:")
    marks = [m for m in (10, 100, 300) if m < args.queries] + [args.queries]
    print("| eps | implementation | n | " + " | ".join(f"success <= {m} q" for m in marks)
          + " | mean queries (successes) | median |")
    print("|---|---|---|" + "---|" * len(marks) + "---|---|")
    for eps255 in args.eps:
        for name in ("reference", "raydefense"):
            fooled = np.concatenate([f for f, _ in totals[(name, eps255)]])
            queries = np.concatenate([qq for _, qq in totals[(name, eps255)]])
            q = queries[fooled]
            curve = " | ".join(f"{(fooled & (queries <= m)).mean():.3f}" for m in marks)
            print(f"| {eps255:g}/255 | {name} | {len(fooled)} | {curve} | "
                  f"{q.mean() if len(q) else float('nan'):.1f} | {np.median(q) if len(q) else float('nan'):.0f} |")


if __name__ == "__main__":
    main()
