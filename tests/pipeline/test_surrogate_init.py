"""Where the black-box surrogate starts (``models.surrogate_init``) and which batches it sees.

With ``surrogate_init: target`` the surrogate starts from the target's very starting weights (an
attacker fine-tuning the published checkpoint the defender fine-tuned); with either setting it
trains on its own batch order and augmentation draws, never replaying the target's.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from raydefense.config import load_config
from raydefense.errors import ConfigError
from tests.conftest import REPO

SMOKE = Path(REPO) / "configs" / "smoke.yaml"


def test_isolated_rng_puts_every_global_stream_back():
    from raydefense.seeding import isolated_rng, seed_everything

    seed_everything(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(3)
    with isolated_rng():
        seed_everything(12345)
        torch.rand(100), np.random.rand(100), random.random()
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_the_surrogate_has_a_batch_stream_of_its_own():
    from raydefense.seeding import epoch_seed

    seeds = {(s, e, stream): epoch_seed(s, e, stream) for s in (0, 1) for e in range(8) for stream in ("", "surrogate")}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, epoch, stream) share a batch order


@pytest.mark.parametrize("override, culprit", [
    ("models.surrogate_init=mine", "unknown value"),
    ("models.surrogate=inception_v3", "the target's architecture"),
    ("models.surrogate_pretrained=/nonexistent.pt", "surrogate_pretrained must then be null"),
])
def test_bad_surrogate_init_is_a_config_error_naming_the_key(override, culprit):
    base = ["models.target=small_cnn", "models.surrogate=small_cnn", "models.surrogate_init=target"]
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [*base, override])
    assert "models.surrogate_init" in str(err.value)
    if culprit != "unknown value":
        assert culprit in str(err.value)


@pytest.mark.slow
def test_surrogate_init_target_starts_the_surrogate_from_the_targets_initialisation(tmp_path):
    """Models stage only, one epoch at a learning rate of 1e-12 (the weights barely move): the
    surrogate's parameters equal the target's starting weights, and so do the target's, i.e. the
    driver built exactly the initialisation the target's training worker starts from. Their
    BatchNorm statistics differ: the two saw different batches."""
    import ray

    from raydefense.pipeline.runner import run_pipeline
    from raydefense.storage import Storage

    over = ["name=sinit", f"storage.path={tmp_path}", "scale.object_store_memory_mb=256", "models.surrogate_init=target",
            "models.target_train={epochs: 1, batch_size: 16, lr: 1.0e-12}",
            "models.surrogate_train={epochs: 1, batch_size: 16, lr: 1.0e-12}"]
    cfg = load_config(SMOKE, over)
    started = not ray.is_initialized()  # a Ray another module started is left to it
    try:
        run_pipeline(cfg, stop_after="models", echo=lambda _: None)
    finally:
        if started:
            ray.shutdown()
    st = Storage.open(str(tmp_path)).child("sinit")
    init, target, surrogate = (st.load_torch(f"models/{n}.pt")["state_dict"] for n in ("target_init", "target", "surrogate"))
    params = [k for k in init if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params
    for k in params:
        torch.testing.assert_close(target[k], init[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(surrogate[k], init[k], rtol=0, atol=1e-6)
    stats = [k for k in init if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(target[k], surrogate[k]) for k in stats)
