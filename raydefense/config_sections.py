"""The sections of the configuration: one frozen dataclass per component, each with its
``validate`` (a bad value is a ConfigError naming the full dotted key), and the names they
check against. :mod:`raydefense.config` puts them together into :class:`~raydefense.config.Config`,
loads them, and re-exports every name here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from raydefense.errors import ConfigError

ATTACK_METHODS = ("fgsm", "ifgsm2", "ifgsm4", "ifgsm8")  # the paper's (section 5.1): the default train_methods
GUIDANCE = ("logits", "features", "pixel")
DEFENSES = ("none", "dae", "pixel_guided", "uddn", "uddn_kt", "jpeg", "dcn", "distillation", "pgd_at", "uddn_kt_adv")
ROBUST_DEFENSES = ("pgd_at", "uddn_kt_adv")  # trained against whole-model attacks (issue 13; RobustConfig)
ROBUST_INNER_LOSSES = ("ce", "trades")  # RobustConfig.loss
OPTIMIZERS = ("adamw", "adam", "sgd")  # TrainConfig.optimizer: each name is the torch.optim class it says
# Metrics every Tune trial reports each epoch (raydefense.tune.trial), and the config's other
# spellings of them. Kept here, not in raydefense.tune, so that config imports nothing above it.
TUNE_REPORTED = ("val_white_acc", "val_clean_acc", "train_loss", "val_pgd_acc")
TUNE_DEFENSES = ("uddn_kt", "uddn_kt_adv")  # TuneConfig.defense: what a trial trains
TUNE_METRIC_ALIASES = {"val_white_box_acc": "val_white_acc", "val_clean_box_acc": "val_clean_acc"}


# Seeds feed numpy (needs 0 <= seed < 2**32) and torch (seed * 1000 + rank must stay < 2**63).
MAX_SEED = 2**31 - 1
# object_store_memory_mb above this (16 TiB) is a unit mistake (bytes or 1e8 typed for MB).
MAX_OBJECT_STORE_MB = 16 * 1024 * 1024
MAP_COMPUTE = ("auto", "tasks", "actors")


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_seed(value: int, key: str) -> None:
    _check(0 <= value <= MAX_SEED, key, f"must be in [0, {MAX_SEED}], got {value}")


def run_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot name a run folder (``<storage>/<name>/``), or None when it can.

    A run name is one path segment, used verbatim: not empty, no '/' or '\\', not '.' or '..'
    and not starting with '.' (hidden folders; '..' escapes the storage root), no control
    characters (they corrupt logs and S3 keys), at most 200 characters. Spaces, '#', unicode
    letters are fine.
    """
    if not name:
        return "must not be empty"
    if "/" in name or "\\" in name:
        return "must not contain '/' or '\\' (a run name is one folder, not a path)"
    if name.startswith("."):
        return "must not start with '.' ('.', '..' and hidden folders are not run names)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not contain control characters"
    if name != name.strip():
        return "must not start or end with whitespace"
    if len(name) > 200:
        return f"is {len(name)} characters long; at most 200"
    return None


@dataclass(frozen=True)
class SplitConfig:
    """Images per identity for each split (paper section 5.1: 10 / 20 / 5 / 5)."""

    gnr: int = 10  # clean images whose real adversarial noise trains the GNR
    denoise: int = 20  # clean images that GNR noise turns into denoiser training pairs
    val: int = 5
    test: int = 5

    def validate(self, prefix: str) -> None:
        for name in ("gnr", "denoise", "val"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", "must be >= 0")
        _check(self.test >= 1, f"{prefix}.test", "must be >= 1")
        _check(self.gnr + self.denoise >= 1, f"{prefix}.gnr", "gnr + denoise must be >= 1 (no training images)")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from. ``source: synthetic`` is the embedded default (no download)."""

    source: str = "synthetic"  # 'synthetic', a local folder or s3:// URI in the LFW layout
    num_identities: int = 16  # synthetic only
    images_per_identity: int = 40  # synthetic only
    image_size: int = 80  # FaceNet's InceptionResnetV1 needs >= 80 px without resizing
    difficulty: float = 1.0  # synthetic only: within-identity variation (0 = none)
    align: bool = False  # MTCNN face alignment for image folders
    min_images_per_identity: int = 2  # image folders: identities with fewer images are dropped
    max_identities: int = 0  # image folders: keep the N identities with most images (0 = all)
    shard_size: int = 256  # images per Parquet shard written by the prepare stage
    splits: SplitConfig = field(default_factory=SplitConfig)

    def validate(self, prefix: str) -> None:
        _check(bool(self.source.strip()), f"{prefix}.source", "must not be empty")
        _check(self.num_identities >= 2, f"{prefix}.num_identities", "must be >= 2")
        _check(self.images_per_identity >= 2, f"{prefix}.images_per_identity", "must be >= 2")
        _check(32 <= self.image_size <= 512, f"{prefix}.image_size", "must be in [32, 512]")
        _check(0.0 <= self.difficulty <= 3.0, f"{prefix}.difficulty", "must be in [0, 3]")
        _check(self.min_images_per_identity >= 2, f"{prefix}.min_images_per_identity", "must be >= 2")
        _check(self.max_identities >= 0, f"{prefix}.max_identities", "must be >= 0")
        _check(self.shard_size >= 1, f"{prefix}.shard_size", "must be >= 1")
        self.splits.validate(f"{prefix}.splits")
        if self.source == "synthetic":
            # Every synthetic identity has the same number of images, so the split plan is known
            # now: each split the config asks for must get its full count (never an empty or
            # short split downstream). Image folders are checked when listed (prepare.check_source).
            from raydefense.data.splits import synthetic_split_problem

            problem = synthetic_split_problem(self.images_per_identity, dataclasses.asdict(self.splits))
            _check(problem is None, f"{prefix}.images_per_identity", problem or "")


@dataclass(frozen=True)
class TrainConfig:
    """One supervised training run (target, surrogate, teacher, student, baselines)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    # 'adamw' (torch.optim.AdamW, decoupled weight decay: what every preset has trained with),
    # 'adam' (torch.optim.Adam, weight decay added to the gradient) or 'sgd' (Nesterov, momentum 0.9).
    optimizer: str = "adamw"
    label_smoothing: float = 0.0

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", "must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(self.optimizer in OPTIMIZERS, f"{prefix}.optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        _check(0.0 <= self.label_smoothing < 1.0, f"{prefix}.label_smoothing", "must be in [0, 1)")


SURROGATE_INITS = ("own", "target")


@dataclass(frozen=True)
class ModelsConfig:
    """The target (white-box) and surrogate (black-box) classifiers of section 5."""

    target: str = "facenet"
    surrogate: str = "inception_v3"
    # Table 5: extra targets to defend in the same run (each gets its own denoiser + KT).
    extra_targets: tuple[str, ...] = ()
    target_pretrained: Optional[str] = None  # 'vggface2' | 'casia-webface' | path | s3:// URI
    surrogate_pretrained: Optional[str] = None
    # Pretrained weights are fine-tuned when set; 'skip' trusts them as they are.
    finetune_pretrained: bool = True
    # Where the surrogate starts: 'own' (its own random initialisation, or surrogate_pretrained)
    # or 'target' (the target's starting weights: target_pretrained when set, else the target's
    # random initialisation; same architecture needed), i.e. an attacker who fine-tunes the same
    # published checkpoint as the defender, with its own batches. Either way it trains on its own
    # batch order and augmentation draws.
    surrogate_init: str = "own"
    target_train: TrainConfig = field(default_factory=TrainConfig)
    surrogate_train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str) -> None:
        # The registry fills when raydefense.models is imported (torch); the jobs import it anyway.
        from raydefense.models import list_models

        known = list_models()
        for key in ("target", "surrogate"):
            name = getattr(self, key)
            _check(name in known, f"{prefix}.{key}", f"unknown model '{name}' (known: {', '.join(known)})")
        for name in self.extra_targets:
            _check(name in known, f"{prefix}.extra_targets", f"unknown model '{name}' (known: {', '.join(known)})")
        _check(len(set(self.extra_targets)) == len(self.extra_targets), f"{prefix}.extra_targets", "lists a model twice")
        for key in ("target_pretrained", "surrogate_pretrained"):
            value = getattr(self, key)
            _check(value is None or bool(value.strip()), f"{prefix}.{key}", "must be null or name weights (a tag, path or s3:// URI)")
        _check(self.surrogate_init in SURROGATE_INITS, f"{prefix}.surrogate_init",
               f"must be one of {', '.join(SURROGATE_INITS)}")
        if self.surrogate_init == "target":
            _check(self.surrogate == self.target, f"{prefix}.surrogate_init",
                   f"'target' needs the target's architecture (surrogate '{self.surrogate}', target '{self.target}')")
            _check(self.surrogate_pretrained is None, f"{prefix}.surrogate_init",
                   "'target' starts the surrogate from the target's weights; surrogate_pretrained must then be null")
        self.target_train.validate(f"{prefix}.target_train")
        self.surrogate_train.validate(f"{prefix}.surrogate_train")


@dataclass(frozen=True)
class AttackConfig:
    """Adversarial data of section 5.1. eps values are L-inf radii in [0, 1] pixel units."""

    train_methods: tuple[str, ...] = ATTACK_METHODS  # FGSM and I-FGSM 2/4/8 for GNR/denoiser data
    test_methods: tuple[str, ...] = ("fgsm", "ifgsm4")  # the paper's white-/black-box test sets
    # Each image gets its own eps ~ U[eps_min, eps_max] (the paper samples per image).
    eps_min: float = 2 / 255
    eps_max: float = 16 / 255
    batch_size: int = 32
    seed: int = 1

    def validate(self, prefix: str) -> None:
        # Any attack of the registry (raydefense.attacks, filled on import; it imports nothing of
        # config), checked at load like the model names.
        from raydefense.attacks import list_attacks

        known = list_attacks()
        for key in ("train_methods", "test_methods"):
            methods = getattr(self, key)
            _check(len(methods) >= 1, f"{prefix}.{key}", "must list at least one method")
            for m in methods:
                _check(m in known, f"{prefix}.{key}", f"unknown method '{m}' (known: {', '.join(known)})")
        _check(self.eps_min >= 0, f"{prefix}.eps_min", "must be >= 0")
        _check(self.eps_max >= self.eps_min, f"{prefix}.eps_max", "must be >= eps_min")
        _check(self.eps_max <= 1, f"{prefix}.eps_max", "must be <= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check_seed(self.seed, f"{prefix}.seed")


@dataclass(frozen=True)
class GNRConfig:
    """WGAN-GP noise reconstruction (section 2)."""

    enabled: bool = True
    epochs: int = 30
    batch_size: int = 32
    z_dim: int = 64
    widths: tuple[int, ...] = (256, 128, 64)  # the paper's DeconvUnit filters
    critic_widths: tuple[int, ...] = (64, 128, 256, 512)  # the paper's critic filters
    critic_norm: str = "layer"  # 'batch' is the paper's layout; see gnr.networks.Critic
    lr: float = 1e-4
    n_critic: int = 5  # critic steps per generator step (Gulrajani et al. 2017)
    gp_weight: float = 10.0  # lambda of equation 3
    # Generated adversarial images per real one for the denoiser set (paper: 80k from 40k).
    augment_ratio: float = 2.0

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, f"{prefix}.epochs", "must be >= 1")
        _check(self.batch_size >= 2, f"{prefix}.batch_size", "must be >= 2")
        _check(self.z_dim >= 1, f"{prefix}.z_dim", "must be >= 1")
        _check(len(self.widths) == 3 and min(self.widths) >= 1, f"{prefix}.widths", "must be three positive widths")
        _check(len(self.critic_widths) == 4 and min(self.critic_widths) >= 1, f"{prefix}.critic_widths", "must be four positive widths")
        _check(self.critic_norm in ("batch", "layer", "instance", "none"), f"{prefix}.critic_norm",
               "must be one of batch, layer, instance, none")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(self.n_critic >= 1, f"{prefix}.n_critic", "must be >= 1")
        _check(self.gp_weight >= 0, f"{prefix}.gp_weight", "must be >= 0")
        _check(self.augment_ratio >= 0, f"{prefix}.augment_ratio", "must be >= 0")


@dataclass(frozen=True)
class DenoiseConfig:
    """UDDN (section 3) and the denoiser baselines."""

    guidance: str = "logits"  # 'logits' (l=-1) | 'features' (l=-2) | 'pixel'
    widths: tuple[int, ...] = (64, 128, 256, 256, 256)  # not given in the paper; HGD's widths
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3  # section 5.1: 0.001, decayed to 0.0001 when the loss converges
    lr_min: float = 1e-4
    plateau_patience: int = 1  # epochs without improvement before the decay
    include_clean: bool = True  # also train on clean images (x* = x) so clean accuracy is kept
    # Weight of a squared-error pixel term added to the logits-/feature-guided loss (not in the
    # paper; it keeps x_hat near the clean image, Table 1; see raydefense.denoise.losses.guided_loss).
    pixel_weight: float = 0.0
    baselines: tuple[str, ...] = ("dae", "pixel_guided")

    def validate(self, prefix: str) -> None:
        _check(self.guidance in GUIDANCE, f"{prefix}.guidance", f"must be one of {', '.join(GUIDANCE)}")
        _check(len(self.widths) == 5 and min(self.widths) >= 1, f"{prefix}.widths", "must be five positive widths")
        _check(self.epochs >= 1, f"{prefix}.epochs", "must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(0 < self.lr_min <= self.lr, f"{prefix}.lr_min", "must be in (0, lr]")
        _check(self.plateau_patience >= 0, f"{prefix}.plateau_patience", "must be >= 0")
        _check(self.pixel_weight >= 0, f"{prefix}.pixel_weight", "must be >= 0")
        for b in self.baselines:
            _check(b in ("dae", "pixel_guided"), f"{prefix}.baselines", f"unknown denoiser baseline '{b}' (known: dae, pixel_guided)")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge transfer (section 4, equations 6-7)."""

    enabled: bool = True
    lam: float = 1.0  # lambda of equation 6
    T: float = 4.0  # temperature of equation 7, >= 1
    init_from_target: bool = True  # start teacher and student from the target's weights
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=3e-4))
    student: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=3e-4))

    def validate(self, prefix: str) -> None:
        _check(self.lam >= 0, f"{prefix}.lam", "must be >= 0")
        _check(self.T >= 1, f"{prefix}.T", "must be >= 1")
        self.teacher.validate(f"{prefix}.teacher")
        self.student.validate(f"{prefix}.student")


@dataclass(frozen=True)
class BaselinesConfig:
    """Defenses of Table 3 besides the denoisers."""

    enabled: tuple[str, ...] = ("jpeg", "dcn", "distillation")
    jpeg_quality: int = 75
    dcn_weight: float = 0.01  # contractive penalty weight (Gu & Rigazio 2015)
    distillation_T: float = 20.0  # Papernot et al. 2016 use T = 20..100
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=3e-4))

    def validate(self, prefix: str) -> None:
        for b in self.enabled:
            _check(b in ("jpeg", "dcn", "distillation"), f"{prefix}.enabled", f"unknown baseline '{b}' (known: jpeg, dcn, distillation)")
        _check(1 <= self.jpeg_quality <= 100, f"{prefix}.jpeg_quality", "must be in [1, 100]")
        _check(self.dcn_weight >= 0, f"{prefix}.dcn_weight", "must be >= 0")
        _check(self.distillation_T >= 1, f"{prefix}.distillation_T", "must be >= 1")
        self.train.validate(f"{prefix}.train")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation, including attacks on the whole defended model."""

    batch_size: int = 64
    adaptive: bool = True  # PGD through denoiser + classifier
    adaptive_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    adaptive_steps: int = 20
    adaptive_restarts: int = 1
    adaptive_max_images: int = 64  # whole-model attacks are expensive: a fixed subset
    # Defenses attacked as one model (denoiser + classifier); JPEG goes through BPDA.
    adaptive_defenses: tuple[str, ...] = ("none", "uddn", "uddn_kt", "jpeg")
    by_epsilon: tuple[float, ...] = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)  # Figure 7
    figure_examples: int = 4  # Figure 6
    # Independent check: APGD-CE + APGD-DLR (Croce & Hein 2020) through the whole model,
    # same images and budgets as adaptive PGD ('autoattack' test set); 100 steps in the paper.
    autoattack: bool = True
    autoattack_steps: int = 50
    autoattack_restarts: int = 1
    # EOT (Athalye et al. 2018): forward passes per gradient for defenses with randomness
    # (a submodule with randomized = True); deterministic defenses always use 1.
    eot_samples: int = 10
    # The black-box column measures a defense only if the surrogate's attacks hurt the undefended
    # target: below this drop (clean minus black-box accuracy of no defense) the report says the
    # column is uninformative. The paper's surrogate cost 15.5 points (84.5% -> 69.0%).
    black_box_min_drop: float = 0.10

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(0 <= self.black_box_min_drop <= 1, f"{prefix}.black_box_min_drop",
               "must be in [0, 1] (a fraction of images: 0.10 = 10 points)")
        for key in ("adaptive_eps", "by_epsilon"):
            values = getattr(self, key)
            _check(len(values) >= 1, f"{prefix}.{key}", "must list at least one eps")
            for e in values:
                _check(0 <= e <= 1, f"{prefix}.{key}", f"eps {e} must be in [0, 1] (pixel units: 8/255, not 8)")
        _check(self.adaptive_steps >= 1, f"{prefix}.adaptive_steps", "must be >= 1")
        _check(self.adaptive_restarts >= 1, f"{prefix}.adaptive_restarts", "must be >= 1")
        _check(self.adaptive_max_images >= 1, f"{prefix}.adaptive_max_images", "must be >= 1")
        for d in self.adaptive_defenses:
            _check(d in DEFENSES, f"{prefix}.adaptive_defenses", f"unknown defense '{d}' (known: {', '.join(DEFENSES)})")
        _check(self.figure_examples >= 1, f"{prefix}.figure_examples", "must be >= 1")
        _check(self.autoattack_steps >= 1, f"{prefix}.autoattack_steps", "must be >= 1")
        _check(self.autoattack_restarts >= 1, f"{prefix}.autoattack_restarts", "must be >= 1")
        _check(self.eot_samples >= 1, f"{prefix}.eot_samples", "must be >= 1")


@dataclass(frozen=True)
class RobustConfig:
    """Defenses trained against an attacker who knows them, and their whole-model evaluation (issue 13).

    Training (stage ``robust``; :mod:`raydefense.pipeline.robust`), each batch's adversarial
    examples made online by PGD with a random start against the *current* model
    (:func:`raydefense.robust.online_pgd`), per image eps ~ U[eps_min, eps]:

    - ``pgd_at``: the target's architecture fine-tuned from the target (``pgd_at_init``) on
      ``(1 - weight) CE(x) + weight CE(x_adv)`` (Madry et al., ICLR 2018: weight 1), or with
      ``loss: trades``, CE(x) + beta KL(p(x) || p(x_adv)) (Zhang et al., ICML 2019, eq. 5).
    - ``uddn_kt_adv``: the UDDN fine-tuned from ``uddn`` with its guided loss (Li & Wang 2019,
      eq. 5) on ``(1 - weight) L(x) + weight L(x_adv)``, x_adv made through UDDN + target; then a
      student fine-tuned from the KT student on ``(1 - weight) KT(s(u(x)), t(u(x))) + weight
      KT(s(u(x_adv)), t(u(x)))`` with x_adv made through UDDN + student (Adversarially Robust
      Distillation, Goldblum et al., AAAI 2020, eq. 3, with the paper's KT loss, eq. 6, as KT).

    Evaluation (in stage ``evaluate`` when ``eval_defenses`` is not empty; :mod:`raydefense.pipeline.robust_eval`).
    """

    defenses: tuple[str, ...] = ()  # which of ROBUST_DEFENSES to train; none by default (CPU time)
    eps: float = 4 / 255  # training budget (L-inf, [0, 1] units); the headline eps
    eps_min: Optional[float] = None  # per-image eps ~ U[eps_min, eps]; None: every image at eps
    steps: int = 5  # PGD steps per training batch (Madry et al.: 7 on CIFAR-10)
    step_size: Optional[float] = None  # None: 2.5 eps / steps (Madry et al. 2018)
    loss: str = "ce"  # 'ce': Madry / ARD; 'trades': TRADES (pgd_at only, KL inner maximisation)
    weight: float = 1.0  # weight of the robust term, in [0, 1] (1: adversarial examples only)
    beta: float = 6.0  # TRADES' robust-term weight (Zhang et al. 2019: 6 on CIFAR-10)
    pgd_at_init: Optional[str] = "target"  # fine-tune from the target (cheap), None: from scratch
    pgd_at: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, lr=3e-4))
    uddn_epochs: int = 2  # adversarial fine-tuning of the UDDN (its lr: denoise.lr_min)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, lr=3e-4))
    val_steps: int = 5  # PGD steps of the per-epoch whole-model validation accuracy (val_pgd_acc)
    # Whole-model evaluation: every attack at every eps on the same fixed test images.
    eval_defenses: tuple[str, ...] = ()  # e.g. [none, uddn_kt, pgd_at, uddn_kt_adv]
    eval_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    eval_images: int = 48  # clean test images (one row each), a fixed seeded subset
    pgd_steps: int = 10
    pgd_restarts: int = 2
    apgd_steps: int = 20
    square_queries: int = 300  # queries per image (5000 in AutoAttack; CPU time here)
    headline_eps: float = 4 / 255  # where the doubled-steps/restarts checks run and the summary reads
    large_eps: float = 0.5  # "very large eps": accuracy should fall to about 0
    large_eps_tolerance: float = 0.02

    def validate(self, prefix: str) -> None:
        for d in self.defenses:
            _check(d in ROBUST_DEFENSES, f"{prefix}.defenses", f"unknown robust defense '{d}' (known: {', '.join(ROBUST_DEFENSES)})")
        for d in self.eval_defenses:
            _check(d in DEFENSES, f"{prefix}.eval_defenses", f"unknown defense '{d}' (known: {', '.join(DEFENSES)})")
        for key in ("eps", "headline_eps", "large_eps"):
            value = getattr(self, key)
            _check(0 < value <= 1, f"{prefix}.{key}", f"must be in (0, 1] (pixel units: 8/255, not 8), got {value}")
        if self.eps_min is not None:
            _check(0 <= self.eps_min <= self.eps, f"{prefix}.eps_min", f"must be null or in [0, eps={self.eps:g}]")
        if self.step_size is not None:
            _check(0 < self.step_size <= 1, f"{prefix}.step_size", "must be null or in (0, 1]")
        _check(self.steps >= 1, f"{prefix}.steps", "must be >= 1")
        _check(self.loss in ROBUST_INNER_LOSSES, f"{prefix}.loss", f"must be one of {', '.join(ROBUST_INNER_LOSSES)}")
        _check(0 <= self.weight <= 1, f"{prefix}.weight", "must be in [0, 1]")
        _check(self.beta >= 0, f"{prefix}.beta", "must be >= 0")
        _check(self.pgd_at_init in (None, "target"), f"{prefix}.pgd_at_init", "must be 'target' or null (from scratch)")
        self.pgd_at.validate(f"{prefix}.pgd_at")
        self.student.validate(f"{prefix}.student")
        _check(self.uddn_epochs >= 1, f"{prefix}.uddn_epochs", "must be >= 1")
        _check(self.val_steps >= 1, f"{prefix}.val_steps", "must be >= 1")
        _check(len(self.eval_eps) >= 1, f"{prefix}.eval_eps", "must list at least one eps")
        for e in self.eval_eps:
            _check(0 < e <= 1, f"{prefix}.eval_eps", f"eps {e} must be in (0, 1] (pixel units: 8/255, not 8)")
        for key in ("eval_images", "pgd_steps", "pgd_restarts", "apgd_steps", "square_queries"):
            _check(getattr(self, key) >= 1, f"{prefix}.{key}", "must be >= 1")
        _check(0 <= self.large_eps_tolerance < 1, f"{prefix}.large_eps_tolerance", "must be in [0, 1)")
        _check(any(abs(e - self.headline_eps) < 1e-9 for e in self.eval_eps), f"{prefix}.headline_eps",
               f"must be one of eval_eps ({', '.join(f'{e:g}' for e in self.eval_eps)}), got {self.headline_eps:g}")


@dataclass(frozen=True)
class ScaleConfig:
    """How much of the cluster each stage uses; the same code runs on 1 CPU or many GPUs."""

    num_workers: int = 1  # Ray Train workers per training stage
    max_workers: int = 0  # > num_workers makes training elastic: ScalingConfig(num_workers=(min, max))
    use_gpu: bool = True  # use GPUs where the cluster has them (false: CPU only)
    cpus_per_worker: float = 2.0
    gpus_per_worker: float = 1.0
    # Mixed precision for training (bf16 autocast; evaluation and attacks always run in fp32):
    # true, false, or null (the default): on for a CPU with AVX512-BF16 or AMX, off on GPUs
    # (measured slower at this project's sizes; worker.amp_enabled says why).
    amp: Optional[bool] = None
    # Ray Data actor pool size for attack/augment/eval stages; on GPU one actor per GPU, at most this many
    attack_actors: int = 1
    # CPUs each CPU actor reserves, and every actor's torch threads (a GPU actor reserves 1 CPU, Ray Data's default)
    cpus_per_actor: float = 1.0
    # How the Ray Data model stages (attack, GNR pairs, KT inputs, evaluation, prepare) hold their
    # models: "actors" (Ray Data's actor pool: a process per actor, made and ended with each
    # execution), "tasks" (a task pool of the same size and CPUs; each worker process keeps the
    # model object it built for the execution, and Ray reuses the processes across stages), or
    # "auto": tasks on CPU, actors on GPU (runtime.map_compute says why).
    map_compute: str = "auto"
    object_store_memory_mb: int = 512  # local Ray only
    num_cpus: int = 0  # local Ray only; 0 = detect
    worker_logs: bool = False  # stream every Ray worker's output to the console (noisy; logs stay in /tmp/ray)
    # A Ray Train checkpoint of FaceNet with its Adam moments is 282 MB; it is written in the
    # background but still slows the next ~10 steps by about a fifth (bench section 3): write one
    # at the first and last epoch of a training and otherwise at most every this many seconds
    # (0 = every epoch).
    checkpoint_interval_s: float = 30.0
    # Also checkpoint at least every this many epochs (0 = by time only). A lost worker costs at
    # most one interval of work: whichever of the two comes first.
    checkpoint_every_epochs: int = 0
    cache_mb: float = 2048.0  # a training worker keeps a dataset this small in memory (0 = stream every epoch)
    # Ray Train FailureConfig(max_failures): a failed worker group (lost worker, preempted node)
    # restarts from the latest checkpoint by itself this many times (-1 = forever, 0 = never).
    max_failures: int = 3
    # Elastic training (max_workers > num_workers): how often Ray Train looks for room to grow.
    resize_interval_s: float = 60.0
    # How often Ray Train's controller polls its workers (Ray's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # 2 s by default). A worker's result queue holds one report, so every ray.train.report (one
    # per epoch) waits for the next poll: short epochs cost at least this much each. Raise it on
    # clusters with hundreds of workers, where each poll is one actor call per worker.
    health_check_interval_s: float = 0.2
    # Extra custom resources per training worker, e.g. {spot_gpu: 1} to pin workers to a node type.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # A worker or actor that asks for more than the cluster has fails the run at once (0), or, on an
    # autoscaling cluster, waits up to this many seconds for the resources to appear.
    resource_wait_s: float = 0.0

    def validate(self, prefix: str) -> None:
        _check(self.num_workers >= 1, f"{prefix}.num_workers", "must be >= 1")
        _check(self.max_workers == 0 or self.max_workers >= self.num_workers, f"{prefix}.max_workers",
               "must be 0 or >= num_workers")
        _check(self.cpus_per_worker > 0, f"{prefix}.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, f"{prefix}.gpus_per_worker", "must be > 0")
        _check(self.attack_actors >= 1, f"{prefix}.attack_actors", "must be >= 1")
        _check(self.cpus_per_actor > 0, f"{prefix}.cpus_per_actor", "must be > 0")
        _check(self.map_compute in MAP_COMPUTE, f"{prefix}.map_compute",
               f"must be one of {', '.join(MAP_COMPUTE)}, got '{self.map_compute}'")
        _check(128 <= self.object_store_memory_mb <= MAX_OBJECT_STORE_MB, f"{prefix}.object_store_memory_mb",
               f"must be in [128, {MAX_OBJECT_STORE_MB}] (megabytes), got {self.object_store_memory_mb}")
        _check(self.resource_wait_s >= 0, f"{prefix}.resource_wait_s", "must be >= 0 (0 = fail at once)")
        _check(self.num_cpus >= 0, f"{prefix}.num_cpus", "must be >= 0")
        _check(self.cache_mb >= 0, f"{prefix}.cache_mb", "must be >= 0")
        _check(self.checkpoint_interval_s >= 0, f"{prefix}.checkpoint_interval_s", "must be >= 0")
        _check(self.checkpoint_every_epochs >= 0, f"{prefix}.checkpoint_every_epochs", "must be >= 0")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", "must be >= -1 (-1 = retry forever)")
        _check(self.resize_interval_s > 0, f"{prefix}.resize_interval_s", "must be > 0")
        _check(self.health_check_interval_s > 0, f"{prefix}.health_check_interval_s", "must be > 0 (seconds)")
        for key, value in self.worker_resources.items():
            _check(isinstance(key, str) and key not in ("CPU", "GPU", "memory"), f"{prefix}.worker_resources",
                   f"'{key}': custom resource names only (CPU/GPU come from cpus_per_worker/gpus_per_worker)")
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                   f"{prefix}.worker_resources.{key}", "must be a number > 0")


@dataclass(frozen=True)
class StorageConfig:
    """Where runs live: a local folder or s3://bucket/prefix."""

    path: str = "./runs"
    endpoint_url: Optional[str] = None  # else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    region: Optional[str] = None  # else AWS_REGION / AWS_DEFAULT_REGION

    def validate(self, prefix: str) -> None:
        _check(bool(self.path.strip()), f"{prefix}.path", "must not be empty")
        if self.endpoint_url is not None:
            scheme, sep, host = self.endpoint_url.partition("://")
            _check(bool(sep) and scheme in ("http", "https") and bool(host.strip("/")), f"{prefix}.endpoint_url",
                   f"must be null or an http(s)://host[:port] URL, got '{self.endpoint_url}'")
        if self.region is not None:
            _check(bool(self.region.strip()), f"{prefix}.region", "must be null or a region name")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune + Optuna search over lambda, T and the guidance layer (and more)."""

    num_samples: int = 8
    max_concurrent: int = 1  # 0 = as many trials as the cluster fits
    metric: str = "val_white_acc"  # white-box validation accuracy of UDDN + the phase's model
    mode: str = "max"
    clean_floor: float = 0.0  # trials under this clean accuracy score as failures
    grace_period: int = 1  # ASHA
    reduction_factor: int = 2
    lam: tuple[float, float] = (0.1, 10.0)  # log-uniform
    T: tuple[float, float] = (1.0, 20.0)  # log-uniform
    guidance: tuple[str, ...] = ("logits", "features")
    denoise_lr: tuple[float, float] = (3e-4, 3e-3)
    seed: int = 0
    # 'uddn_kt': a trial trains UDDN, teacher and student (knobs lam, T, guidance, denoise_lr);
    # 'uddn_kt_adv' (issue 13): a trial trains the adversarially trained UDDN and student of
    # robust.* (knobs robust.eps, robust.steps, robust.weight); objective e.g. val_pgd_acc, the
    # whole-model PGD accuracy on the validation split.
    defense: str = "uddn_kt"
    robust_eps: tuple[float, float] = (2 / 255, 8 / 255)  # uniform
    robust_steps: tuple[int, int] = (2, 5)  # int, bounds inclusive
    robust_weight: tuple[float, float] = (0.5, 1.0)  # uniform

    def validate(self, prefix: str) -> None:
        _check(self.num_samples >= 1, f"{prefix}.num_samples", "must be >= 1")
        _check(self.max_concurrent >= 0, f"{prefix}.max_concurrent", "must be >= 0 (0 = fill the cluster)")
        _check(self.mode in ("max", "min"), f"{prefix}.mode", "must be 'max' or 'min'")
        _check(self.metric in TUNE_REPORTED or self.metric in TUNE_METRIC_ALIASES, f"{prefix}.metric",
               f"unknown metric '{self.metric}' (known: {', '.join(TUNE_REPORTED)})")
        _check_seed(self.seed, f"{prefix}.seed")
        _check(0 <= self.clean_floor <= 1, f"{prefix}.clean_floor", "must be in [0, 1]")
        _check(self.grace_period >= 1, f"{prefix}.grace_period", "must be >= 1")
        _check(self.reduction_factor >= 2, f"{prefix}.reduction_factor", "must be >= 2")
        _check(0 <= self.lam[0] <= self.lam[1], f"{prefix}.lam", "must be a range [lo, hi] with 0 <= lo <= hi")
        _check(1 <= self.T[0] <= self.T[1], f"{prefix}.T", "must be a range [lo, hi] with 1 <= lo <= hi")
        _check(len(self.guidance) >= 1, f"{prefix}.guidance", "must list at least one guidance layer")
        for g in self.guidance:
            _check(g in GUIDANCE, f"{prefix}.guidance", f"unknown guidance '{g}' (known: {', '.join(GUIDANCE)})")
        _check(0 < self.denoise_lr[0] <= self.denoise_lr[1], f"{prefix}.denoise_lr", "must be a range [lo, hi] with 0 < lo <= hi")
        _check(self.defense in TUNE_DEFENSES, f"{prefix}.defense", f"must be one of {', '.join(TUNE_DEFENSES)}")
        _check(0 < self.robust_eps[0] <= self.robust_eps[1] <= 1, f"{prefix}.robust_eps",
               "must be a range [lo, hi] with 0 < lo <= hi <= 1 (pixel units: 8/255, not 8)")
        _check(1 <= self.robust_steps[0] <= self.robust_steps[1], f"{prefix}.robust_steps",
               "must be a range [lo, hi] with 1 <= lo <= hi")
        _check(0 <= self.robust_weight[0] <= self.robust_weight[1] <= 1, f"{prefix}.robust_weight",
               "must be a range [lo, hi] with 0 <= lo <= hi <= 1")
        metric = TUNE_METRIC_ALIASES.get(self.metric, self.metric)
        if self.defense == "uddn_kt_adv":
            _check(metric != "val_white_acc", f"{prefix}.metric",
                   "uddn_kt_adv trials report val_pgd_acc, val_clean_acc and train_loss, not the precomputed "
                   "white-box accuracy (use val_pgd_acc)")
        else:
            _check(metric != "val_pgd_acc", f"{prefix}.metric", "val_pgd_acc is reported by tune.defense=uddn_kt_adv trials only")
