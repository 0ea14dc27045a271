"""The pipeline's pure parts, without starting Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydefense.config import load_config
from raydefense.errors import ConfigError, DataError
from raydefense.pipeline.attack import attack_plan, per_image_eps
from raydefense.pipeline.run import open_run
from raydefense.pipeline.runtime import find_user_error, images_to_tensor, tensor_to_images
from raydefense.pipeline.training import EpochData, scaling_config
from raydefense.storage import Storage
from tests.conftest import REPO


def test_scaling_config_fixed_and_elastic():
    fixed = scaling_config(load_config(overrides=["scale.num_workers=2"]), gpu=False)
    assert fixed.num_workers == 2 and fixed.resources_per_worker == {"CPU": 2.0}
    elastic = scaling_config(load_config(overrides=["scale.num_workers=2", "scale.max_workers=6",
                                                    "scale.gpus_per_worker=1"]), gpu=True)
    assert elastic.num_workers == (2, 6) and elastic.use_gpu and elastic.resources_per_worker["GPU"] == 1.0


class FakeShard:
    """Stands in for a Ray Data DataIterator: counts how often it is streamed."""

    def __init__(self, n: int):
        self.rows = {"x": torch.arange(n), "image": torch.zeros(n, 4, 4, 3, dtype=torch.uint8)}
        self.passes = 0

    def iter_torch_batches(self, *, batch_size, device=None, drop_last=False, **_):
        self.passes += 1
        n = len(self.rows["x"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.rows.items()}


def test_epoch_data_streams_once_and_shuffles_every_epoch():
    shard = FakeShard(50)
    data = EpochData(shard, cache_mb=10)
    seen = []
    for epoch in range(3):
        xs = torch.cat([b["x"] for b in data.batches(batch_size=8, device=torch.device("cpu"), shuffle=True, seed=epoch)])
        assert sorted(xs.tolist()) == list(range(50))  # every row once per epoch
        seen.append(xs.tolist())
    assert shard.passes == 1
    assert seen[0] != seen[1]  # a new order every epoch
    again = torch.cat([b["x"] for b in data.batches(batch_size=8, device=torch.device("cpu"), shuffle=True, seed=0)])
    assert again.tolist() == seen[0]  # the order is a function of the seed
    ordered = torch.cat([b["x"] for b in data.batches(batch_size=7, device=torch.device("cpu"), shuffle=False, seed=0)])
    assert ordered.tolist() == list(range(50))


def test_epoch_data_streams_every_epoch_when_too_big():
    shard = FakeShard(50)
    data = EpochData(shard, cache_mb=1e-4)
    for epoch in range(2):
        n = sum(len(b["x"]) for b in data.batches(batch_size=8, device=torch.device("cpu"), shuffle=False, seed=epoch))
        assert n == 50
    assert shard.passes == 3  # the aborted caching pass, then one per epoch


def test_per_image_eps_is_deterministic_and_in_range():
    idx = np.arange(100)
    a = per_image_eps(idx, "fgsm", seed=1, lo=2 / 255, hi=16 / 255)
    assert np.all((a >= 2 / 255) & (a <= 16 / 255))
    assert np.array_equal(a, per_image_eps(idx, "fgsm", seed=1, lo=2 / 255, hi=16 / 255))
    assert np.array_equal(a[10:20], per_image_eps(idx[10:20], "fgsm", seed=1, lo=2 / 255, hi=16 / 255))
    assert not np.array_equal(a, per_image_eps(idx, "ifgsm4", seed=1, lo=2 / 255, hi=16 / 255))
    assert a.std() > 0.01  # really spread over the range


def test_attack_plan_follows_the_paper():
    plan = attack_plan(load_config())
    assert plan["test"] == [("test_white", "target", ["fgsm", "ifgsm4"]), ("test_black", "surrogate", ["fgsm", "ifgsm4"])]
    assert plan["gnr"][0][2] == ["fgsm", "ifgsm2", "ifgsm4", "ifgsm8"] and "denoise" not in plan
    no_gnr = attack_plan(load_config(overrides=["gnr.enabled=false"]))
    assert no_gnr["denoise"][0][0] == "train"


def test_user_errors_are_found_inside_ray_wrappers():
    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    err = DataError("image '/x/1.jpg' cannot be decoded")
    assert find_user_error(Wrapper(Wrapper(err))) is err
    try:
        try:
            raise err
        except DataError as e:
            raise RuntimeError("task failed") from e
    except RuntimeError as outer:
        assert find_user_error(outer) is err
    # From a remote traceback's text only (the class travels by name).
    text = RuntimeError("ray::MapWorker() ...\nraydefense.errors.DataError: identity folder '/d/bob' is empty\n")
    found = find_user_error(text)
    assert isinstance(found, DataError) and "bob" in str(found)
    assert find_user_error(RuntimeError("plain bug")) is None


def test_image_conversions_round_trip():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 9, 3), dtype=np.uint8)
    t = images_to_tensor(imgs)
    assert t.shape == (3, 3, 8, 9) and t.dtype == torch.float32 and float(t.max()) <= 1
    assert np.array_equal(tensor_to_images(t), imgs)


def test_a_run_refuses_a_changed_config_but_not_a_rescale(tmp_path):
    storage = Storage.open(str(tmp_path))
    cfg = load_config(f"{REPO}/configs/smoke.yaml")
    open_run(cfg, storage)
    open_run(cfg.replace(["scale.num_workers=3", "eval.adaptive=false"]), storage)
    with pytest.raises(ConfigError, match="distill.T"):
        open_run(cfg.replace(["distill.T=7"]), storage)
