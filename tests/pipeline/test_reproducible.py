"""Two runs of one config and seed give the same metrics.json (issue 12), and each source of
run-to-run variation is held in check at its source:

- Ray Data hands rows to actors in batches it forms as blocks finish: ``keep_order`` makes every
  execution batch the same rows the same way (test with Ray);
- random starts (PGD, APGD) are keyed by row id, not by batch position: the same row gets the
  same start in any batch (``Attack.with_image_seeds``, ``seeding.row_seeds``), in the attack
  stage's actor and in the whole-model attacks;
- draws from torch's global generator in an attack actor (Square) are seeded per batch, not left
  to the batches the actor process ran before.

The end-to-end test (slow: two whole pipelines) runs a tiny config twice in separate run folders
on one local Ray and compares metrics.json (everything but timings and paths), every model's
parameters and every adversarial row.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from raydefense.config import load_config
from tests.conftest import REPO

SMOKE = Path(REPO) / "configs" / "smoke.yaml"


def _batchings(n: int) -> list[list[np.ndarray]]:
    """Three ways of cutting rows 0..n-1 into batches: whole, reversed, in two interleaved halves."""
    rows = np.arange(n)
    return [[rows], [rows[::-1].copy()], [rows[1::2].copy(), rows[0::2].copy()]]


def _by_row(parts: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Per-batch results (rows, values) put back in row order."""
    out = [None] * n
    for rows, values in parts:
        for r, v in zip(rows, values):
            out[r] = v
    return np.stack(out)


# ----------------------------------------------------------------------------- row-keyed randomness


class _StartDecides(nn.Module):
    """Two classes; the input gradient is zero (rounded logits), so PGD and APGD stay at their
    random start, and a uniform grey image sits on the boundary: whether an attack fools the
    model is decided by its random start alone (about a coin flip per row)."""

    def __init__(self):
        super().__init__()
        w = torch.ones(3 * 8 * 8)
        w[::2] = -1  # balanced: sum(w * grey) == 0
        self.register_buffer("w", w)

    def forward(self, x):
        s = (x.flatten(1) * self.w).mean(1)
        return torch.stack([torch.zeros_like(s), torch.round(s * 1e6) / 1e6 - 1e-6], dim=1)


def test_row_seeds_are_a_function_of_the_row_id_and_the_keys():
    from raydefense.seeding import row_seeds

    ids = np.array([7, 3, 11, 0])
    seeds = row_seeds(ids, 0, 5)
    assert seeds.dtype == np.int64 and (seeds >= 0).all() and len(set(seeds.tolist())) == 4
    assert row_seeds(ids[::-1], 0, 5).tolist() == seeds[::-1].tolist()  # order-free
    assert row_seeds(ids[1:2], 0, 5).tolist() == seeds[1:2].tolist()  # batch-free
    assert not np.array_equal(row_seeds(ids, 1, 5), seeds)  # the run's seed matters
    assert not np.array_equal(row_seeds(ids, 0, 6), seeds)  # and the purpose


@pytest.mark.parametrize("name", ["pgd", "apgd"])
def test_image_seeded_random_starts_do_not_depend_on_the_batch(name):
    """With image seeds an image's random start is the same in any batch, at any position; with
    torch's global generator (the old behaviour) it changes with the batch. (The model's zero
    gradient makes the attack return its start, so the starts are compared exactly: with a real
    model float results also depend on the batch in the last bits, which keep_order handles.)"""
    from raydefense.attacks import create_attack
    from raydefense.seeding import row_seeds

    model = _StartDecides().eval()
    n = 8
    x = torch.full((n, 3, 8, 8), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    eps = torch.linspace(2 / 255, 16 / 255, n)
    seeds = row_seeds(np.arange(n), 0, 1)

    def run(seeded: bool) -> list[np.ndarray]:
        results = []
        for batches in _batchings(n):
            parts = []
            for rows in batches:
                attack = create_attack(name, model, eps=eps[rows], steps=2, restarts=2)
                if seeded:
                    attack.with_image_seeds(seeds[rows])
                parts.append((rows, attack(x[rows], y[rows]).numpy()))
            results.append(_by_row(parts, n))
        return results

    seeded = run(True)
    assert all(np.array_equal(r, seeded[0]) for r in seeded[1:])
    assert not np.array_equal(seeded[0], x.numpy())  # the starts moved the images
    unseeded = run(False)
    assert not all(np.array_equal(r, unseeded[0]) for r in unseeded[1:])
    # Each restart gets its own start (a second restart from the first one's start would only
    # repeat it), and image i's start is a function of its seed alone.
    attack = create_attack(name, model, eps=eps).with_image_seeds(seeds)
    starts = [attack.uniform_start(x, attack.budget(eps, x), restart=r) for r in (0, 1)]
    assert not torch.equal(starts[0], starts[1])
    sub = torch.tensor([5, 2])
    assert torch.equal(attack.uniform_start(x[sub], attack.budget(eps, x)[sub], restart=1, rows=sub), starts[1][sub])


def test_image_seeds_must_match_the_batch():
    from raydefense.attacks import PGD
    from raydefense.models import create_model

    attack = PGD(create_model("small_cnn", num_classes=4).eval(), eps=4 / 255).with_image_seeds([1, 2, 3])
    with pytest.raises(ValueError, match="image_seeds has 3 values for a batch of 2"):
        attack(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must be >= 0"):
        attack.with_image_seeds([-1, 2])


def _attack_actor(methods: list[str], model: nn.Module):
    from raydefense.pipeline import attack as attack_stage

    actor = attack_stage.AttackActor.__new__(attack_stage.AttackActor)  # without loading artifacts
    actor.device, actor.models, actor.seed, actor.lo, actor.hi = torch.device("cpu"), {"target": model}, 1, 4 / 255, 8 / 255
    actor.plan = {"test": [("test_white", "target", methods)]}
    return actor


def _clean_batch(n: int, *, size: int = 32, grey: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = np.full((n, size, size, 3), 128, np.uint8) if grey else rng.integers(0, 256, (n, size, size, 3), np.uint8)
    return {"image": images, "label": np.arange(n) % 2, "index": np.arange(100, 100 + n),
            "split": np.array(["test"] * n)}


def test_attack_stage_rows_do_not_depend_on_the_batch():
    """The attack actor's random-start attacks start each image from the same point whichever
    batch Ray Data puts it in (compared exactly through a model with zero gradient)."""
    methods = ["pgd", "apgd"]
    actor = _attack_actor(methods, _StartDecides().eval())
    batch = _clean_batch(8, size=8, grey=True)
    batch["label"][:] = 0
    results = []
    for batches in _batchings(8):
        parts = []
        for rows in batches:
            out = actor({k: v[rows] for k, v in batch.items()})
            for k, method in enumerate(methods):
                keep = out["method"] == method
                parts.append((np.searchsorted(batch["index"], out["index"][keep]) + 8 * k, out["adv"][keep]))
        results.append(_by_row(parts, 8 * len(methods)))
    assert (results[0] != 128).any()
    assert all(np.array_equal(r, results[0]) for r in results[1:])


class _OnEdge(nn.Module):
    """Two classes and a linear score just below the boundary on a grey image: right on the clean
    image, fooled by almost any perturbation, so a random search (Square) ends within a few
    queries, wherever its randomness took it."""

    def __init__(self):
        super().__init__()
        self.register_buffer("v", torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        s = ((x.flatten(1) - 128 / 255) * self.v).sum(1)
        return torch.stack([torch.full_like(s, 1e-3), s], dim=1)


def test_attack_stage_seeds_the_global_generator_per_batch():
    """Square draws from torch's global generator: a batch is attacked the same whatever this
    actor process drew before."""
    actor = _attack_actor(["square"], _OnEdge().eval())
    batch = _clean_batch(4, size=8, grey=True)
    batch["label"][:] = 0
    first = actor(batch)["adv"]
    assert (first != 128).any()
    torch.rand(1000)  # another batch's draws
    assert np.array_equal(actor(batch)["adv"], first)


def test_whole_model_attacks_do_not_depend_on_the_batch(monkeypatch):
    """Whole-model PGD / APGD / fixed-level PGD: per-row results are the same in any batching
    (each row's random start is keyed by its image and test method)."""
    import raydefense.pipeline.adaptive as adaptive

    model = _StartDecides().eval()
    monkeypatch.setattr(adaptive, "build_defended_models", lambda *a, **k: {"toy": model})
    actor = adaptive.WholeModelActor(storage=None, defenses={"toy": (None, "target")}, levels=[8 / 255],
                                     first_method="fgsm", steps=2, restarts=1, apgd_steps=2, apgd_restarts=1,
                                     autoattack=True, eot_samples=1, jpeg_quality=75, gpu=False, seed=3)
    n = 16
    grey = np.full((n, 8, 8, 3), 128, dtype=np.uint8)
    batch = {"clean": grey, "adv": grey, "label": np.zeros(n, dtype=np.int64), "eps": np.full(n, 8 / 255),
             "method": np.array(["fgsm", "ifgsm4"] * (n // 2)), "index": np.repeat(np.arange(n // 2), 2)}
    flags = ["toy:clean", "toy:pgd", "toy:apgd_ce", "toy:level0"]
    results = []
    for batches in _batchings(n):
        parts = []
        for rows in batches:
            out = actor({k: v[rows] for k, v in batch.items()})
            parts.append((rows, np.stack([out[f] for f in flags], axis=1)))
        results.append(_by_row(parts, n))
    assert results[0][:, 0].all()  # every row is right when clean: every row is attacked
    assert 0 < results[0][:, 1].sum() < n  # the starts do decide (some rows fooled, some not)
    assert all(np.array_equal(r, results[0]) for r in results[1:])


# ----------------------------------------------------------------------------- Ray Data batches


# The smoke preset without the trained baselines (every stage still runs), a random-start attack
# in the training set, several shards, and evaluation in several batches.
TINY = [
    "name=repro", "data.shard_size=8", "scale.object_store_memory_mb=256", "baselines.enabled=[jpeg]",
    "denoise.baselines=[]", "attack.train_methods=[fgsm, pgd]", "eval.batch_size=8",
    "eval.adaptive_defenses=[none, uddn_kt]", "eval.autoattack_steps=5", "eval.adaptive_steps=3",
    "eval.by_epsilon=[0.0, 0.0313725490]",
]


@pytest.fixture(scope="module")
def pipeline_ray():
    """One local Ray for the module, started the way a run starts it (``init_ray``)."""
    import ray

    from raydefense.pipeline.runtime import init_ray

    started = not ray.is_initialized()
    init_ray(load_config(SMOKE, TINY))
    yield
    if started:
        ray.shutdown()


class _SlowBatchIds:
    """map_batches callable: records which rows share a batch, taking uneven time per batch."""

    def __init__(self, *, gpu: bool, threads: int = 1):
        self.rng = np.random.default_rng()  # unseeded on purpose: uneven timing, as in real work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(float(self.rng.uniform(0, 0.05)))
        n = len(batch["index"])
        return {"index": batch["index"], "batch": np.full(n, int(batch["index"][0])), "pos": np.arange(n)}


@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_pool_stages_batch_the_same_rows_on_every_execution(tmp_path, pipeline_ray, compute):
    """Blocks of several files through a pool of 2 (tasks or actors): with Ray Data's default
    (preserve_order off) which rows share a batch changes between executions; pool_map keeps
    them fixed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data.expressions import col

    from raydefense.pipeline.runtime import pool_map

    for f in range(6):
        idx = np.arange(20 * f, 20 * f + 20)
        pq.write_table(pa.table({"index": idx, "split": np.where(idx % 3 == 0, "test", "gnr")}),
                       tmp_path / f"part-{f}.parquet")
    cfg = load_config(SMOKE, [*TINY, "scale.attack_actors=2", f"scale.map_compute={compute}"])

    def once() -> list[tuple[int, int, int]]:
        reads = [ray.data.read_parquet(str(tmp_path)).filter(expr=col("split").is_in([s])) for s in ("gnr", "test")]
        df = pool_map(reads[0].union(reads[1]), _SlowBatchIds, {}, cfg=cfg, gpu=False, batch_size=8).to_pandas()
        return list(zip(df["index"], df["batch"], df["pos"]))

    first = once()
    assert sorted(i for i, _, _ in first) == list(range(120))
    assert once() == first


class _Instance:
    """map_batches callable: which process and which instance made each row."""

    def __init__(self, *, gpu: bool, threads: int = 1):
        import os

        self.pid, self.token = os.getpid(), int(np.random.default_rng().integers(1 << 62))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        return {"id": batch["id"], "pid": np.full(n, self.pid), "token": np.full(n, self.token)}


def test_task_pool_builds_one_instance_per_process_and_execution(pipeline_ray):
    """A task pool (scale.map_compute: tasks) builds its class once per worker process for an
    execution, keeps it for that execution's later batches, and builds a new one for the next
    execution (whose models may have changed), while Ray reuses the processes."""
    import ray

    from raydefense.pipeline.runtime import pool_map

    cfg = load_config(SMOKE, [*TINY, "scale.attack_actors=2", "scale.map_compute=tasks"])

    def once():
        df = pool_map(ray.data.range(64, override_num_blocks=8), _Instance, {}, cfg=cfg, gpu=False,
                      batch_size=4).to_pandas()
        assert sorted(df["id"]) == list(range(64))
        assert df.groupby("pid").size().max() >= 8  # some process ran two batches or more
        return df.groupby("pid")["token"].nunique(), set(df["token"])

    per_process, tokens = once()
    assert len(per_process) >= 1 and (per_process == 1).all()  # 16 batches, one instance per process
    per_process_2, tokens_2 = once()
    assert (per_process_2 == 1).all()
    assert not tokens & tokens_2  # a new execution builds anew


def test_gpu_task_pool_keeps_its_process_across_batches():
    """On GPU a task pool's tasks ask for a GPU and keep their process (map_instances passes
    max_calls=0 over Ray's GPU default of 1, which would restart the process and reload the
    models for every batch): one process, one instance per execution, 8 batches each. Run on a
    local Ray that advertises a GPU on this CPU machine, in its own process."""
    import json

    runs = json.loads(next(line for line in _probe().splitlines() if line.startswith("RESULT "))[7:])
    tokens = []
    for run in runs:
        assert sorted(run["id"]) == list(range(32))
        assert set(run["cuda"]) == {"0"} and all(run["gpu"])  # Ray gave each task the GPU
        assert len(set(run["pid"])) == 1 and len(set(run["token"])) == 1  # one process, one instance
        tokens.append(run["token"][0])
    assert tokens[0] != tokens[1]  # the next execution builds anew


def _probe(*args: str) -> str:
    import subprocess
    import sys

    probe = Path(__file__).with_name("gpu_task_pool_probe.py")
    res = subprocess.run([sys.executable, str(probe), str(SMOKE), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_gpu_task_pools_are_refused_where_a_node_has_several_gpus():
    """Why: on a node with two GPUs (resources advertised on this CPU machine), Ray gives one
    reused GPU task process GPU '0' for one task and '1' for the next, and CUDA would stay on the
    first. So pool_map refuses a GPU task pool there, with one line naming the node and the
    config key, before the stage starts."""
    import json

    out = _probe("2", "raw")
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("RAW "))[4:])
    assert any(len(set(cudas)) > 1 for cudas in raw.values()), raw  # the hazard, with plain Ray
    refused = next(line for line in out.splitlines() if line.startswith("REFUSED "))
    assert "has 2 GPUs" in refused and "scale.map_compute=actors" in refused and "RESULT" not in out


# ----------------------------------------------------------------------------- end to end


_VOLATILE = ("timings_s", "eval_timings_s", "seconds", "epoch_s", "time", "storage")


def _stable(value):
    """metrics.json without what may differ between identical runs: timings and paths."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _adv_rows(storage) -> dict[tuple, bytes]:
    import pyarrow.dataset as pads

    table = pads.dataset(storage.path("data/adv"), filesystem=storage.fs, format="parquet",
                         partitioning="hive").to_table().to_pydict()
    return {(s, i, m): np.asarray(a, dtype=np.uint8).tobytes()
            for s, i, m, a in zip(table["set"], table["index"], table["method"], table["adv"])}


@pytest.mark.slow
@pytest.mark.long
def test_two_runs_of_one_config_give_identical_metrics(tmp_path, pipeline_ray):
    from raydefense.pipeline.runner import run_pipeline
    from raydefense.storage import Storage

    metrics, runs = [], []
    for run in ("first", "second"):
        cfg = load_config(SMOKE, [*TINY, f"storage.path={tmp_path / run}"])
        lines: list[str] = []
        metrics.append(run_pipeline(cfg, echo=lines.append))
        runs.append(Storage.open(str(tmp_path / run)).child(cfg.name))

    a, b = metrics
    assert a["accuracy"] == b["accuracy"]  # every defense, every test set, whole-model attacks too
    assert {"none", "uddn", "uddn_kt", "jpeg"} <= set(a["accuracy"])
    assert "adaptive_pgd" in a["accuracy"]["uddn_kt"]
    assert _stable(a) == _stable(b)  # and everything else: L1, curves, intervals, paired tests
    names = sorted(runs[0].listdir("models"))
    assert names == sorted(runs[1].listdir("models")) and "student.pt" in names
    for name in names:
        sa, sb = (st.load_torch(f"models/{name}")["state_dict"] for st in runs)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    rows_a, rows_b = (_adv_rows(st) for st in runs)
    assert rows_a.keys() == rows_b.keys() and rows_a == rows_b
