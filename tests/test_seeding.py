"""Seeds of the training loops (raydefense.seeding)."""
from __future__ import annotations

import torch

from raydefense.models import create_model
from raydefense.seeding import seed_everything, worker_seed


def test_each_classifier_training_has_its_own_stream():
    # A surrogate of the target's architecture must not start from the target's weights.
    seeds = {task: worker_seed(0, "classifier", 0, task=task) for task in ("target", "surrogate", "teacher", "student")}
    assert len(set(seeds.values())) == 4
    assert worker_seed(0, "classifier", 0, task="surrogate") == worker_seed(0, "classifier", 0, task="surrogate")
    assert worker_seed(1, "classifier", 0, task="target") != seeds["target"]
    models = {}
    for task in ("target", "surrogate"):
        seed_everything(worker_seed(0, "classifier", 0, task=task))
        models[task] = create_model("small_cnn", num_classes=5)
    a, b = (torch.cat([p.flatten() for p in m.parameters()]) for m in models.values())
    assert not torch.equal(a, b)


def test_worker_seeds_differ_by_rank_and_loop():
    assert worker_seed(0, "classifier", 0) != worker_seed(0, "classifier", 1)
    assert worker_seed(0, "classifier", 0) != worker_seed(0, "gnr", 0)
