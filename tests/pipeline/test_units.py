"""The pipeline's pure parts, without starting Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydefense.config import load_config
from raydefense.errors import ConfigError, DataError
from raydefense.pipeline.attack import attack_plan, per_image_eps
from raydefense.pipeline.run import open_run
from raydefense.pipeline.runtime import (find_user_error, images_to_tensor, pool_actors, pool_batch_size,
                                         tensor_to_images)
from raydefense.pipeline.training import HEALTH_CHECK_INTERVAL_ENV, make_trainer, scaling_config
from raydefense.storage import Storage
from tests.conftest import REPO


def test_scaling_config_fixed_and_elastic():
    fixed = scaling_config(load_config(overrides=["scale.num_workers=2"]), gpu=False)
    assert fixed.num_workers == 2 and fixed.resources_per_worker == {"CPU": 2.0}
    elastic = scaling_config(load_config(overrides=["scale.num_workers=2", "scale.max_workers=6",
                                                    "scale.gpus_per_worker=1"]), gpu=True)
    assert elastic.num_workers == (2, 6) and elastic.use_gpu and elastic.resources_per_worker["GPU"] == 1.0


def test_the_trainer_carries_the_health_check_interval_to_ray_train(tmp_path, monkeypatch):
    """Each ray.train.report waits for the controller's next poll: the interval must reach Ray
    Train V2 through the driver's environment, which Ray passes on to controller and workers."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv(HEALTH_CHECK_INTERVAL_ENV, raising=False)
    cfg = load_config(overrides=["scale.health_check_interval_s=0.3"])
    make_trainer(cfg, Storage.open(str(tmp_path)), "t", lambda c: None, {}, {}, gpu=False)
    assert get_env_vars_to_propagate()[HEALTH_CHECK_INTERVAL_ENV] == "0.3"
    with pytest.raises(ConfigError, match="scale.health_check_interval_s"):
        load_config(overrides=["scale.health_check_interval_s=0"])


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


def test_gpu_pools_have_one_actor_per_gpu_at_most_attack_actors():
    two = load_config(overrides=["scale.attack_actors=2"])
    assert pool_actors(two, gpu=False) == 2
    assert pool_actors(two, gpu=True, gpus=1.0) == 1  # the CPU default on a one-GPU machine
    assert pool_actors(two, gpu=True, gpus=8.0) == 2
    assert pool_actors(two, gpu=True, gpus=0.5) == 1  # never an empty pool
    assert pool_actors(load_config(overrides=["scale.attack_actors=4"]), gpu=True, gpus=3.0) == 3
    # The batch split follows the pool that runs: one GPU actor keeps whole batches.
    assert pool_batch_size(48, cfg=two, batch_size=64, batches_per_actor=4, actors=1) == 48


def test_pool_batch_size_gives_every_actor_rows_and_never_exceeds_the_batch():
    cfg = load_config(f"{REPO}/configs/default.yaml")
    two = cfg.replace(["scale.attack_actors=2"])
    # The default's whole-model attacks: 24 images x 2 test methods at eval.batch_size 64.
    assert pool_batch_size(48, cfg=two, batch_size=64) == 24
    assert pool_batch_size(49, cfg=two, batch_size=64) == 25  # 25 + 24: still two batches
    assert pool_batch_size(1000, cfg=two, batch_size=64) == 64
    assert pool_batch_size(48, cfg=cfg.replace(["scale.attack_actors=1"]), batch_size=64) == 48
    assert pool_batch_size(0, cfg=two, batch_size=64) == 1
    assert pool_batch_size(3, cfg=cfg.replace(["scale.attack_actors=4"]), batch_size=64) == 1
    # Several batches per actor, to balance rows of unequal cost.
    assert pool_batch_size(48, cfg=two, batch_size=64, batches_per_actor=4) == 6
    assert pool_batch_size(4800, cfg=two, batch_size=64, batches_per_actor=4) == 64
    # One actor: nothing to balance, whole batches.
    assert pool_batch_size(48, cfg=cfg.replace(["scale.attack_actors=1"]), batch_size=64, batches_per_actor=4) == 48


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


def test_a_worker_group_that_keeps_failing_is_one_line():
    """Retries exhausted (scale.max_failures): one line naming the task, the cause and the
    way out, instead of Ray's long WorkerGroupError traceback."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from raydefense.errors import TrainingError
    from raydefense.pipeline.training import _raise_training_error

    ctx = SimpleNamespace(cfg=load_config(overrides=["scale.max_failures=2"]))
    died = ActorDiedError()
    exc = WorkerGroupError("worker 1 died\n  Traceback ...\n  (many lines)", {1: died})
    with pytest.raises(TrainingError) as info:
        _raise_training_error(ctx, "teacher", exc)
    msg = str(info.value)
    assert "\n" not in msg and "training 'teacher'" in msg and "2 automatic restarts" in msg
    assert "ActorDiedError" in msg and "same --name to resume" in msg
    assert info.value.__cause__ is exc and info.value.exit_code == 1
    # A user error inside a worker stays itself; anything else is not rewritten.
    inner = DataError("image '/d/x.png' cannot be decoded")
    with pytest.raises(DataError):
        _raise_training_error(ctx, "target", WorkerGroupError("w0", {0: inner}))
    with pytest.raises(KeyError):
        _raise_training_error(ctx, "target", KeyError("bug"))


def test_a_stale_ray_address_file_is_no_cluster(tmp_path, monkeypatch):
    """A `ray start` cluster killed without `ray stop` leaves its address file: the job must
    then start its own Ray instead of trying to join a dead address."""
    import socket

    import ray._common.utils as ray_utils

    from raydefense.pipeline.runtime import _running_local_cluster

    path = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(ray_utils, "get_ray_address_file", lambda temp_dir: str(path))
    assert not _running_local_cluster()  # no file
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        path.write_text(f"127.0.0.1:{port}")
        assert _running_local_cluster()  # a live GCS port
    path.write_text(f"127.0.0.1:{port}")
    assert not _running_local_cluster()  # the same address, nobody listening
    path.write_text("garbage")
    assert not _running_local_cluster()


def test_attack_actor_runs_each_model_and_method_once_over_every_split_of_a_batch(monkeypatch):
    """A batch that crosses split boundaries: one attack call per (model, method) over all the rows
    that need it (not one per split's share), and every row still gets its own set, eps and
    attack, in the plan's order."""
    from raydefense import attacks
    from raydefense.models import create_model
    from raydefense.pipeline import attack as attack_stage

    calls: list[tuple[str, int, int]] = []  # (method, rows, id of the attacked model)
    real = attacks.create_attack

    def recording(method, model, **kw):
        attack = real(method, model, **kw)
        inner = attack.__call__

        class Recorded(type(attack)):
            def __call__(self, x, y):
                calls.append((method, len(x), id(model)))
                return inner(x, y)
        attack.__class__ = Recorded
        return attack

    monkeypatch.setattr(attacks, "create_attack", recording)
    torch.manual_seed(0)
    target, surrogate = create_model("small_cnn", num_classes=3).eval(), create_model("small_cnn", num_classes=3).eval()
    actor = attack_stage.AttackActor.__new__(attack_stage.AttackActor)  # without loading artifacts
    actor.device, actor.seed, actor.lo, actor.hi = torch.device("cpu"), 1, 4 / 255, 8 / 255
    actor.models = {"target": target, "surrogate": surrogate}
    actor.plan = {"gnr": [("train", "target", ["fgsm", "ifgsm2"])],
                  "test": [("test_white", "target", ["fgsm"]), ("test_black", "surrogate", ["fgsm"])]}
    rng = np.random.default_rng(0)
    split = np.array(["gnr"] * 6 + ["test"] * 4)
    batch = {"image": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), "label": np.arange(10) % 3,
             "index": np.arange(50, 60), "split": split}
    out = actor(batch)

    assert sorted((m, n, mid == id(target)) for m, n, mid in calls) == [
        ("fgsm", 4, False), ("fgsm", 10, True), ("ifgsm2", 6, True)]
    expected = [("train", "fgsm", 6), ("train", "ifgsm2", 6), ("test_white", "fgsm", 4), ("test_black", "fgsm", 4)]
    start = 0
    for set_name, method, n in expected:
        rows = slice(start, start + n)
        src = np.flatnonzero(split == ("gnr" if set_name == "train" else "test"))
        assert list(out["set"][rows]) == [set_name] * n and list(out["method"][rows]) == [method] * n
        assert np.array_equal(out["index"][rows], batch["index"][src])
        assert np.array_equal(out["clean"][rows], batch["image"][src])
        assert np.array_equal(out["eps"][rows], per_image_eps(batch["index"][src], method, seed=1, lo=4 / 255, hi=8 / 255))
        diff = np.abs(out["adv"][rows].astype(int) - out["clean"][rows].astype(int)).max(axis=(1, 2, 3))
        assert np.all(diff <= np.ceil(out["eps"][rows] * 255) + 1) and diff.max() > 0
        start += n
    assert start == len(out["set"])
    # The merged call attacks the test rows exactly as a batch of the test split alone does.
    alone = actor({k: v[6:] for k, v in batch.items()})
    white = out["set"] == "test_white"
    assert np.array_equal(alone["adv"][alone["set"] == "test_white"], out["adv"][white]) or \
        np.mean(alone["adv"][alone["set"] == "test_white"] != out["adv"][white]) < 1e-3


def test_amp_follows_the_config_and_by_default_the_cpus_native_bf16(monkeypatch):
    """scale.amp true/false is obeyed; null (the default) is on exactly when the CPU has
    AVX512-BF16 or AMX (torch.cpu's probes, patched here both ways), and off on a GPU."""
    import torch

    from raydefense.pipeline.worker import amp_enabled, native_bf16

    cfg = load_config()
    cpu = torch.device("cpu")
    assert cfg.scale.amp is None
    assert amp_enabled(cfg.replace(["scale.amp=true"]), cpu) is True
    assert amp_enabled(cfg.replace(["scale.amp=false"]), cpu) is False
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16(cpu) is (avx512_bf16 or amx)
        assert amp_enabled(cfg, cpu) is (avx512_bf16 or amx)
    # Not on a GPU unless asked for (slower there at these sizes); the device is not touched.
    assert amp_enabled(cfg, torch.device("cuda")) is False
    assert amp_enabled(cfg.replace(["scale.amp=true"]), torch.device("cuda")) is True
    # A torch without the private probes reads as "no native bf16", not an error.
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_bf16(cpu) is False and amp_enabled(cfg, cpu) is False


def test_cpu_autocast_runs_training_convolutions_in_bf16_only_when_amp_is_on():
    """What scale.amp switches on CPU: a convolution under the loops' autocast gives bf16 with
    amp on and fp32 with it off, and the loss it feeds backpropagates fp32 gradients into fp32
    weights (the optimizer never sees bf16)."""
    import torch

    from raydefense.pipeline.worker import autocast

    cfg = load_config()
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    for amp, dtype in (("true", torch.bfloat16), ("false", torch.float32)):
        conv.zero_grad()
        with autocast(cfg.replace([f"scale.amp={amp}"]), torch.device("cpu")):
            out = conv(x)
            loss = out.float().square().mean()
        assert out.dtype == dtype
        loss.backward()
        assert conv.weight.dtype == conv.weight.grad.dtype == torch.float32


def test_map_compute_is_tasks_on_cpu_and_actors_on_gpu_unless_set():
    from raydefense.pipeline.runtime import map_compute

    cfg = load_config()
    assert cfg.scale.map_compute == "auto"
    assert map_compute(cfg, gpu=False) == "tasks"
    assert map_compute(cfg, gpu=True) == "actors"
    for forced in ("tasks", "actors"):
        forced_cfg = cfg.replace([f"scale.map_compute={forced}"])
        assert map_compute(forced_cfg, gpu=False) == forced == map_compute(forced_cfg, gpu=True)


def test_a_gpu_map_task_given_another_gpu_than_its_process_uses_is_refused(monkeypatch):
    """A reused task process keeps the CUDA devices it first saw; a later task that Ray gave
    another GPU is refused with one line instead of running on the wrong device."""
    from raydefense.errors import ConfigError
    from raydefense.pipeline import runtime

    class Echo:
        def __init__(self, **kwargs):
            pass

        def __call__(self, batch):
            return batch

    monkeypatch.setattr(runtime, "_CUDA_DEVICES", None)
    monkeypatch.setattr(runtime, "_INSTANCES", type(runtime._INSTANCES)())
    call = dict(key="k", cls=Echo, kwargs={}, gpu=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert runtime._call_instance({"x": 1}, **call) == {"x": 1}
    assert runtime._call_instance({"x": 2}, **call) == {"x": 2}  # the same GPU again: fine
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ConfigError, match="GPU '0', but its CUDA context is on GPU '1'.*scale.map_compute=actors"):
        runtime._call_instance({"x": 3}, **call)
    assert runtime._call_instance({"x": 4}, **{**call, "gpu": False}) == {"x": 4}  # CPU tasks: no device


def test_gpu_task_pools_are_refused_on_a_live_node_with_several_gpus():
    from raydefense.errors import ConfigError
    from raydefense.pipeline.runtime import _refuse_multi_gpu_nodes

    one_each = [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i}", "Resources": {"CPU": 8.0, "GPU": 1.0}}
                for i in range(3)]
    _refuse_multi_gpu_nodes(one_each)
    _refuse_multi_gpu_nodes(one_each + [{"Alive": False, "NodeManagerAddress": "10.0.0.9",
                                         "Resources": {"GPU": 4.0}}])  # a dead node does not count
    with pytest.raises(ConfigError, match=r"node 10\.0\.0\.7 has 2 GPUs.*scale\.map_compute=actors"):
        _refuse_multi_gpu_nodes(one_each + [{"Alive": True, "NodeManagerAddress": "10.0.0.7",
                                             "Resources": {"GPU": 2.0}}])


def test_an_idle_gpu_instance_is_freed_and_one_in_use_is_not(monkeypatch):
    """A GPU task process outlives its stage; the execution's instance (its models on the device)
    is dropped once no batch has used it for GPU_IDLE_RELEASE_S, never while a batch runs."""
    import time as _time

    from raydefense.pipeline import runtime

    monkeypatch.setattr(runtime, "_CUDA_DEVICES", None)
    monkeypatch.setattr(runtime, "_INSTANCES", type(runtime._INSTANCES)())
    monkeypatch.setattr(runtime, "_GPU_IN_USE", {})
    monkeypatch.setattr(runtime, "_GPU_LAST_USE", {})
    monkeypatch.setattr(runtime, "GPU_IDLE_RELEASE_S", 0.2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    seen_during_call = []

    class Probe:
        built = 0

        def __init__(self, **kwargs):
            Probe.built += 1

        def __call__(self, batch):
            if batch.get("slow"):
                _time.sleep(0.6)  # longer than the idle time: must not be dropped meanwhile
                seen_during_call.append(runtime._release_idle_gpu_instances())
            return batch

    runtime._call_instance({}, key="gpu", cls=Probe, kwargs={}, gpu=True)  # its last use: now
    runtime._call_instance({"slow": True}, key="gpu", cls=Probe, kwargs={}, gpu=True)
    assert seen_during_call == [[]] and "gpu" in runtime._INSTANCES and Probe.built == 1
    runtime._call_instance({}, key="cpu", cls=Probe, kwargs={})  # a CPU execution: never released
    deadline = _time.time() + 10
    while "gpu" in runtime._INSTANCES and _time.time() < deadline:
        _time.sleep(0.05)  # the releaser thread
    assert "gpu" not in runtime._INSTANCES and "cpu" in runtime._INSTANCES
    assert runtime._GPU_LAST_USE == {} and runtime._GPU_IN_USE == {}
    runtime._call_instance({}, key="gpu2", cls=Probe, kwargs={}, gpu=True)
    assert Probe.built == 3 and runtime._release_idle_gpu_instances(now=_time.monotonic() + 1) == ["gpu2"]
