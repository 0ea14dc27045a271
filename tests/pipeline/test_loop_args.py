"""The typed loop arguments and the per-task builders (no Ray: only the dicts Ray would carry)."""
from __future__ import annotations

import os
from dataclasses import asdict

import pytest

from raydefense.config import TrainConfig, load_config
from raydefense.pipeline.denoise import denoiser_args
from raydefense.pipeline.distill import baseline_args, student_args, teacher_args
from raydefense.pipeline.loop_args import ClassifierArgs, DenoiserArgs, GnrArgs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cfg():
    return load_config(f"{REPO}/configs/smoke.yaml")


def test_round_trip_through_the_loop_config(cfg):
    for args in (teacher_args(cfg, num_classes=4), student_args(cfg, num_classes=4, val_sets=("val", "val_white")),
                 denoiser_args(cfg, "uddn"), denoiser_args(cfg, "dae"), GnrArgs(), *baseline_args(cfg, num_classes=4)):
        config = args.loop_config(cfg, storage="S")
        assert config["cfg"] == cfg.to_dict() and config["storage"] == "S"
        assert type(args).from_loop_config(config) == args


def test_a_hand_written_loop_config_is_read_as_the_same_args():
    """The flat dict a caller of classifier_loop writes by hand (as tests/distributed do)."""
    train = TrainConfig(epochs=2, batch_size=4, lr=3e-3)
    config = {"cfg": {}, "task": "t", "arch": "small_cnn", "num_classes": 3, "train": asdict(train), "loss": "kt",
              "init": None, "teacher": "teacher", "storage": None, "artifact": "t", "val_sets": ["val"], "lam": 1.0,
              "T": 4.0}
    args = ClassifierArgs.from_loop_config(config)
    assert args.train == train and args.val_sets == ("val",) and (args.lam, args.T) == (1.0, 4.0)


def test_bad_loop_configs_name_the_key():
    with pytest.raises(ValueError, match="unknown loop config keys \\['lamda'\\]"):
        DenoiserArgs.from_loop_config({"arch": "uddn", "loss": "logits", "lamda": 1})
    with pytest.raises(ValueError, match="'loss' is missing"):
        DenoiserArgs.from_loop_config({"arch": "uddn"})
    with pytest.raises(ValueError, match="unknown classifier loss 'hinge'"):
        ClassifierArgs(task="t", arch="a", num_classes=2, train=TrainConfig(), artifact="t", loss="hinge")
    with pytest.raises(ValueError, match="needs a teacher"):
        ClassifierArgs(task="t", arch="a", num_classes=2, train=TrainConfig(), artifact="t", loss="kt")


def test_the_builders_follow_the_config(cfg):
    t = teacher_args(cfg, num_classes=5, artifact="tune/s/1/teacher")
    assert (t.arch, t.loss, t.train, t.artifact) == (cfg.models.target, "ce", cfg.distill.teacher, "tune/s/1/teacher")
    s = student_args(cfg, num_classes=5, teacher="tune/s/1/teacher")
    assert (s.loss, s.teacher, s.lam, s.T, s.train) == ("kt", "tune/s/1/teacher", cfg.distill.lam, cfg.distill.T,
                                                        cfg.distill.student)
    assert denoiser_args(cfg, "uddn").loss == cfg.denoise.guidance
    assert denoiser_args(cfg.replace(["denoise.guidance=features"]), "uddn").loss == "features"
    assert (denoiser_args(cfg, "dae").arch, denoiser_args(cfg, "dae").loss) == ("dae", "pixel")
    both = cfg.replace(["baselines.enabled=[dcn, distillation]"])
    assert [a.artifact for a in baseline_args(both, num_classes=5)] == ["dcn", "distill_teacher", "distillation"]
