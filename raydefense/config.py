"""Configuration: frozen dataclasses, loaded from YAML, with dotted ``--set`` overrides.

Every component has a dataclass here. Loading is strict, nanoGPT-style: an unknown key,
a value of the wrong type or a value out of range is a :class:`~raydefense.errors.ConfigError`
whose one-line message names the full dotted key. The resolved config travels with
every run (``<run>/config.yaml``) and every checkpoint (``to_dict``).

Usage::

    cfg = load_config("configs/smoke.yaml", overrides=["distill.lam=0.5", "data.num_identities=8"])
    cfg.distill.T            # 2.0
    cfg.to_dict()            # plain dict, YAML-safe
"""
from __future__ import annotations

import dataclasses
import types
import typing
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from raydefense.errors import ConfigError

from raydefense.config_sections import (  # noqa: F401  (re-exported: every section and name lives here too)
    ATTACK_METHODS,
    GUIDANCE,
    DEFENSES,
    ROBUST_DEFENSES,
    ROBUST_INNER_LOSSES,
    OPTIMIZERS,
    TUNE_REPORTED,
    TUNE_DEFENSES,
    TUNE_METRIC_ALIASES,
    MAX_SEED,
    MAX_OBJECT_STORE_MB,
    _check,
    _check_seed,
    run_name_problem,
    SplitConfig,
    DataConfig,
    TrainConfig,
    ModelsConfig,
    AttackConfig,
    GNRConfig,
    DenoiseConfig,
    DistillConfig,
    BaselinesConfig,
    EvalConfig,
    RobustConfig,
    ScaleConfig,
    StorageConfig,
    TuneConfig,
)

# The preset a job uses without --config; shipped inside the package (raydefense/configs, a
# link to configs/ in a checkout). Here, not in cli.py, so that export and serve need no cli.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


@dataclass(frozen=True)
class TrackingConfig:
    """Optional experiment tracking beyond the console and TensorBoard (raydefense/tracking.py):
    MLflow when ``mlflow_uri`` is set (off by default; needs ``pip install mlflow-skinny``)."""

    mlflow_uri: Optional[str] = None  # e.g. http://mlflow:5000, databricks, file:///path/mlruns
    mlflow_experiment: str = "raydefense"

    def validate(self, prefix: str) -> None:
        import importlib.util

        if self.mlflow_uri is not None:
            _check(bool(self.mlflow_uri.strip()), f"{prefix}.mlflow_uri", "must be null or an MLflow tracking URI")
            # Checked here, at load, so that a missing MLflow fails before anything runs.
            _check(importlib.util.find_spec("mlflow") is not None, f"{prefix}.mlflow_uri",
                   "is set but MLflow is not installed: pip install mlflow-skinny (or raydefense[tracking])")
        _check(bool(self.mlflow_experiment.strip()), f"{prefix}.mlflow_experiment", "must not be empty")


@dataclass(frozen=True)
class Config:
    """The whole run."""

    name: str = "default"  # run name; the same name resumes
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    gnr: GNRConfig = field(default_factory=GNRConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, prefix: str = "") -> None:
        problem = run_name_problem(self.name)
        _check(problem is None, "name", f"run name {self.name!r} {problem}")
        _check_seed(self.seed, "seed")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        # uddn_kt_adv fine-tunes the UDDN and the KT student behind it, taught by the KT teacher.
        _check(self.distill.enabled or "uddn_kt_adv" not in self.robust.defenses, "robust.defenses",
               "'uddn_kt_adv' needs the knowledge-transfer teacher and student (distill.enabled: true)")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: Iterable[str] = (), **top: Any) -> "Config":
        """A new validated Config with dotted overrides (``"distill.T=2"``) applied."""
        data = self.to_dict()
        data.update(top)
        for item in overrides:
            key, value = parse_override(item)
            _set_dotted_creating(data, key, value)
        return from_dict(data)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a plain config (``Config.to_dict()``) as dotted
    keys; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- loading


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclass(frozen=True)
class _Override:
    """A ``--set`` value: the YAML reading of the text and the text itself.

    String keys take the text verbatim (``--set name=exp #2`` is the name ``exp #2``, and
    ``--set name=2024`` the name ``2024``) unless it is one YAML-quoted string
    (``--set "name='a b'"``); every other key takes the YAML value.
    """

    parsed: Any
    raw: str


def _is_str_type(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    if isinstance(value, _Override):
        if _is_str_type(tp) and not (value.parsed is None and type(None) in typing.get_args(tp)):
            text = value.raw.strip()
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and isinstance(value.parsed, str)
            # A YAML-quoted value ('exp #2') is the string inside the quotes; anything else is the text.
            return _coerce(value.parsed if quoted else value.raw, tp, key)
        value = value.parsed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if non_none[0] is bool and not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true, false or null, got {value!r}")
        return _coerce(value, non_none[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and "/" not in value:
            parsed = _eval_fraction(value, key)  # '1e8' is a string to YAML 1.1
            value = parsed if parsed is not None else value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        number: Optional[float] = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float; the cause adds nothing to the message
                raise ConfigError(f"config key '{key}': {value} is too large") from None
        elif isinstance(value, str):
            number = _eval_fraction(value, key)
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        # inf and nan pass every '>= 0' check and poison training (lr=inf, T=nan): never a value.
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}{hint}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _eval_fraction(text: str, key: str) -> Optional[float]:
    """A number written as text: '1e-4' (a string to YAML 1.1) or 'a/b' as papers write eps
    ('8/255'). None when the text is no number; ConfigError naming ``key`` for '1/0'."""
    text = text.strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except ValueError:
        return None
    except ZeroDivisionError:  # the cause ('float division by zero') adds nothing to the message
        raise ConfigError(f"config key '{key}': '{text}' divides by zero") from None


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{full}' (known under '{prefix or '<top>'}': {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", value): the value's YAML reading, kept beside its text so that
    string keys take the text verbatim (``8/255`` stays a string for float keys to divide)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{item}': '{key}' is not a dotted config key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, _Override(parsed=value, raw=raw)


def parse_yaml_config(text: str | bytes, *, what: str) -> dict[str, Any]:
    """The mapping in a YAML config document; ConfigError naming ``what`` (the file) when the
    bytes are not UTF-8, not YAML, or not a mapping. The one parser of config files: a
    ``--config`` file and a run's saved ``config.yaml`` both come through here."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} is not UTF-8 text (byte 0x{text[exc.start]:02x} at offset {exc.start}); "
                              f"save it as UTF-8 YAML") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if getattr(mark, "line", None) is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from exc
    except RecursionError as exc:  # pathologically nested documents
        raise ConfigError(f"{what} is nested too deeply to be a config") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = (),
                values: Optional[Mapping[str, Any]] = None) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None), apply ``--set``
    overrides, then ``values`` (dotted key -> value, taken verbatim: what ``--name``,
    ``--data`` and ``--storage`` give).

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, not YAML or not a mapping;
            an override is malformed; any key is unknown or any value out of range.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{path}' is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file '{path}' cannot be read ({exc.strerror or exc})") from exc
        data = parse_yaml_config(raw, what=f"config file '{path}'")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted_creating(data, key, value)
    for key, value in (values or {}).items():
        _set_dotted_creating(data, key, value)
    return from_dict(data)


def _set_dotted_creating(data: dict[str, Any], key: str, value: Any) -> None:
    """Like _set_dotted but creates missing sections; unknown keys are caught by _build."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if isinstance(child, _Override) and isinstance(child.parsed, dict):
            child = node[part] = dict(child.parsed)  # --set a={x: 1} then --set a.y=2
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{part}' is not a section, cannot set '{key}'")
        node = child
    node[parts[-1]] = value
