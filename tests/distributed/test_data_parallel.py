"""Data-parallel training with two Ray Train workers (gloo on CPU) on a real local Ray.

Every training task runs one of three loops (classifier_loop: target, surrogate, teacher,
student, DCN, distillation; denoiser_loop: UDDN, DAE, pixel-guided; gnr_loop); each is run
here with two workers, and the workers' reports (collected by a Ray Train callback from
every worker) show identical parameters after every epoch, metrics reduced over the whole
validation set, and checkpoints/artifacts that load into a single-process model.
"""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from raydefense.config import TrainConfig, load_config
from raydefense.pipeline.artifacts import load_artifact
from raydefense.storage import Storage
from tests.conftest import REPO

pytestmark = pytest.mark.slow
N_CLASSES, SIZE = 4, 32


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    yield ray
    ray.shutdown()


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent blobs: learnable in a few epochs, so losses move."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    img = rng.integers(0, 60, (n, SIZE, SIZE, 3))
    for i, y in enumerate(labels):
        r0 = 4 + 6 * int(y)
        img[i, r0:r0 + 6, 4:28, int(y) % 3] += 180
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


def _classifier_ds(n: int, seed: int):
    import ray

    x, y = _images(n, seed)
    return ray.data.from_items([{"image": x[i], "label": int(y[i])} for i in range(n)])


def _pairs_ds(n: int, seed: int):
    import ray

    x, y = _images(n, seed)
    rng = np.random.default_rng(seed + 1)
    adv = np.clip(x.astype(int) + rng.integers(-8, 9, x.shape), 0, 255).astype(np.uint8)
    return ray.data.from_items([{"clean": x[i], "adv": adv[i], "label": int(y[i])} for i in range(n)])


class _Collect:
    """Factory for a Ray Train UserCallback that appends every report (all workers) to a file."""

    @staticmethod
    def make(path: str):
        from ray.train import UserCallback

        class Collect(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")

        return Collect()


def _cfg(workers: int, **extra):
    sets = [f"scale.num_workers={workers}", "scale.cpus_per_worker=1", "scale.checkpoint_interval_s=0",
            "scale.max_failures=0", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(f"{REPO}/configs/smoke.yaml", sets)


def _fit(cfg, storage, name, loop, loop_config, datasets, reports_path):
    from raydefense.pipeline.training import make_trainer

    trainer = make_trainer(cfg, storage, name, loop, loop_config, datasets, gpu=False,
                           callbacks=[_Collect.make(str(reports_path))])
    result = trainer.fit()
    reports = [json.loads(line) for line in reports_path.read_text().splitlines()]
    return result, reports


def _classifier_config(cfg, storage, task, *, batch, epochs=3, loss="ce", **extra):
    return {"cfg": cfg.to_dict(), "task": task, "arch": "small_cnn", "num_classes": N_CLASSES,
            "train": asdict(TrainConfig(epochs=epochs, batch_size=batch, lr=3e-3)), "loss": loss, "init": None,
            "teacher": None, "storage": storage, "artifact": task, "val_sets": ["val"], **extra}


def _assert_in_step(reports, workers: int, keys=("param_digest",)):
    assert reports and all(len(r) == workers for r in reports)
    for per_worker in reports:
        for k in keys:
            values = {w[k] for w in per_worker}
            assert len(values) == 1, f"{k} differs between workers: {values}"


def test_two_workers_classifier_stays_in_step_and_reduces_validation(ray_local, tmp_path):
    from raydefense.models import create_model
    from raydefense.pipeline.classifiers import classifier_loop

    storage = Storage.open(str(tmp_path))
    cfg = _cfg(2)
    train, val = _classifier_ds(45, 0), _classifier_ds(13, 1)  # 45 and 13: odd, so shards differ in size
    lc = _classifier_config(cfg, storage, "target", batch=4)
    _, reports = _fit(cfg, storage, "target", classifier_loop, lc, {"train": train, "val": val}, tmp_path / "r.jsonl")
    # Identical parameters and identical (all-reduced) metrics on both workers, every epoch.
    _assert_in_step(reports, 2, keys=("param_digest", "val_acc", "train_loss"))
    # The artifact is a plain state_dict that loads into a single-process model, and its
    # accuracy on the whole validation set is what the workers reported.
    blob = storage.load_torch("models/target.pt")
    assert not any(k.startswith("module.") for k in blob["state_dict"])
    model = create_model("small_cnn", num_classes=N_CLASSES)
    model.load_state_dict(blob["state_dict"], strict=True)
    model.eval()
    x, y = _images(13, 1)
    with torch.no_grad():
        pred = model(torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255).argmax(1)
    assert float((pred == torch.as_tensor(y)).float().mean()) == pytest.approx(reports[-1][0]["val_acc"])
    # The per-epoch history: each epoch once, on the first attempt.
    hist = blob["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and {h["attempt"] for h in hist} == {1}
    # The checkpoints hold unwrapped state_dicts too. They are written in Ray Train's background
    # upload thread while the loop trains on: each kept one (num_to_keep=2) holds the parameters
    # of the epoch it was reported at (the digest the workers reported), not later ones.
    from raydefense.pipeline.training import param_digest

    ckpts = sorted((tmp_path / "train" / "target").glob("checkpoint_*/state.pt"))
    assert len(ckpts) == 2
    digests = {r[0]["epoch"]: r[0]["param_digest"] for r in reports}
    epochs = []
    for path in ckpts:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"], strict=True)
        assert param_digest({"model": model}) == pytest.approx(digests[state["epoch"]], rel=1e-12)
        epochs.append(state["epoch"])
    assert epochs == [1, 2]


def test_two_workers_with_half_the_batch_track_one_worker(ray_local, tmp_path):
    """Global batch 8 either way: 1 worker x 8 or 2 workers x 4, same seed, with and without
    batch norm (the two models of each side train in turn in one fit, training.sequence_task).
    Without batch norm (and without dropout) the two runs are the same computation up to float
    summation order: their loss curves agree within 1e-3. With batch norm each worker normalises
    over its own 4 images (no SyncBatchNorm, see training.py), so the curves only track: within 35%."""
    from raydefense.pipeline.classifiers import classifier_loop
    from raydefense.pipeline.training import TrainingTask, sequence_task

    storage = Storage.open(str(tmp_path))
    curves = {}
    datasets = {"train": _classifier_ds(64, 2), "val": _classifier_ds(16, 3)}
    for workers, batch in ((1, 8), (2, 4)):
        # fp32: in bf16 autocast (scale.amp's default on a CPU with AVX512-BF16) a half batch
        # rounds otherwise, and the curves drift apart by more than the summation order's 1e-3.
        cfg = _cfg(workers, **{"scale.amp": "false"})
        tasks = []
        for batch_norm in (False, True):
            # One task name for every run: the seed of a training is keyed by its task
            # (seeding.worker_seed), so all start from the same weights; only the artifact differs.
            art = f"w{workers}_bn{int(batch_norm)}"
            lc = _classifier_config(cfg, storage, "target", batch=batch, epochs=4, artifact=art,
                                    arch_options={"batch_norm": batch_norm, "dropout": 0.0})
            tasks.append(TrainingTask(name=art, loop=classifier_loop, config=lc, datasets=datasets, epochs=4,
                                      done=f"models/{art}.pt"))
        seq = sequence_task(f"w{workers}", tasks)
        _fit(cfg, storage, seq.name, seq.loop, seq.config, seq.datasets, tmp_path / f"w{workers}.jsonl")
        for batch_norm in (False, True):
            hist = storage.load_torch(f"models/w{workers}_bn{int(batch_norm)}.pt")["metrics"]["history"]
            curves[workers, batch_norm] = [h["train_loss"] for h in hist]
    for batch_norm in (False, True):
        one, two = np.array(curves[1, batch_norm]), np.array(curves[2, batch_norm])
        print(f"batch_norm={batch_norm}: 1 worker x 8: {one.round(5).tolist()}; 2 workers x 4: {two.round(5).tolist()}")
        assert one[-1] < one[0] and two[-1] < two[0]  # both learn
        if batch_norm:
            assert np.all(np.abs(one - two) <= 0.35 * np.maximum(one, two)), (one, two)
        else:
            assert np.allclose(one, two, rtol=0, atol=1e-3), (one, two)


def test_two_workers_denoiser_and_gnr(ray_local, tmp_path):
    """The denoiser and GNR loops under DDP, after the target they use, in one fit whose parts
    read different datasets by the same names ('train', 'val': training.sequence_task gives each
    part its own)."""
    from raydefense.pipeline.classifiers import classifier_loop
    from raydefense.pipeline.denoise import denoiser_loop
    from raydefense.pipeline.gnr import gnr_loop
    from raydefense.pipeline.training import TrainingTask, sequence_task

    storage = Storage.open(str(tmp_path))
    cfg = _cfg(2, **{"denoise.epochs": 2, "gnr.epochs": 2})
    pairs, val = _pairs_ds(27, 4), _pairs_ds(9, 5)
    seq = sequence_task("all", [
        TrainingTask(name="target", loop=classifier_loop, config=_classifier_config(cfg, storage, "target", batch=4, epochs=1),
                     datasets={"train": _classifier_ds(24, 0), "val": _classifier_ds(8, 1)}, epochs=1,
                     done="models/target.pt"),
        TrainingTask(name="uddn", loop=denoiser_loop, epochs=2, done="models/uddn.pt", datasets={"train": pairs, "val": val},
                     config={"cfg": cfg.to_dict(), "storage": storage, "arch": "uddn", "loss": "logits", "artifact": "uddn"}),
        TrainingTask(name="gnr", loop=gnr_loop, epochs=2, done="models/gnr_generator.pt",
                     datasets={"train": pairs.select_columns(["clean", "adv"])},
                     config={"cfg": cfg.to_dict(), "storage": storage}),
    ])
    assert set(seq.datasets) == {"train", "val", "uddn.train", "uddn.val", "gnr.train"}
    _, reports = _fit(cfg, storage, seq.name, seq.loop, seq.config, seq.datasets, tmp_path / "r.jsonl")
    by_part = {name: [r for r in reports if r[0]["task"] == name] for name in ("target", "uddn", "gnr")}
    assert [len(v) for v in by_part.values()] == [1, 2, 2]
    _assert_in_step(by_part["uddn"], 2, keys=("param_digest", "val_white_acc", "train_loss"))
    _assert_in_step(by_part["gnr"], 2, keys=("param_digest", "wasserstein"))
    load_artifact(storage, "uddn")  # plain weights
    load_artifact(storage, "gnr_generator")
    # The target, the UDDN and the GNR generator trained in channels-last layout (T.prepare_model),
    # under DDP too; the saved weights keep that layout and load into a fresh network of either layout.
    for name in ("target", "uddn", "gnr_generator"):
        state = storage.load_torch(f"models/{name}.pt")["state_dict"]
        convs = [v for v in state.values() if v.dim() == 4 and v.shape[2] * v.shape[3] > 1]
        assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs), name


def test_two_workers_every_classifier_loss_in_one_sequence_that_resumes_part_by_part(ray_local, tmp_path):
    """The student (KT), DCN and defensive-distillation losses under DDP, run after their teacher
    in one fit (training.sequence_task): the students load the teacher rank 0 wrote in the same
    fit. The first fit fails in its last part; the rerun skips the finished parts and starts that
    part from scratch although the fit's latest checkpoint (DCN's, the same architecture) is there."""
    from ray.train import TrainingFailedError

    from raydefense.pipeline.classifiers import classifier_loop
    from raydefense.pipeline.training import TrainingTask, sequence_task

    storage = Storage.open(str(tmp_path))
    cfg = _cfg(2)
    datasets = {"train": _classifier_ds(18, 6), "val": _classifier_ds(6, 7)}
    extra = {"teacher": {}, "kt": {"teacher": "teacher", "lam": 1.0, "T": 4.0}, "dcn": {"dcn_weight": 0.01},
             "soft": {"teacher": "teacher", "T": 4.0}}

    def sequence(soft_teacher: str):
        tasks = []
        for loss, kw in extra.items():
            kw = {**kw, "teacher": soft_teacher} if loss == "soft" else kw
            lc = _classifier_config(cfg, storage, loss, batch=4, epochs=1, loss="ce" if loss == "teacher" else loss, **kw)
            tasks.append(TrainingTask(name=loss, loop=classifier_loop, config=lc, datasets=datasets, epochs=1,
                                      done=f"models/{loss}.pt"))
        return sequence_task("losses", tasks)

    first = sequence("no_such_teacher")
    with pytest.raises(TrainingFailedError):
        _fit(cfg, storage, first.name, first.loop, first.config, first.datasets, tmp_path / "r1.jsonl")
    reports = [json.loads(line) for line in (tmp_path / "r1.jsonl").read_text().splitlines()]
    assert [r[0]["task"] for r in reports] == ["teacher", "kt", "dcn"]
    for r in reports:
        _assert_in_step([r], 2, keys=("param_digest", "val_acc", "task"))
    done = {name: (tmp_path / "models" / f"{name}.pt").read_bytes() for name in ("teacher", "kt", "dcn")}
    assert not storage.exists("models/soft.pt")

    second = sequence("teacher")
    _, reports = _fit(cfg, storage, second.name, second.loop, second.config, second.datasets, tmp_path / "r2.jsonl")
    assert [r[0]["task"] for r in reports] == ["soft"]  # the finished parts did not run again
    _assert_in_step(reports, 2, keys=("param_digest", "val_acc"))
    soft = storage.load_torch("models/soft.pt")["metrics"]
    assert soft["start_epoch"] == 0 and [h["epoch"] for h in soft["history"]] == [0]  # not DCN's checkpoint
    assert {n: (tmp_path / "models" / f"{n}.pt").read_bytes() for n in done} == done
