"""Gradient-masking checks over measured robust accuracies, each a pass/fail with its numbers.

The checks of Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry & Kurakin,
"On Evaluating Adversarial Robustness" (arXiv:1902.06705, 2019; section 5, "basic sanity tests",
and the checklist of their appendix), which Athalye, Carlini & Wagner ("Obfuscated Gradients
Give a False Sense of Security", ICML 2018, section 3.1) list as the signs of obfuscated
gradients. Per defense:

``eps_monotone``
    Robust accuracy does not increase with eps (a larger ball contains the smaller one).
``large_eps``
    At a very large eps (e.g. 0.5 or 1, where any image is reachable) accuracy falls to about 0.
``stronger_attack``
    Doubling steps (or restarts) does not change accuracy beyond the interval, in *either*
    direction. Lower means the base attack had not converged (the reported robust accuracy
    overstates robustness: Carlini et al. 2019, "verify iterative attacks converge"); higher
    means the attack is unstable (a randomised defense without enough EOT samples, or a bug),
    since a stronger attack on the same images cannot be weaker.
``gradient_free``
    The gradient-free attack (Square) is not stronger than the best gradient attack at the same
    eps beyond the interval (if it is, the gradients are masked: Athalye et al. 2018).
``transfer``
    Transfer (black-box) attacks from a surrogate are not stronger than the best white-box
    attack at the same eps beyond the interval.

"Beyond the interval" is one rule everywhere (:func:`differs`): two accuracies differ when each
point estimate lies outside the other's 95% Wilson interval
(:func:`raydefense.report.stats.wilson`). The intervals are of independent binomials; the
measurements are usually paired (the same images), for which this rule is conservative: with a
few dozen images only large gaps fail, and the rendered numbers say how large each gap was.

The checks are pure functions over :class:`Accuracy` records (correct count and n); nothing here
runs an attack. :func:`render_markdown` makes the report's table; :func:`flagged` names the
defenses that failed any check.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from raydefense.report.stats import wilson

__all__ = [
    "Accuracy",
    "CheckResult",
    "differs",
    "check_eps_monotone",
    "check_large_eps",
    "check_stronger_attack",
    "check_gradient_free",
    "check_transfer",
    "masking_checks",
    "flagged",
    "render_markdown",
]


@dataclass(frozen=True)
class Accuracy:
    """An accuracy measured as ``correct`` of ``n`` images, with its 95% Wilson interval.

    Raises:
        ValueError: ``n < 1`` or ``correct`` outside ``[0, n]`` (or not whole numbers).
    """

    correct: int
    n: int

    def __post_init__(self) -> None:
        for key in ("correct", "n"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Accuracy: {key} must be an int, got {value!r}")
        if self.n < 1 or not 0 <= self.correct <= self.n:
            raise ValueError(f"Accuracy: need n >= 1 and 0 <= correct <= n, got correct={self.correct}, n={self.n}")

    @classmethod
    def of(cls, value: Any, n: int | None = None) -> "Accuracy":
        """From an :class:`Accuracy`, a ``(correct, n)`` pair, a fraction with ``n``, or a metrics
        record ``{"accuracy": fraction, "n": n, ...}`` (:func:`raydefense.report.stats.proportion`).

        A fraction must be a whole number of images out of n (within 1e-6), else ValueError.
        """
        if isinstance(value, Accuracy):
            return value
        if isinstance(value, Mapping):
            if "accuracy" not in value or "n" not in value:
                raise ValueError(f"Accuracy.of: a record needs 'accuracy' and 'n', got keys {sorted(value)}")
            value, n = value["accuracy"], value["n"]
        elif isinstance(value, (tuple, list)):
            if len(value) != 2:
                raise ValueError(f"Accuracy.of: a pair must be (correct, n), got {value!r}")
            try:  # operator.index: any integer type (NumPy too), but not 2.7 images
                return cls(operator.index(value[0]), operator.index(value[1]))
            except TypeError as exc:
                raise ValueError(f"Accuracy.of: a pair must be two integers (correct, n), got {value!r}") from exc
        if n is None:
            raise ValueError(f"Accuracy.of: a fraction ({value!r}) needs n")
        n = int(n)
        frac = float(value)
        correct = round(frac * n)
        if not math.isfinite(frac) or abs(correct - frac * n) > 1e-6 * max(n, 1):
            raise ValueError(f"Accuracy.of: {value!r} is not a whole number of images out of n={n}")
        return cls(int(correct), n)

    @property
    def value(self) -> float:
        """``correct / n``."""
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval ``(low, high)``."""
        return wilson(self.correct, self.n)

    def __str__(self) -> str:
        lo, hi = self.interval
        return f"{100 * self.value:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={self.n})"


def differs(a: Accuracy, b: Accuracy) -> int:
    """``+1`` if ``a`` is higher than ``b`` beyond the interval, ``-1`` if lower, else ``0``.

    Beyond the interval: each point estimate lies outside the other's 95% Wilson interval.
    """
    (alo, ahi), (blo, bhi) = a.interval, b.interval
    if a.value > bhi and b.value < alo:
        return 1
    if a.value < blo and b.value > ahi:
        return -1
    return 0


@dataclass(frozen=True)
class CheckResult:
    """One check of one defense: ``passed`` and the numbers behind it.

    ``check``: the check's name (see the module docstring); ``passed``: ``True``/``False``, or
    ``None`` when the inputs it needs were not measured (shown as "not run", never as a pass);
    ``numbers``: a one-line human-readable statement with the accuracies compared;
    ``details``: the same numbers, machine-readable (for ``metrics.json``).
    """

    check: str
    passed: bool | None
    numbers: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sorted_eps(by_eps: Mapping[float, Any]) -> list[tuple[float, Accuracy]]:
    items = []
    for eps, acc in by_eps.items():
        e = float(eps)
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"masking checks: eps must be finite and >= 0, got {eps!r}")
        items.append((e, Accuracy.of(acc)))
    return sorted(items)


def _eps(e: float) -> str:
    return f"{e * 255:g}/255"


def check_eps_monotone(by_eps: Mapping[float, Any]) -> CheckResult:
    """Robust accuracy does not increase with eps beyond the interval.

    Args:
        by_eps: ``{eps: accuracy}`` of one attack (usually the strongest gradient attack) on one
            defense, eps in ``[0, 1]`` pixel units, accuracies as :meth:`Accuracy.of` takes.

    Every pair ``eps_i < eps_j`` is compared (not only neighbours: a slow rise over several
    steps is caught too). Fewer than two eps: ``passed=None``.
    """
    items = _sorted_eps(by_eps)
    curve = ", ".join(f"{_eps(e)}: {100 * a.value:.1f}%" for e, a in items)
    if len(items) < 2:
        return CheckResult("eps_monotone", None, f"needs two or more eps, got {len(items)}")
    rises = [(e1, a1, e2, a2) for i, (e1, a1) in enumerate(items) for e2, a2 in items[i + 1:] if differs(a2, a1) > 0]
    details = {"curve": [[e, a.correct, a.n] for e, a in items],
               "rises": [[e1, e2] for e1, _, e2, _ in rises]}
    if rises:
        e1, a1, e2, a2 = rises[0]
        return CheckResult("eps_monotone", False, f"rises from {a1} at {_eps(e1)} to {a2} at {_eps(e2)}; curve {curve}", details)
    return CheckResult("eps_monotone", True, f"no rise beyond the interval; curve {curve}", details)


def check_large_eps(eps: float, accuracy: Any, *, tolerance: float = 0.02) -> CheckResult:
    """At a very large eps the accuracy falls to about 0.

    Passes when the 95% interval's low end is at most ``tolerance`` (default 2%): the data are
    consistent with an accuracy of about 0. With n = 24 that allows one surviving image, not three.

    Raises:
        ValueError: ``tolerance`` outside ``[0, 1)``.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"check_large_eps: tolerance must be in [0, 1), got {tolerance!r}")
    acc = Accuracy.of(accuracy)
    low = acc.interval[0]
    details = {"eps": float(eps), "correct": acc.correct, "n": acc.n, "tolerance": tolerance}
    passed = low <= tolerance
    verdict = "falls to about 0" if passed else f"stays above {100 * tolerance:g}%"
    return CheckResult("large_eps", passed, f"{acc} at eps {_eps(float(eps))}: {verdict}", details)


def check_stronger_attack(base: Any, stronger: Any, *, what: str = "2x steps") -> CheckResult:
    """A stronger attack (``what``: e.g. ``'2x steps'``, ``'2x restarts'``) changes accuracy by no
    more than the interval, in either direction (see the module docstring for why both)."""
    a, b = Accuracy.of(base), Accuracy.of(stronger)
    side = differs(b, a)
    details = {"what": what, "base": [a.correct, a.n], "stronger": [b.correct, b.n]}
    if side < 0:
        return CheckResult("stronger_attack", False,
                           f"{what}: {b} < base {a}: the base attack had not converged", details)
    if side > 0:
        return CheckResult("stronger_attack", False,
                           f"{what}: {b} > base {a}: the attack is unstable (randomness, EOT too small?)", details)
    return CheckResult("stronger_attack", True, f"{what}: {b} vs base {a}: within the interval", details)


def _not_stronger(name: str, label: str, challenger: Mapping[float, Any], reference: Mapping[float, Any],
                  ref_label: str) -> CheckResult:
    """``challenger`` is not lower (stronger) than ``reference`` beyond the interval at any shared eps."""
    ch, rf = dict(_sorted_eps(challenger)), dict(_sorted_eps(reference))
    shared = sorted(set(ch) & set(rf))
    if not shared:
        return CheckResult(name, None, f"no eps measured for both {label} and {ref_label}")
    worse = [e for e in shared if differs(ch[e], rf[e]) < 0]
    per_eps = "; ".join(f"{_eps(e)}: {label} {ch[e]} vs {ref_label} {rf[e]}" for e in shared)
    details = {"eps": shared, label: [[ch[e].correct, ch[e].n] for e in shared],
               ref_label: [[rf[e].correct, rf[e].n] for e in shared], "stronger_at": worse}
    if worse:
        return CheckResult(name, False, f"{label} stronger beyond the interval at {', '.join(_eps(e) for e in worse)}; {per_eps}", details)
    return CheckResult(name, True, per_eps, details)


def _best(by_attack: Mapping[str, Mapping[float, Any]]) -> dict[float, Accuracy]:
    """Per eps, the lowest accuracy over attacks (the strongest attack at that eps)."""
    best: dict[float, Accuracy] = {}
    for curve in by_attack.values():
        for e, acc in _sorted_eps(curve):
            if e not in best or acc.value < best[e].value:
                best[e] = acc
    return best


def check_gradient_free(gradient_free: Mapping[float, Any], gradient: Mapping[str, Mapping[float, Any]]) -> CheckResult:
    """The gradient-free attack is not stronger than the best gradient attack beyond the interval.

    Args:
        gradient_free: ``{eps: accuracy}`` under the gradient-free attack (Square).
        gradient: ``{attack name: {eps: accuracy}}`` under the gradient attacks (PGD, APGD...);
            per eps the lowest accuracy counts.
    """
    return _not_stronger("gradient_free", "gradient-free", gradient_free, _best(gradient), "best gradient")


def check_transfer(transfer: Mapping[float, Any], white_box: Mapping[str, Mapping[float, Any]]) -> CheckResult:
    """Transfer attacks from the surrogate are not stronger than the best white-box attack beyond
    the interval. Arguments as :func:`check_gradient_free` (``transfer``: ``{eps: accuracy}``)."""
    return _not_stronger("transfer", "transfer", transfer, _best(white_box), "best white-box")


def masking_checks(
    *,
    gradient: Mapping[str, Mapping[float, Any]],
    gradient_free: Mapping[float, Any] | None = None,
    transfer: Mapping[float, Any] | None = None,
    large_eps: tuple[float, Any] | None = None,
    stronger: Sequence[tuple[str, Any, Any]] = (),
    tolerance: float = 0.02,
) -> list[CheckResult]:
    """Every check for one defense, in a fixed order; a check whose inputs are missing is
    reported with ``passed=None`` ("not run"), never silently dropped.

    Args:
        gradient: ``{attack: {eps: accuracy}}`` of the white-box gradient attacks; the per-eps
            best (lowest) is the curve of ``eps_monotone``.
        gradient_free: ``{eps: accuracy}`` under Square.
        transfer: ``{eps: accuracy}`` under transfer attacks from the surrogate.
        large_eps: ``(eps, accuracy)`` of a gradient attack at a very large eps.
        stronger: ``(what, base accuracy, stronger accuracy)`` triples, e.g.
            ``("PGD 2x steps at 8/255", pgd10, pgd20)``.
        tolerance: of ``large_eps`` (see :func:`check_large_eps`).
    """
    if not gradient:
        raise ValueError("masking_checks: 'gradient' needs at least one attack's {eps: accuracy}")
    results = [check_eps_monotone(_best(gradient))]
    results.append(check_large_eps(*large_eps, tolerance=tolerance) if large_eps is not None
                   else CheckResult("large_eps", None, "no very-large-eps accuracy measured"))
    results += [check_stronger_attack(b, s, what=w) for w, b, s in stronger] or [
        CheckResult("stronger_attack", None, "no stronger-attack pair measured")]
    results.append(check_gradient_free(gradient_free, gradient) if gradient_free
                   else CheckResult("gradient_free", None, "no gradient-free attack measured"))
    results.append(check_transfer(transfer, gradient) if transfer
                   else CheckResult("transfer", None, "no transfer attack measured"))
    return results


def flagged(results: Mapping[str, Iterable[CheckResult]]) -> list[str]:
    """Defenses (sorted) with at least one failed check (``passed is False``)."""
    return sorted(d for d, checks in results.items() if any(c.passed is False for c in checks))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Mapping[str, Iterable[CheckResult]]) -> str:
    """A markdown section: one row per (defense, check) with PASS / FAIL / not run and the
    numbers, then a line naming the flagged defenses (or saying none was)."""
    results = {d: list(c) for d, c in results.items()}
    lines = ["| defense | check | result | numbers |", "|---|---|---|---|"]
    for defense, checks in results.items():
        for c in checks:
            verdict = "not run" if c.passed is None else ("PASS" if c.passed else "**FAIL**")
            lines.append(f"| {_cell(defense)} | {c.check} | {verdict} | {_cell(c.numbers)} |")
    bad = flagged(results)
    lines.append("")
    lines.append(f"Flagged (a masking check failed): {', '.join(bad)}." if bad
                 else "No defense failed a masking check (checks marked 'not run' were not measured).")
    return "\n".join(lines) + "\n"
