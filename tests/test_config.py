from pathlib import Path

import pytest
import yaml

from raydefense.config import Config, from_dict, load_config
from raydefense.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_validate_and_round_trip_through_yaml():
    cfg = load_config()
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["distill.T=2", "attack.eps_max=8/255", "models.extra_targets=[vgg16, mobilenet_v2]",
                                 "data.splits.test=7", "data.images_per_identity=42", "scale.use_gpu=true"])
    assert cfg.distill.T == 2.0 and isinstance(cfg.distill.T, float)
    assert cfg.attack.eps_max == pytest.approx(8 / 255)
    assert cfg.models.extra_targets == ("vgg16", "mobilenet_v2")
    assert cfg.data.splits.test == 7
    assert cfg.scale.use_gpu is True


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, key", [
    ("distill.T=0.5", "distill.T"),
    ("distill.lam=-1", "distill.lam"),
    ("attack.eps_min=-0.1", "attack.eps_min"),
    ("attack.eps_max=1.5", "attack.eps_max"),
    ("data.image_size=abc", "data.image_size"),
    ("data.num_identities=1", "data.num_identities"),
    ("denoise.guidance=pixels", "denoise.guidance"),
    ("attack.train_methods=[fgsm, bogus]", "attack.train_methods"),
    ("scale.use_gpu=maybe", "scale.use_gpu"),
    ("gnr.critic_norm=spectral", "gnr.critic_norm"),
    ("nosuch=1", "nosuch"),
    ("distill.nosuch=1", "distill.nosuch"),
    ("data.splits.extra=1", "data.splits.extra"),
])
def test_bad_values_and_keys_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert "\n" not in msg


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_key_in_file_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  lambda: 1.0\n")
    with pytest.raises(ConfigError, match="distill.lambda"):
        load_config(p)


def test_replace_applies_overrides_and_validates():
    cfg = Config()
    new = cfg.replace(["distill.lam=0.25"], name="other")
    assert new.distill.lam == 0.25 and new.name == "other" and cfg.distill.lam == 1.0
    with pytest.raises(ConfigError):
        cfg.replace(["distill.T=0"])
