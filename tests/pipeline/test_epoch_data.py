"""How training workers split a dataset (EpochData, Step): every row once per epoch across
the workers, the same number of steps on every worker, no one-row batches, and the same
randomness whatever the number of workers. Pure torch: ranks are simulated."""
from __future__ import annotations

import pytest
import torch

from raydefense.errors import DataError
from raydefense.pipeline.training import EpochData, Step, global_batches

CPU = torch.device("cpu")


class FakeDataset:
    """Stands in for a Ray Data iterator: yields its rows in a given order, counts passes."""

    def __init__(self, n: int, *, order: torch.Tensor | None = None, block: int = 7):
        ids = torch.arange(n) if order is None else order
        self.rows = {"x": ids, "image": (ids.view(-1, 1, 1, 1) % 251).to(torch.uint8).expand(n, 2, 2, 3).contiguous()}
        self.block = block
        self.passes = 0
        self.devices: list = []  # the device each pass asked for (Ray's default: "auto")

    def count(self) -> int:
        return len(self.rows["x"])

    def iter_torch_batches(self, *, batch_size, drop_last=False, local_shuffle_buffer_size=None,
                           local_shuffle_seed=None, device="auto", **_):
        self.passes += 1
        self.devices.append(device)
        n = len(self.rows["x"])
        order = torch.arange(n)
        if local_shuffle_buffer_size:  # deterministic for a seed, as Ray's is for the same input order
            order = torch.randperm(n, generator=torch.Generator().manual_seed(local_shuffle_seed))
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            yield {k: v[idx] for k, v in self.rows.items()}


def epoch(n: int, world: int, *, batch: int, seed: int, cache_mb: float = 10, order=None):
    """Run one epoch on every simulated worker; returns per-rank lists of Steps."""
    out = []
    for rank in range(world):
        data = EpochData(FakeDataset(n, order=order), cache_mb=cache_mb, rank=rank, world_size=world)
        out.append(list(data.steps(batch_size=batch, device=CPU, shuffle=True, seed=seed)))
    return out


@pytest.mark.parametrize("cache_mb", [10, 0])  # cached, streamed
@pytest.mark.parametrize("n,world,batch", [(50, 1, 8), (50, 2, 4), (49, 2, 4), (41, 2, 4), (33, 4, 4), (17, 1, 8),
                                           (9, 1, 8), (25, 3, 4), (4, 2, 8)])
def test_every_row_once_per_epoch_across_workers(n, world, batch, cache_mb):
    ranks = epoch(n, world, batch=batch, seed=3, cache_mb=cache_mb)
    assert len({len(steps) for steps in ranks}) == 1  # same step count on every worker (DDP stays in lockstep)
    rows = torch.cat([s["x"] for steps in ranks for s in steps])
    assert sorted(rows.tolist()) == list(range(n))  # no drops, no duplicates
    for steps in ranks:
        for s in steps:
            assert len(s) >= 2  # never a one-row batch (batch norm) nor an empty worker
            assert s.global_size <= batch * world + 2 * world
    # The workers' weights add up so that DDP's average is the global batch mean.
    for i in range(len(ranks[0])):
        assert sum(r[i].loss_weight for r in ranks) == pytest.approx(world)


def test_one_row_tail_is_merged_not_dropped():
    assert global_batches(17, 8, 1) == [(0, 8), (8, 17)]
    assert global_batches(16, 8, 1) == [(0, 8), (8, 16)]
    assert global_batches(19, 8, 2) == [(0, 8), (8, 19)]  # 3 rows cannot give 2 workers 2 rows each
    assert global_batches(5, 8, 2) == [(0, 5)]


def test_too_small_for_the_workers_is_a_clear_error():
    data = EpochData(FakeDataset(3), rank=0, world_size=2, name="teacher")
    with pytest.raises(DataError, match="teacher.*3 rows.*scale.num_workers"):
        list(data.steps(batch_size=4, device=CPU, shuffle=True, seed=0))
    with pytest.raises(DataError, match="0 rows"):
        list(EpochData(FakeDataset(0), rank=0, world_size=1).steps(batch_size=4, device=CPU, shuffle=False, seed=0))


def test_order_does_not_depend_on_block_arrival():
    n = 40
    a = epoch(n, 2, batch=4, seed=5)
    b = epoch(n, 2, batch=4, seed=5, order=torch.randperm(n, generator=torch.Generator().manual_seed(9)))
    for ra, rb in zip(a, b):
        assert [s["x"].tolist() for s in ra] == [s["x"].tolist() for s in rb]


def test_cached_epochs_stream_once_and_reshuffle():
    ds = FakeDataset(50)
    data = EpochData(ds, cache_mb=10, rank=0, world_size=1)
    orders = [torch.cat([s["x"] for s in data.steps(batch_size=8, device=CPU, shuffle=True, seed=e)]).tolist()
              for e in range(3)]
    assert ds.passes == 1 and orders[0] != orders[1]
    again = torch.cat([s["x"] for s in data.steps(batch_size=8, device=CPU, shuffle=True, seed=0)]).tolist()
    assert again == orders[0]
    plain = torch.cat([s["x"] for s in data.steps(batch_size=7, device=CPU, shuffle=False, seed=0)]).tolist()
    assert sorted(plain) == list(range(50))


def test_streams_every_epoch_when_too_big():
    ds = FakeDataset(50)
    data = EpochData(ds, cache_mb=1e-4, rank=0, world_size=1)
    for e in range(2):
        assert sum(len(s) for s in data.steps(batch_size=8, device=CPU, shuffle=False, seed=e)) == 50
    assert ds.passes == 3  # the aborted caching pass, then one per epoch


@pytest.mark.parametrize("cache_mb", [10, 0])
def test_eval_batches_cover_the_set_once_across_workers(cache_mb):
    n, world = 23, 3
    seen = []
    for rank in range(world):
        data = EpochData(FakeDataset(n), cache_mb=cache_mb, rank=rank, world_size=world)
        seen += torch.cat([b["x"] for b in data.eval_batches(batch_size=4, device=CPU)]).tolist()
    assert sorted(seen) == list(range(n))


def test_row_randomness_does_not_depend_on_the_worker_count():
    one = epoch(40, 1, batch=8, seed=1)[0]
    two = epoch(40, 2, batch=4, seed=1)
    for i, s1 in enumerate(one):
        parts = [two[r][i] for r in range(2)]
        assert sorted(torch.cat([p["x"] for p in parts]).tolist()) == sorted(s1["x"].tolist())
        u1 = dict(zip(s1["x"].tolist(), s1.rand(3).tolist()))
        for p in parts:
            for x, u in zip(p["x"].tolist(), p.rand(3).tolist()):
                assert u == u1[x]  # the same draw for the same row
        assert parts[0].shared_randint(0, 9, 2) == parts[1].shared_randint(0, 9, 2) == s1.shared_randint(0, 9, 2)


def test_step_weights():
    s = Step({"x": torch.arange(3)}, rows=torch.tensor([0, 2, 4]), global_size=5, world_size=2, seed=0)
    assert s.loss_weight == pytest.approx(3 * 2 / 5)


def test_add_column_is_computed_once_and_travels_with_its_rows():
    """A per-row value computed once (e.g. the frozen target's output on the clean image) reaches
    every later step beside the row it belongs to, whatever the shuffle; nothing is added to a
    streamed dataset."""
    calls = []

    def value(batch):
        calls.append(len(batch["x"]))
        return batch["x"].double() * 10 + batch["image"].float().mean(dim=(1, 2, 3)).double()

    data = EpochData(FakeDataset(23, order=torch.randperm(23, generator=torch.Generator().manual_seed(1))),
                     cache_mb=10, rank=0, world_size=1)
    assert data.add_column("ref", value, batch_size=5, device=CPU)
    assert sum(calls) == 23 and max(calls) == 5
    for seed in (0, 1):
        steps = list(data.steps(batch_size=4, device=CPU, shuffle=True, seed=seed))
        for s in steps:
            assert torch.equal(s["ref"], s["x"].double() * 10 + s["image"].float().mean(dim=(1, 2, 3)).double())
    assert sum(calls) == 23  # not recomputed per epoch
    assert data.add_column("ref", value, batch_size=5, device=CPU)  # a later user of shared data
    assert sum(calls) == 23  # keeps the column it finds
    streamed = EpochData(FakeDataset(23), cache_mb=0, rank=0, world_size=1)
    assert not streamed.add_column("ref", value, batch_size=5, device=CPU)
    assert "ref" not in next(iter(streamed.steps(batch_size=4, device=CPU, shuffle=False, seed=0))).data


def test_a_sequence_reads_each_dataset_once(monkeypatch):
    """Inside sharing_epoch_data (training.sequence_loop), every part asking for the same dataset
    gets the same EpochData, whose rows are read once; outside, each call is its own."""
    import ray.train

    from raydefense.pipeline.worker import epoch_data, sharing_epoch_data

    reads: list[str] = []

    def shard(name):
        reads.append(name)
        return FakeDataset(12)

    monkeypatch.setattr(ray.train, "get_dataset_shard", shard)
    with sharing_epoch_data():
        first = epoch_data("train", cache_mb=10, name="target")
        assert epoch_data("train", cache_mb=10, name="surrogate") is first
        assert epoch_data("val", cache_mb=10, name="val") is not first
        with sharing_epoch_data():  # nested: the same registry
            assert epoch_data("train", cache_mb=10, name="x") is first
    assert reads == ["train", "val"]
    assert epoch_data("train", cache_mb=10, name="target") is not first


class _Halve(torch.nn.Module):
    """A stand-in denoiser that counts the images it sees: x -> 0.6 x + 0.1."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return x * 0.6 + 0.1


def test_kt_inputs_are_denoised_once_per_row_as_8_bit_images():
    """classifiers.denoised_inputs: each training row's image through the frozen denoiser, clamped
    and rounded to 8 bits (what the Ray Data path wrote to Parquet), computed once per row for every
    epoch and for the next training of a sequence on the same data; a streamed dataset is denoised
    per step instead, to the same values."""
    from raydefense.pipeline.classifiers import denoised_inputs
    from raydefense.pipeline.runtime import images_to_tensor, tensor_to_images

    def expected(images):
        return torch.from_numpy(tensor_to_images(images_to_tensor(images) * 0.6 + 0.1))

    net = _Halve()
    data = EpochData(FakeDataset(23), cache_mb=10, rank=0, world_size=1)
    column, per_step = denoised_inputs(data, net, name="uddn", batch_size=5, device=CPU)
    assert column == "denoised:uddn" and per_step is None and net.seen == 23
    for seed in (0, 1):
        for s in data.steps(batch_size=4, device=CPU, shuffle=True, seed=seed):
            assert s[column].dtype == torch.uint8 and torch.equal(s[column], expected(s["image"]))
            assert not torch.equal(s[column], s["image"])
    assert denoised_inputs(data, net, name="uddn", batch_size=5, device=CPU)[0] == column  # the student
    assert net.seen == 23
    streamed = EpochData(FakeDataset(23), cache_mb=0, rank=0, world_size=1)
    column, per_step = denoised_inputs(streamed, net, name="uddn", batch_size=5, device=CPU)
    assert column == "image" and per_step is not None
    s = next(iter(streamed.steps(batch_size=4, device=CPU, shuffle=False, seed=0)))
    assert torch.equal(per_step(s["image"]), expected(s["image"]))


@pytest.mark.parametrize("cache_mb", [10, 1e-4, 0])  # cached, cache given up, streamed
def test_batches_come_to_host_memory_whatever_the_worker_device(cache_mb):
    """Ray's ``iter_torch_batches`` puts batches on a GPU worker's device by default ("auto");
    the cache (and the streamed rows each worker slices) must be host tensors, moved per step.
    On an H200 the default gave 'Expected all tensors to be on the same device' in the cache's
    sort (2026-12-04); tests/gpu runs the real thing."""
    ds = FakeDataset(30)
    data = EpochData(ds, cache_mb=cache_mb, rank=0, world_size=1)
    list(data.steps(batch_size=8, device=CPU, shuffle=True, seed=0))
    list(data.eval_batches(batch_size=8, device=CPU))
    assert ds.devices and set(ds.devices) == {"cpu"}
