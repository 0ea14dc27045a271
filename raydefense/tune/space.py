"""The search space of a defense search, and the objective every trial reports.

The paper fixes the knowledge-transfer weight lambda (equation 6), the temperature T
(equation 7) and the UDDN guidance layer l (equation 5: logits, l = -1, or last features,
l = -2) by hand. A search treats them, and the learning rate of the denoiser (section 5.1:
0.001), as :class:`Knob` s: a Tune parameter name, a distribution, and the dotted config key
the sampled value overrides in the trial's config.

The default space comes from ``cfg.tune`` (``lam``, ``T``, ``guidance``, ``denoise_lr``);
more knobs come from ``--space KEY=DIST`` strings, e.g.::

    distill.student.lr=loguniform(1e-4, 1e-2)
    denoise.width_mult=choice(0.5, 1, 2)      # scales every width of denoise.widths
    denoise.guidance=choice(logits, features)

A range whose ends are equal is not searched: its value is applied to every trial.
Nothing here starts Ray; only the Tune domain objects are built (``param_space``).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from raydefense.config import TUNE_METRIC_ALIASES as METRIC_ALIASES
from raydefense.config import TUNE_REPORTED as REPORTED
from raydefense.config import Config
from raydefense.errors import ConfigError

KINDS = ("loguniform", "uniform", "int", "choice")
# A trial trains a UDDN, a teacher and a student (or, tune.defense=uddn_kt_adv, the adversarially
# trained UDDN and student): only these sections change per trial.
TRIAL_SECTIONS = ("denoise.", "distill.", "robust.")
# Derived knob: every width of denoise.widths times this factor (the paper gives no widths).
WIDTH_MULT = "denoise.width_mult"
# Under the clean-accuracy floor the objective moves by more than the width of [0, 1].
FLOOR_PENALTY = 2.0


@dataclass(frozen=True)
class Knob:
    """One searched value.

    Args:
        name: the parameter name in the trial's Tune config (``lam``, ``T``, ...).
        key: the dotted config key the value overrides (``distill.lam``), or ``denoise.width_mult``.
        kind: ``loguniform`` | ``uniform`` | ``int`` (bounds inclusive) | ``choice``.
        values: ``(lo, hi)`` for the ranges, the options for ``choice``.
    """

    name: str
    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def fixed(self) -> bool:
        """True when there is nothing to search (one option, or lo == hi)."""
        return len(set(self.values)) == 1

    def domain(self):
        """The Ray Tune domain (converted to an Optuna distribution by ``OptunaSearch``)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "int":
            return tune.randint(int(self.values[0]), int(self.values[1]) + 1)  # randint's upper end is exclusive
        return tune.choice(list(self.values))

    def describe(self) -> str:
        if self.fixed:
            return f"{self.name}={self.values[0]}"
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.values))}}}"
        return f"{self.name} ~ {self.kind}[{self.values[0]:g}, {self.values[1]:g}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "kind": self.kind, "values": list(self.values)}


# ----------------------------------------------------------------------------- building the space


def _range_knob(name: str, key: str, lo: float, hi: float) -> Knob:
    # Log-uniform is the usual prior for weights, temperatures and learning rates; a range
    # that starts at 0 cannot be log-uniform, so it is uniform.
    kind = "loguniform" if lo > 0 else "uniform"
    return Knob(name=name, key=key, kind=kind, values=(float(lo), float(hi)))


def default_knobs(cfg: Config) -> list[Knob]:
    """The knobs that ``cfg.tune`` names: lambda, T, guidance layer, denoiser learning rate; for
    ``tune.defense: uddn_kt_adv`` the adversarial-training knobs: training eps, PGD steps and the
    robust term's weight (``tune.robust_eps``, ``robust_steps``, ``robust_weight``)."""
    t = cfg.tune
    if t.defense == "uddn_kt_adv":
        return [
            Knob(name="eps", key="robust.eps", kind="uniform", values=tuple(float(v) for v in t.robust_eps)),
            Knob(name="steps", key="robust.steps", kind="int", values=tuple(int(v) for v in t.robust_steps)),
            Knob(name="weight", key="robust.weight", kind="uniform", values=tuple(float(v) for v in t.robust_weight)),
        ]
    return [
        _range_knob("lam", "distill.lam", *t.lam),  # lambda of equation 6
        _range_knob("T", "distill.T", *t.T),  # temperature of equation 7
        Knob(name="guidance", key="denoise.guidance", kind="choice", values=tuple(t.guidance)),  # l of equation 5
        _range_knob("denoise_lr", "denoise.lr", *t.denoise_lr),  # section 5.1 uses 1e-3
    ]


_SPEC = re.compile(r"^\s*(?P<key>[A-Za-z_][\w.]*)\s*=\s*(?P<kind>\w+)\s*\((?P<args>.*)\)\s*$")


def parse_knob(item: str, cfg: Config) -> Knob:
    """Parse ``KEY=KIND(ARGS)`` (a ``--space`` flag) into a :class:`Knob`, checked against ``cfg``."""
    m = _SPEC.match(item)
    if not m:
        raise ConfigError(f"--space '{item}': expected KEY=KIND(ARGS), e.g. distill.student.lr=loguniform(1e-4, 1e-2)")
    key, kind = m.group("key"), m.group("kind")
    if kind not in KINDS:
        raise ConfigError(f"--space '{item}': unknown distribution '{kind}' (known: {', '.join(KINDS)})")
    if not key.startswith(TRIAL_SECTIONS):
        raise ConfigError(f"--space '{item}': key '{key}' is not trained per trial (only denoise.*, distill.* and "
                          "robust.* keys are)")
    if key.endswith(".epochs"):
        raise ConfigError(f"--space '{item}': key '{key}' cannot be searched (ASHA compares trials epoch by epoch)")
    raw = [a.strip() for a in m.group("args").split(",") if a.strip()]
    values = tuple(_scalar(a, item) for a in raw)
    if kind == "choice":
        if not values:
            raise ConfigError(f"--space '{item}': choice needs at least one option")
    else:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"--space '{item}': {kind} needs two numbers (lo, hi)")
        lo, hi = values
        if lo > hi:
            raise ConfigError(f"--space '{item}': lo {lo} > hi {hi}")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"--space '{item}': loguniform needs lo > 0")
        if kind == "int":
            if not (float(lo).is_integer() and float(hi).is_integer()):
                raise ConfigError(f"--space '{item}': int needs whole-number bounds")
            values = (int(lo), int(hi))
        else:
            values = (float(lo), float(hi))
    knob = Knob(name=key, key=key, kind=kind, values=values)
    # Every value must make a valid config: a wrong key or type is a ConfigError naming the
    # --space argument and the key.
    for v in values:
        try:
            apply_params(cfg, {knob.name: v}, [knob])
        except ConfigError as exc:
            raise ConfigError(f"--space '{item}': value {v!r} does not fit: {exc}") from exc
    return knob


def _scalar(text: str, item: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        try:
            value = float(value)  # '1e-4' is a string to YAML 1.1
        except ValueError:
            pass
    if value is None or isinstance(value, (list, dict)):
        raise ConfigError(f"--space '{item}': '{text}' is not a number or a name")
    return value


def build_knobs(cfg: Config, extra: Iterable[str] = ()) -> list[Knob]:
    """Default knobs from ``cfg.tune``, then ``extra`` ``--space`` strings (a later knob for the
    same config key replaces an earlier one)."""
    knobs = default_knobs(cfg)
    for item in (*getattr(cfg.tune, "space", ()), *extra):
        new = parse_knob(item, cfg)
        knobs = [k for k in knobs if k.key != new.key] + [new]
    if all(k.fixed for k in knobs):
        raise ConfigError("tune: nothing to search (every range in tune.* and --space holds a single value)")
    return knobs


def param_space(knobs: Sequence[Knob]) -> dict[str, Any]:
    """Tune's ``param_space``: one domain per searched knob (fixed knobs are left out)."""
    return {k.name: k.domain() for k in knobs if not k.fixed}


def fixed_params(knobs: Sequence[Knob]) -> dict[str, Any]:
    return {k.name: k.values[0] for k in knobs if k.fixed}


# ----------------------------------------------------------------------------- params -> config


def overrides_for(cfg: Config, params: Mapping[str, Any], knobs: Sequence[Knob]) -> list[str]:
    """Dotted ``key=value`` overrides that give a trial its sampled values (fixed knobs included)."""
    by_name = {k.name: k for k in knobs}
    values = {**fixed_params(knobs), **params}
    out: list[str] = []
    for name, value in values.items():
        knob = by_name.get(name)
        if knob is None:
            raise ConfigError(f"tune: parameter '{name}' is not in the search space ({', '.join(by_name)})")
        if knob.key == WIDTH_MULT:
            mult = _positive_number(value, WIDTH_MULT)
            widths = [max(1, int(round(w * mult))) for w in cfg.denoise.widths]
            out.append(f"denoise.widths=[{', '.join(map(str, widths))}]")
        elif knob.key == "denoise.lr":
            # ReduceLROnPlateau decays to lr_min, which must stay <= lr (section 5.1: 1e-3 -> 1e-4).
            lr = _positive_number(value, "denoise.lr")
            out.append(f"denoise.lr={lr!r}")
            out.append(f"denoise.lr_min={min(cfg.denoise.lr_min, lr)!r}")
        else:
            out.append(f"{knob.key}={_yaml_value(value)}")
    return out


def _positive_number(value: Any, key: str) -> float:
    """``value`` as a finite float > 0; ConfigError naming ``key`` otherwise (e.g. a word)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"config key '{key}': expected a finite number > 0, got {value!r}")
    return float(value)


def _yaml_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def apply_params(cfg: Config, params: Mapping[str, Any], knobs: Sequence[Knob], *, name: Optional[str] = None) -> Config:
    """``cfg`` with a trial's values applied (a new validated Config)."""
    top = {"name": name} if name else {}
    return cfg.replace(overrides_for(cfg, params, knobs), **top)


# ----------------------------------------------------------------------------- the objective


def resolve_metric(name: str) -> str:
    """The reported metric that ``tune.metric`` names (``val_white_box_acc`` is ``val_white_acc``)."""
    metric = METRIC_ALIASES.get(name, name)
    if metric not in REPORTED:
        raise ConfigError(f"config key 'tune.metric': unknown metric '{name}' (known: {', '.join(REPORTED)})")
    return metric


def objective(metrics: Mapping[str, Any], *, metric: str, mode: str, clean_floor: float) -> float:
    """The value ASHA and Optuna see: ``metrics[metric]``, moved ``FLOOR_PENALTY`` towards
    worse when the clean accuracy behind the defense is under ``clean_floor``.

    Penalising instead of discarding keeps the order among failing trials, so the sampler
    still learns which direction helps. With accuracies in [0, 1], any trial over the floor
    beats every trial under it.
    """
    value = float(metrics[metric])
    if math.isnan(value):
        return -math.inf if mode == "max" else math.inf
    if float(metrics.get("val_clean_acc", 1.0)) < clean_floor:
        value = value - FLOOR_PENALTY if mode == "max" else value + FLOOR_PENALTY
    return value
