"""Square Attack: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020 (the L-inf version, their Algorithm 1
with the L-inf sampling distribution of section 3.1; the fourth attack of AutoAttack).

A score-based attack: it reads only the model's logits, never a gradient, so gradient masking
(a non-differentiable step, saturated logits, shattered or obfuscated gradients; Athalye, Carlini
& Wagner, ICML 2018) does not slow it down. That is its role here: a gradient-free yardstick in
the masking checks of :mod:`raydefense.robust.masking`.

Written from the paper; cross-checked against the authors' reference implementation
(github.com/max-andr/square-attack, ``attack.py::square_attack_linf``) by
``bench/square_crosscheck.py``, which loads that code from a local copy and is not a dependency.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydefense.attacks.base import Attack, EpsLike, register_attack

__all__ = ["Square", "square_p_schedule", "square_margin"]

# Redraws of a square whose new values would not change the image. The reference redraws until
# the square changes (an unbounded loop, which never ends where clipping to [0, 1] leaves only one
# value); with C channels a draw repeats the current square with probability 2^-C, so 16 redraws
# leave a wasted query with probability 2^-16C. Bounded here so no input can hang the attack.
_MAX_REDRAWS = 16


def square_p_schedule(p_init: float, iteration: int, n_queries: int) -> float:
    """Fraction of pixels the square covers at ``iteration`` (0-based) of a ``n_queries`` budget.

    The piecewise-constant schedule of Andriushchenko et al. (2020, section 3 and their code),
    stated for 10,000 iterations and rescaled to ``n_queries``: ``p_init`` for the first 10,
    then halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (of 10,000).

    Raises:
        ValueError: ``n_queries < 1``.
    """
    if n_queries < 1:
        raise ValueError(f"square_p_schedule: n_queries must be >= 1, got {n_queries}")
    it = int(iteration / n_queries * 10000)
    for halvings, bound in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000, 10000)):
        if it <= bound:
            return p_init / 2**halvings
    return p_init  # past the budget (never reached by the attack): the reference's fallback


def square_margin(logits: Tensor, labels: Tensor, *, targeted: bool = False) -> Tensor:
    """The margin loss the attack *minimises*, ``(B, K), (B,) -> (B,)``.

    Untargeted: ``z_y - max_{i != y} z_i`` (negative once the image is misclassified).
    Targeted (labels are targets): ``max_{i != t} z_i - z_t`` (negative once the target wins).

    Raises:
        ValueError: labels outside ``[0, K-1]``, or fewer than 2 classes.
    """
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"Square: the margin loss needs at least 2 classes, the model gives {k}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"Square: labels must be class indices in [0, {k - 1}] for a model with {k} classes, "
                         f"got min {int(labels.min())}, max {int(labels.max())}")
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return others - z_y if targeted else z_y - others


@register_attack("square")
class Square(Attack):
    """Square Attack, L-inf, score-based (no gradients): random search over vertical-stripe and
    square-shaped perturbations at the corners of the eps-ball (Andriushchenko et al., ECCV 2020).

    Per image not yet fooled: start from ``x + eps * s`` with one random sign per channel and
    column (vertical stripes), clipped to ``[0, 1]``. Then, for each remaining query, pick a
    random square of side ``round(sqrt(p * H * W))`` (``p`` from :func:`square_p_schedule`),
    set the perturbation inside it to ``+eps`` or ``-eps`` per channel (redrawn if that would
    not change the image), and keep the new point if it lowers the loss. An image stops being
    attacked (and queried) once the model misclassifies it (untargeted) or predicts the target.

    Queries: ``n_queries`` per image and restart, counted as in the paper and the reference code
    (the starting point is the first). Before the first restart every image costs one more query,
    the clean prediction that decides which images need attacking (already misclassified ones,
    and those with eps 0, come back unchanged). So an image costs at most
    ``1 + restarts * n_queries`` forward passes; after a call, ``last_queries`` ``(B,)`` holds
    each image's count.

    Args:
        model: maps ``[0, 1]`` images ``(B, C, H, W)`` to logits ``(B, K)``, K >= 2; only its
            outputs are used. For an adaptive evaluation, the whole defended model.
        eps: L-inf budget in ``[0, 1]`` units (default 8/255), a float or one value per image.
        n_queries: queries per image and restart (default 5000, AutoAttack's standard version).
        p_init: initial fraction of pixels in the square (default 0.8, AutoAttack's value for
            L-inf; the paper used 0.05 for undefended ImageNet models, 0.3 for robust ones).
        restarts: independent runs (default 1); later ones attack only images not yet fooled,
            and each image keeps its lowest-loss point over all runs.
        loss: ``'margin'`` (default; :func:`square_margin`) or ``'ce'`` (the untargeted loss is
            minus the cross-entropy of the label, the targeted one the cross-entropy of the target).
        targeted: labels are target classes.
        generator: a ``torch.Generator`` for every random draw (signs, square positions), for
            reproducible runs independent of the global RNG; ``None`` uses torch's global RNG.
            Draws are made on the generator's device and moved to the model's.

    Shapes: images ``(B, C, H, W)`` in ``[0, 1]`` with ``H, W >= 2``, labels ``(B,)`` ->
    ``(B, C, H, W)``.

    Raises:
        ValueError: a bad argument (named), images smaller than 2 x 2, labels outside the
            model's classes; plus the input checks of :class:`~raydefense.attacks.base.Attack`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: EpsLike = 8 / 255,
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        loss: str = "margin",
        targeted: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, eps=eps, targeted=targeted)
        for key, value in (("n_queries", n_queries), ("restarts", restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Square: {key} must be a positive int, got {value!r}")
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < float(p_init) <= 1:
            raise ValueError(f"Square: p_init must be a number in (0, 1], got {p_init!r}")
        if loss not in ("margin", "ce"):
            raise ValueError(f"Square: unknown loss {loss!r}; known: 'margin', 'ce'")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Square: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.n_queries, self.restarts, self.loss = n_queries, restarts, loss
        self.p_init = float(p_init)
        self.generator = generator
        self.last_queries: Tensor | None = None

    # ------------------------------------------------------------------ random draws
    def _randint(self, high: int, size: tuple[int, ...], device: torch.device) -> Tensor:
        gen = self.generator
        where = gen.device if gen is not None else torch.device("cpu")
        return torch.randint(0, high, size, generator=gen, device=where).to(device)

    def _signs(self, size: tuple[int, ...], like: Tensor) -> Tensor:
        return (2 * self._randint(2, size, like.device) - 1).to(like.dtype)

    # ------------------------------------------------------------------ the attack
    @torch.no_grad()
    def _score(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss to minimise (B,), fooled (B,) bool)`` of ``x``: one query per image."""
        logits = self.model(x)
        margin = square_margin(logits, y, targeted=self.targeted)
        if self.loss == "margin":
            loss = margin
        else:
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = ce if self.targeted else -ce
        # Fooled as every accuracy here is measured: by the argmax (a margin of exactly 0 is a tie).
        pred = logits.argmax(dim=1)
        return loss, (pred == y) if self.targeted else (pred != y)

    @torch.no_grad()
    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Best over ``restarts`` runs; sets ``last_queries``."""
        b, _, h, w = images.shape
        if min(h, w) < 2:
            raise ValueError(f"Square: images must be at least 2 x 2 pixels, got {h} x {w}")
        eps = self.budget(self.eps, images)
        eps = eps.expand(b, 1, 1, 1) if eps.ndim == 0 else eps
        queries = torch.zeros(b, dtype=torch.long, device=images.device)
        best = images.clone()
        if b == 0:
            self.last_queries = queries
            return best
        best_loss, fooled = self._score(images, labels)
        queries += 1
        attackable = eps.flatten() > 0
        for _ in range(self.restarts):
            todo = (attackable & ~fooled).nonzero().flatten()
            if todo.numel() == 0:
                break
            adv, loss, hit, used = self._run(images[todo], labels[todo], eps[todo])
            queries[todo] += used
            better = hit | (loss < best_loss[todo])
            idx = todo[better]
            best[idx], best_loss[idx] = adv[better], loss[better]
            fooled[todo] |= hit
        self.last_queries = queries
        return best

    def _run(self, x: Tensor, y: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One run: ``(best point, its loss, fooled, queries used)``, each with leading dim n."""
        n, c, h, w = x.shape
        # Start: vertical stripes, one sign per (channel, column) (section 3.1: "stripes work best").
        x_best = (x + eps * self._signs((n, c, 1, w), x)).clamp(0, 1)
        loss_best, fooled = self._score(x_best, y)
        used = torch.ones(n, dtype=torch.long, device=x.device)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        for i in range(self.n_queries - 1):
            idx = (~fooled).nonzero().flatten()
            m = idx.numel()
            if m == 0:
                break
            xc, xb, e = x[idx], x_best[idx], eps[idx]
            p = square_p_schedule(self.p_init, i, self.n_queries)
            side = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)
            # The reference draws the corner from [0, H - side), so a square never touches the last
            # row/column alone; kept for fidelity (the stripes at the start cover every pixel).
            top = self._randint(h - side, (m,), x.device).view(m, 1, 1, 1)
            left = self._randint(w - side, (m,), x.device).view(m, 1, 1, 1)
            inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)  # (m, 1, H, W)
            new = e * self._signs((m, c, 1, 1), x)
            for _ in range(_MAX_REDRAWS):
                # unchanged: every pixel of the square keeps its value (the reference's 1e-7 test)
                unchanged = (((xc + new).clamp(0, 1) - xb).abs() < 1e-7) | ~inside
                same = unchanged.flatten(1).all(dim=1)
                if not bool(same.any()):
                    break
                new = torch.where(same.view(m, 1, 1, 1), e * self._signs((m, c, 1, 1), x), new)
            cand = torch.where(inside, (xc + new).clamp(0, 1), xb)
            loss, hit = self._score(cand, y[idx])
            used[idx] += 1
            improved = loss < loss_best[idx]
            keep = idx[improved]
            x_best[keep], loss_best[keep], fooled[keep] = cand[improved], loss[improved], hit[improved]
        return x_best, loss_best, fooled, used

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, n_queries={self.n_queries}, p_init={self.p_init}, "
                f"restarts={self.restarts}, loss={self.loss!r})")
