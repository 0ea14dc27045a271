"""What the ablation compares (issue 12), and which runs produce it. No Ray here.

A **variant** is one row of the ablation: one defense (a ``metrics.json`` defense key) read
from one **run**. A run is the pipeline's own stages (``pipeline/runner.py``) with a few config
overrides, per seed, in ``<storage>/<ablation>/s<seed>-<run>/``. Every run of a seed reads the
outputs of the stages it shares from that seed's **base** run (prepare, models, attack, gnr:
the data, the target and surrogate, the adversarial sets and the GNR's pairs), and some read
artifacts of the seed's ``full`` run, so that nothing is trained twice:

=================  ======================  ==========  ==================================================
variant            run                     defense     what differs from the full defense
=================  ======================  ==========  ==================================================
full               full                    uddn_kt     nothing: UDDN (the config's guidance) + GNR + KT
none               full                    none        no defense: the target alone (reference)
no_kt              full                    uddn        UDDN + target: no knowledge transfer
no_gnr             no_gnr                  uddn_kt     ``gnr.augment_ratio=0``: no GNR-generated pairs
real_noise         real_noise              uddn_kt     ``gnr.enabled=false``: the denoise split gets real
                                                       FGSM/I-FGSM attacks instead of GNR noise (optional)
features / pixel   guidance-<g>            uddn_kt     ``denoise.guidance=<g>`` (the two the config does
/ logits                                               not use are in the default list)
dae                dae                     dae         the paper's DAE baseline: no lateral connections,
                                                       pixel loss, in front of the target (no KT)
pixel_guided       pixel_guided            pixel_...   the paper's pixel-guided baseline + target (optional)
kt_lam<l>_T<t>     kt_lam<l>_T<t>          uddn_kt     ``distill.lam=<l>``, ``distill.T=<t>``
<name> (custom)    <name>                  uddn_kt     ``--custom NAME=KEY=VALUE;...``: any ``denoise.*``,
                                                       ``distill.*`` or ``gnr.augment_ratio`` settings
=================  ======================  ==========  ==================================================

Why these mappings:

- ``none`` and ``no_kt`` are rows of the full run: the same target, UDDN and test sets, so they
  cost only their whole-model attacks (``eval.adaptive_defenses`` of the full run).
- "Without GNR" is ``gnr.augment_ratio=0``, not ``gnr.enabled=false``: with the GNR off the
  attack stage also attacks the denoise split (``pipeline.attack.attack_plan``), which replaces
  the generated pairs with real ones instead of removing them. That other question (GNR noise
  against real attacks on the same images) is the optional ``real_noise`` variant, which needs
  its own attack stage.
- The DAE and the pixel-guided denoiser are the paper's baselines (Table 2: denoiser + target),
  the UDDN's architecture cannot be swapped in the pipeline. Their runs take the full run's UDDN
  (``run_denoise`` always trains one) and skip KT, so they train only their own denoiser.
- KT variants take the full run's UDDN, its denoised images and its teacher (none of which
  depends on lambda or T) and train only the student (equation 6).
- The full run's config never depends on the selection, so variants added later reuse it.

Every run gets ``COMMON_OVERRIDES``: no classifier baselines, no extra targets, and whole-model
attacks only on the defense(s) it reports.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from raydefense.config import GUIDANCE, Config
from raydefense.errors import ConfigError
from raydefense.pipeline.run import RunLayout

# The stages every seed's base run finishes, and which the variant runs share (pipeline/runner.py).
BASE_STAGES = ("prepare", "models", "attack", "gnr")
BASE = "base"
FULL = "full"

COMMON_OVERRIDES = (
    "baselines.enabled=[]",       # JPEG, DCN, defensive distillation are not part of the ablation
    "denoise.baselines=[]",       # the DAE / pixel-guided runs add theirs
    "models.extra_targets=[]",    # Table 5 is not part of the ablation
    "eval.adaptive_defenses=[uddn_kt]",
)

# (lambda, T) pairs of the "kt" group: no temperature, a high one, and a heavier soft term.
DEFAULT_KT = ((1.0, 1.0), (1.0, 16.0), (4.0, 4.0))
# Variants the default selection leaves out (each costs a run per seed): real_noise, pixel_guided.
OPTIONAL = ("real_noise", "pixel_guided")


@dataclass(frozen=True)
class RunSpec:
    """One run per seed, folder ``s<seed>-<key>``.

    Attributes:
        key: the run's name within a seed.
        overrides: dotted config overrides on top of the ablation's config and ``COMMON_OVERRIDES``.
        base_stages: stages whose outputs and markers this run reads from its seed's base run
            (they are not run again; see :mod:`raydefense.ablation.shared`).
        borrows: ``(run key, run-relative path)`` pairs read from another run of the same seed
            (a model, a dataset folder): the stage that would make them finds them and skips.
        stop_after: the last stage to run (the base run stops after ``gnr``).
    """

    key: str
    overrides: tuple[str, ...] = ()
    base_stages: tuple[str, ...] = BASE_STAGES
    borrows: tuple[tuple[str, str], ...] = ()
    stop_after: Optional[str] = None

    @property
    def after(self) -> tuple[str, ...]:
        """The runs of the same seed that must finish before this one starts."""
        deps = ([BASE] if self.base_stages else []) + [k for k, _ in self.borrows]
        return tuple(dict.fromkeys(deps))


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: ``defense`` of run ``run``; ``changes`` says in words what
    differs from the full defense."""

    name: str
    run: str
    defense: str
    changes: str


@dataclass(frozen=True)
class Plan:
    """The variants asked for, the runs that produce them (in the order they are done within a
    seed: base first, ``full`` before the runs that borrow from it) and the seeds."""

    variants: tuple[Variant, ...]
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def run(self, key: str) -> RunSpec:
        return next(r for r in self.runs if r.key == key)


def run_name(seed: int, key: str) -> str:
    """The folder (and config ``name``) of run ``key`` of ``seed`` under the ablation's root."""
    return f"s{seed}-{key}"


def kt_name(lam: float, T: float) -> str:
    return f"kt_lam{lam:g}_T{T:g}"


_KT_NAME = re.compile(r"^kt_lam([0-9.eE+-]+)_T([0-9.eE+-]+)$")
_CUSTOM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a custom variant may change: settings of the stages after gnr (and the GNR's augmentation,
# which then runs again). Not denoise.baselines / distill.enabled: the variant is always uddn_kt.
CUSTOM_KEYS = ("denoise.", "distill.", "gnr.augment_ratio")
CUSTOM_FORBIDDEN = ("denoise.baselines", "distill.enabled")


def parse_kt(text: str) -> tuple[tuple[float, float], ...]:
    """``"1:1,1:16"`` -> ((1.0, 1.0), (1.0, 16.0)): the (lambda, T) pairs of ``--kt``."""
    pairs = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        lam, sep, T = item.partition(":")
        try:
            pair = (float(lam), float(T))
        except ValueError:
            pair = None
        if not sep or pair is None or not all(math.isfinite(v) for v in pair):
            raise ConfigError(f"--kt '{item}': expected LAMBDA:T, e.g. --kt 1:1,1:16")
        pairs.append(pair)
    if not pairs:
        raise ConfigError("--kt: no LAMBDA:T pair given")
    return tuple(pairs)


def parse_custom(item: str) -> tuple[str, tuple[str, ...]]:
    """``"pix0=denoise.pixel_weight=0;distill.T=2"`` -> ("pix0", ("denoise.pixel_weight=0", "distill.T=2")):
    one ``--custom`` variant (checked against a config by :func:`build_plan`)."""
    name, sep, rest = item.partition("=")
    name = name.strip()
    overrides = tuple(o.strip() for o in rest.split(";") if o.strip())
    if not sep or not overrides or "=" not in overrides[0]:
        raise ConfigError(f"--custom '{item}': expected NAME=KEY=VALUE[;KEY=VALUE...], e.g. "
                          "--custom 'pix0=denoise.pixel_weight=0'")
    if not _CUSTOM_NAME.match(name) or len(name) > 100:
        raise ConfigError(f"--custom '{item}': the name '{name}' must be letters, digits, '_', '.' or '-'")
    return name, overrides


# ----------------------------------------------------------------------------- runs


def _runs_and_variants(cfg: Config) -> tuple[dict[str, RunSpec], dict[str, Variant]]:
    """Every fixed run and variant for ``cfg`` (KT pairs are added by :func:`build_plan`)."""
    full_uddn = (FULL, RunLayout.model_rel("uddn"))
    runs = {
        BASE: RunSpec(BASE, base_stages=(), stop_after=BASE_STAGES[-1]),
        FULL: RunSpec(FULL, ("eval.adaptive_defenses=[uddn_kt, uddn, none]",)),
        "no_gnr": RunSpec("no_gnr", ("gnr.augment_ratio=0",), base_stages=("prepare", "models", "attack"),
                          # its gnr stage finds the generator and only skips the augmentation
                          borrows=((BASE, RunLayout.model_rel("gnr_generator")),)),
        "real_noise": RunSpec("real_noise", ("gnr.enabled=false",), base_stages=("prepare", "models")),
        "dae": RunSpec("dae", ("denoise.baselines=[dae]", "distill.enabled=false", "eval.adaptive_defenses=[dae]"),
                       borrows=(full_uddn,)),
        "pixel_guided": RunSpec("pixel_guided", ("denoise.baselines=[pixel_guided]", "distill.enabled=false",
                                                 "eval.adaptive_defenses=[pixel_guided]"), borrows=(full_uddn,)),
    }
    g = cfg.denoise.guidance
    variants = {
        FULL: Variant(FULL, FULL, "uddn_kt", f"nothing: UDDN ({g}-guided) + GNR + KT (lambda {cfg.distill.lam:g}, "
                                             f"T {cfg.distill.T:g})"),
        "none": Variant("none", FULL, "none", "no defense: the target alone (reference)"),
        "no_kt": Variant("no_kt", FULL, "uddn", "no knowledge transfer: UDDN + target"),
        "no_gnr": Variant("no_gnr", "no_gnr", "uddn_kt", "no GNR-generated training pairs (gnr.augment_ratio=0)"),
        "real_noise": Variant("real_noise", "real_noise", "uddn_kt",
                              "real FGSM/I-FGSM attacks on the denoise split instead of GNR noise (gnr.enabled=false)"),
        "dae": Variant("dae", "dae", "dae", "DAE (no lateral connections, pixel loss) + target, no KT"),
        "pixel_guided": Variant("pixel_guided", "pixel_guided", "pixel_guided",
                                "UDDN with the pixel loss + target, no KT (the paper's baseline)"),
    }
    for other in GUIDANCE:
        if other != g:
            runs[f"guidance-{other}"] = RunSpec(f"guidance-{other}", (f"denoise.guidance={other}",))
            variants[other] = Variant(other, f"guidance-{other}", "uddn_kt",
                                      f"{other}-guided UDDN loss instead of {g}-guided (denoise.guidance={other})")
    return runs, variants


def kt_run(lam: float, T: float) -> RunSpec:
    """A KT variant's run: the full run's UDDN and teacher; a student of its own."""
    borrows = tuple((FULL, rel) for rel in (RunLayout.model_rel("uddn"), RunLayout.model_rel("teacher")))
    return RunSpec(kt_name(lam, T), (f"distill.lam={lam!r}", f"distill.T={T!r}"), borrows=borrows)


def default_variants(cfg: Config) -> tuple[str, ...]:
    """The default selection: every variant of the issue, and the reference."""
    guidance = tuple(g for g in ("features", "pixel", "logits") if g != cfg.denoise.guidance)
    return (FULL, "none", "no_kt", "no_gnr", *guidance, "dae", "kt")


def known_variants(cfg: Config) -> tuple[str, ...]:
    _, variants = _runs_and_variants(cfg)
    return tuple(variants) + ("kt", "kt_lam<L>_T<T>")


def custom_run(cfg: Config, name: str, overrides: Sequence[str]) -> RunSpec:
    """A ``--custom`` variant's run: the full defense with ``overrides``; ConfigError naming the
    key when one is outside :data:`CUSTOM_KEYS` or invalid, or when nothing changes."""
    from raydefense.config import flatten, parse_override

    keys = []
    for item in overrides:
        key = parse_override(item)[0]
        if not key.startswith(CUSTOM_KEYS) or key.startswith(CUSTOM_FORBIDDEN):
            raise ConfigError(f"--custom {name}: '{key}' cannot vary in the ablation (allowed: denoise.*, distill.*, "
                              "gnr.augment_ratio, but not denoise.baselines or distill.enabled; the stages before "
                              "are shared by every variant of a seed)")
        keys.append(key)
    try:
        changed = cfg.replace(list(overrides))
    except ConfigError as exc:
        raise ConfigError(f"--custom {name}: {exc}") from None
    if flatten(changed.to_dict()) == flatten(cfg.to_dict()):
        raise ConfigError(f"--custom {name}: {'; '.join(overrides)} changes nothing: it is the full defense")
    if any(k.startswith("gnr.") for k in keys):  # its GNR augmentation runs again, with the base's generator
        return RunSpec(name, tuple(overrides), base_stages=("prepare", "models", "attack"),
                       borrows=((BASE, RunLayout.model_rel("gnr_generator")),))
    return RunSpec(name, tuple(overrides))


def build_plan(cfg: Config, *, seeds: int, variants: Sequence[str] = (),
               kt: Sequence[tuple[float, float]] = DEFAULT_KT,
               custom: Sequence[tuple[str, Sequence[str]]] = ()) -> Plan:
    """The ablation of ``cfg``: the variants asked for and the runs they need, for ``seeds`` seeds
    (``cfg.seed``, ``cfg.seed + 1``, ...).

    Args:
        variants: names (see the module table), ``kt`` (every pair of ``kt``), ``kt_lam<L>_T<T>``
            (one pair) or ``all``; empty: :func:`default_variants`. ``full`` is always included
            (the paired differences are taken against it).
        kt: the (lambda, T) pairs that ``kt`` stands for.
        custom: ``(name, overrides)`` variants (``--custom``), added to the selection.

    Raises:
        ConfigError: an unknown variant, a variant equal to the full defense, fewer than one seed,
            or a config whose full defense lacks a part the ablation removes (GNR pairs, KT).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1 (3 or more for a meaningful interval)")
    if not cfg.gnr.enabled or cfg.gnr.augment_ratio <= 0:
        raise ConfigError("config key 'gnr.enabled'/'gnr.augment_ratio': the ablation's full defense needs the GNR's "
                          "pairs (gnr.enabled: true, gnr.augment_ratio > 0)")
    if not cfg.distill.enabled:
        raise ConfigError("config key 'distill.enabled': the ablation's full defense needs knowledge transfer (true)")
    if cfg.seed + seeds - 1 > 2**31 - 1:
        raise ConfigError(f"--seeds {seeds}: seed {cfg.seed} + {seeds - 1} is out of range")
    runs, fixed = _runs_and_variants(cfg)
    wanted = [v.strip() for v in variants if v.strip()] or list(default_variants(cfg))
    if "all" in wanted:
        wanted = list(fixed) + ["kt"]
    notes: list[str] = []
    chosen: dict[str, Variant] = {}
    pairs: list[tuple[float, float]] = []
    for name in wanted:
        m = _KT_NAME.match(name)
        if name == "kt":
            pairs += list(kt)
        elif m:
            try:
                pairs.append((float(m.group(1)), float(m.group(2))))
            except ValueError:
                raise ConfigError(f"--variants '{name}': expected kt_lam<LAMBDA>_T<T>, e.g. kt_lam1_T4") from None
        elif name in fixed:
            chosen[name] = fixed[name]
        elif name in GUIDANCE:
            raise ConfigError(f"--variants '{name}': the full defense already uses denoise.guidance={name}")
        else:
            raise ConfigError(f"--variants '{name}': unknown variant (known: {', '.join(known_variants(cfg))}, all)")
    for lam, T in dict.fromkeys(pairs):
        if (lam, T) == (cfg.distill.lam, cfg.distill.T):
            notes.append(f"{kt_name(lam, T)} is the full defense (distill.lam, distill.T of the config): left out")
            continue
        try:
            cfg.replace([f"distill.lam={lam!r}", f"distill.T={T!r}"])
        except ConfigError as exc:
            raise ConfigError(f"KT variant {kt_name(lam, T)}: {exc}") from None
        spec = kt_run(lam, T)
        runs[spec.key] = spec
        chosen[spec.key] = Variant(spec.key, spec.key, "uddn_kt",
                                   f"KT with lambda {lam:g}, T {T:g} (full: lambda {cfg.distill.lam:g}, "
                                   f"T {cfg.distill.T:g})")
    for name, overrides in custom:
        if name in runs or name in chosen or name in fixed or name in GUIDANCE or name in ("kt", "all", BASE) \
                or _KT_NAME.match(name):
            raise ConfigError(f"--custom {name}: the name of a built-in variant or run; choose another")
        spec = custom_run(cfg, name, overrides)
        runs[name] = spec
        chosen[name] = Variant(name, name, "uddn_kt", "custom: " + "; ".join(overrides))
    if FULL not in chosen:
        notes.append("the full defense is added: every variant is compared with it")
    chosen = {FULL: fixed[FULL], **{k: v for k, v in chosen.items() if k != FULL}}
    needed = {BASE} | {v.run for v in chosen.values()}
    for key in list(needed):
        needed.update(k for k, _ in runs[key].borrows)
    order = [k for k in runs if k in needed]  # base, full, the others; KT runs last
    return Plan(variants=tuple(chosen.values()), runs=tuple(runs[k] for k in order),
                seeds=tuple(cfg.seed + i for i in range(seeds)), notes=tuple(notes))


def run_config(cfg: Config, spec: RunSpec, seed: int) -> Config:
    """The config of run ``spec`` of ``seed``. The base run gets the full run's config: it stops
    after the stages they share, and a rerun checks it like any run (``pipeline.run.check_run``)."""
    overrides = COMMON_OVERRIDES + (_runs_and_variants(cfg)[0][FULL].overrides if spec.key == BASE else spec.overrides)
    return cfg.replace(list(overrides), name=run_name(seed, spec.key), seed=seed)
