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


# ----------------------------------------------------------------------------- issue 10: every kind at load

FLOAT_KEYS = ["models.target_train.lr", "models.surrogate_train.weight_decay", "attack.eps_max", "gnr.lr",
              "gnr.gp_weight", "gnr.augment_ratio", "denoise.lr", "distill.lam", "distill.T",
              "distill.student.lr", "baselines.dcn_weight", "baselines.distillation_T", "scale.cpus_per_worker",
              "scale.checkpoint_interval_s", "scale.cache_mb", "scale.resource_wait_s", "data.difficulty"]


def _float_keys() -> list[str]:
    """Every float-typed key of the config, found by walking the dataclasses."""
    import dataclasses
    import typing

    from raydefense.config import Config

    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif tp is float:
                out.append(f"{prefix}{f.name}")

    walk(Config, "")
    return out


def test_float_key_list_is_complete():
    assert set(FLOAT_KEYS) <= set(_float_keys())


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["inf", "-inf", ".inf", "nan", ".nan", "1e999"])
def test_every_float_key_rejects_non_finite(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        load_config(overrides=[f"{key}={value}"])


@pytest.mark.parametrize("override, key", [
    ("attack.eps_max=1/0", "attack.eps_max"),
    ("distill.T=4/0", "distill.T"),
    ("attack.eps_max=8/x", "attack.eps_max"),
    ("attack.seed=-1", "attack.seed"),
    ("seed=-1", "seed"),
    ("tune.seed=-5", "tune.seed"),
    ("seed=99999999999", "seed"),
    ("scale.object_store_memory_mb=1e8", "scale.object_store_memory_mb"),
    ("scale.object_store_memory_mb=64", "scale.object_store_memory_mb"),
    ("scale.resource_wait_s=-1", "scale.resource_wait_s"),
    ("scale.num_workers=1.5", "scale.num_workers"),
    ("scale.map_compute=threads", "scale.map_compute"),
    ("scale.amp=auto", "scale.amp"),
    ("models.target=resnet", "models.target"),
    ("models.surrogate=", "models.surrogate"),
    ("models.extra_targets=[vgg16, vgg16]", "models.extra_targets"),
    ("models.extra_targets=[nosuch]", "models.extra_targets"),
    ("models.target_pretrained=''", "models.target_pretrained"),
    ("eval.by_epsilon=[8]", "eval.by_epsilon"),
    ("eval.adaptive_eps=[]", "eval.adaptive_eps"),
    ("storage.endpoint_url=localhost:9000", "storage.endpoint_url"),
    ("storage.endpoint_url=ftp://x", "storage.endpoint_url"),
    ("tune.metric=accuracy", "tune.metric"),
    ("tune.guidance=[]", "tune.guidance"),
    ("data.images_per_identity=4", "data.images_per_identity"),
    ("data.source=' '", "data.source"),
    ("name=a/b", "name"),
    ("name=..", "name"),
    ("name=", "name"),
    ("name=.x", "name"),
    ("data.splits.test=0", "data.splits.test"),
])
def test_more_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)


def test_small_synthetic_data_names_the_short_split_and_the_need():
    with pytest.raises(ConfigError, match=r"4 images per identity leave split 'val' short.*need 12"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                    ["data.images_per_identity=4"])
    # Exactly enough is fine; the splits may also be lowered instead.
    load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml", ["data.images_per_identity=12"])
    load_config(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml",
                ["data.images_per_identity=4", "data.splits={gnr: 1, denoise: 1, val: 1, test: 1}"])


def test_string_keys_take_set_text_verbatim():
    cfg = load_config(overrides=["name=exp #2", "storage.path=/x/runs #a", "data.source=/data/faces #1"])
    assert (cfg.name, cfg.storage.path, cfg.data.source) == ("exp #2", "/x/runs #a", "/data/faces #1")
    assert load_config(overrides=["name=2024"]).name == "2024"
    assert load_config(overrides=["storage.endpoint_url=null"]).storage.endpoint_url is None
    # Non-string keys still read YAML.
    assert load_config(overrides=["distill.T=2", "scale.use_gpu=false"]).distill.T == 2.0


def test_values_are_taken_verbatim():
    cfg = load_config(values={"name": "exp #2", "storage.path": "/x/runs #a"})
    assert cfg.name == "exp #2" and cfg.storage.path == "/x/runs #a"
    # and survive a round trip through the saved config.yaml
    assert from_dict(yaml.safe_load(cfg.to_yaml())).name == "exp #2"


@pytest.mark.parametrize("content, match", [
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (bytes(range(256)), "not UTF-8"),
    (b"\x00\x01\x02", "not valid YAML"),
    (b"- a\n- b\n", "expected a mapping"),
    (b"name: 2024\n", "quote it"),
])
def test_unreadable_config_files_name_the_file(tmp_path, content, match):
    p = tmp_path / "c.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(p)
    assert "c.yaml" in str(info.value) or "name" in str(info.value)
    assert "\n" not in str(info.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_set_names_the_flag(item):
    with pytest.raises(ConfigError, match="--set"):
        load_config(overrides=[item])


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, expected", [
    (["--name", "exp #2"], {"name": "exp #2"}),
    (["--name", "2024"], {"name": "2024"}),
    (["--storage", "/x/runs #a"], {"storage": "/x/runs #a"}),
    (["--data", "/faces: x"], {"data": "/faces: x"}),
])
def test_flags_are_taken_verbatim(argv, expected):
    from raydefense.cli import common_parser, config_from_args

    cfg = config_from_args(common_parser("t").parse_args(argv))
    got = {"name": cfg.name, "storage": cfg.storage.path, "data": cfg.data.source}
    assert all(got[k] == v for k, v in expected.items())


@pytest.mark.parametrize("argv, flag", [
    (["--name", ""], "--name"), (["--name", "a/b"], "--name"), (["--name", ".."], "--name"),
    (["--name", "a\\b"], "--name"), (["--name", "x\n"], "--name"), (["--name", " x"], "--name"),
    (["--data", ""], "--data"), (["--storage", " "], "--storage"), (["--data", "a\x01"], "--data"),
])
def test_bad_flags_are_named(argv, flag):
    from raydefense.cli import common_parser, config_from_args

    with pytest.raises(ConfigError) as info:
        config_from_args(common_parser("t").parse_args(argv))
    assert str(info.value).startswith(flag) and "\n" not in str(info.value)


def test_attack_sets_take_any_registered_attack():
    """attack.train_methods / test_methods are checked against the attack registry (not a fixed
    list), and the attack stage's actor runs any of them with each image's own eps."""
    import numpy as np
    import torch

    from raydefense.attacks import list_attacks
    from raydefense.models import create_model
    from raydefense.pipeline import attack as attack_stage

    cfg = load_config(overrides=["attack.test_methods=[pgd, apgd, square]"])
    assert cfg.attack.test_methods == ("pgd", "apgd", "square")
    with pytest.raises(ConfigError, match="unknown method 'bogus'.*pgd"):
        load_config(overrides=["attack.test_methods=[bogus]"])

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3).eval()
    actor = attack_stage.AttackActor.__new__(attack_stage.AttackActor)  # without loading artifacts
    actor.device, actor.models, actor.seed, actor.lo, actor.hi = torch.device("cpu"), {"target": model}, 1, 4 / 255, 8 / 255
    actor.plan = {"test": [("test_white", "target", list(list_attacks()))]}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rows = actor({"image": images, "label": np.array([0, 1, 2, 0]), "index": np.arange(4), "split": np.array(["test"] * 4)})
    assert set(rows["method"]) == set(actor.plan["test"][0][2])
    diff = np.abs(rows["adv"].astype(int) - rows["clean"].astype(int)).max(axis=(1, 2, 3))
    assert np.all(diff <= np.ceil(rows["eps"] * 255) + 1)  # each image within its own eps (uint8 rounding)
    assert diff.max() > 0
