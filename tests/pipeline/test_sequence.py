"""A stage's trainings in one Ray Train fit (training.sequence_task, run_trainings), without Ray:
which parts run, under which fit name, with which datasets, and what the console says. The fits
themselves run in tests/distributed/test_data_parallel.py and every pipeline test."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from raydefense.pipeline import training as T
from raydefense.storage import Storage


def _task(name: str, datasets: dict, epochs: int = 2) -> T.TrainingTask:
    return T.TrainingTask(name=name, loop=print, config={"storage": None}, datasets=datasets, epochs=epochs,
                          done=f"models/{name}.pt")


def test_parts_share_a_dataset_object_and_keep_their_own_under_their_own_name():
    clean, val, pairs = object(), object(), object()
    seq = T.sequence_task("a-b", [_task("a", {"train": clean, "val": val}), _task("b", {"train": pairs, "val": val})])
    assert seq.datasets == {"train": clean, "val": val, "b.train": pairs}
    assert [p["datasets"] for p in seq.config["parts"]] == [{}, {"train": "b.train"}]
    assert seq.parts == (("a", 2), ("b", 2)) and seq.epochs == 4 and seq.loop is T.sequence_loop


def test_a_dataset_object_is_shared_under_the_name_its_first_part_gave_it():
    """The UDDN, then the teacher and the student on their own training set: the student's
    'train' is the teacher's object, so it reads the teacher's rows (and their denoised column)."""
    pairs, kt, val_white, val = object(), object(), object(), object()
    seq = T.sequence_task("uddn-teacher-student", [_task("uddn", {"train": pairs, "val": val_white}),
                                                   _task("teacher", {"train": kt, "val": val}),
                                                   _task("student", {"train": kt, "val": val})])
    assert seq.name == "uddn-teacher-student"  # the fit's (checkpoint folder's) name, whatever the datasets
    assert seq.datasets == {"train": pairs, "val": val_white, "teacher.train": kt, "teacher.val": val}
    assert [p["datasets"] for p in seq.config["parts"]] == [
        {}, {"train": "teacher.train", "val": "teacher.val"}, {"train": "teacher.train", "val": "teacher.val"}]


@pytest.mark.parametrize("tasks, culprit", [
    ([], "no tasks"),
    ([_task("a", {}), _task("a", {})], "repeated"),
    ([T.TrainingTask(name="a", loop=print, config={"storage": None}, datasets={}, epochs=1)], "'done'"),
])
def test_bad_sequences_are_refused(tasks, culprit):
    with pytest.raises(ValueError, match=culprit):
        T.sequence_task("x", tasks)


def test_run_trainings_skips_finished_parts_under_a_name_that_does_not_change(tmp_path, monkeypatch):
    """The fit is named after every configured part, so a rerun after a stop finds the running
    part's checkpoints; finished parts are said to be skipped; the first part left prints its
    line before the fit, the others when their epochs start (announce)."""
    storage = Storage.open(str(tmp_path))
    lines: list[str] = []
    ctx = SimpleNamespace(storage=storage, echo=lines.append)
    calls = []

    def run_task(ctx, task, *, gpu, announce=None, conclude=None):
        calls.append((task.name, [p["name"] for p in task.config["parts"]], dict(announce or {})))
        return {"b": {"val_acc": 0.5}}

    monkeypatch.setattr(T, "run_task", run_task)
    tasks = [_task(n, {}) for n in ("a", "b", "c")]
    intro = {n: f"  {n}: training" for n in "abc"}
    storage.write_bytes("models/a.pt", b"x")
    out = T.run_trainings(ctx, tasks, gpu=False, intro=intro)
    assert calls == [("a-b-c", ["a", "b", "c"], {"c": "  c: training"})]
    assert lines == ["  a: already trained, skipping", "  b: training"]
    assert out == {"a": {}, "b": {"val_acc": 0.5}, "c": {}}
    for n in "bc":
        storage.write_bytes(f"models/{n}.pt", b"x")
    lines.clear()
    assert T.run_trainings(ctx, tasks, gpu=False, intro=intro) == {"a": {}, "b": {}, "c": {}}
    assert len(calls) == 1 and lines == [f"  {n}: already trained, skipping" for n in "abc"]


def test_run_stages_tells_each_stage_which_stages_this_call_runs_after_it(tmp_path, monkeypatch):
    """ctx.upcoming: the stages after the running one that this call will run (not those with
    a marker, none past --stop-after)."""
    from raydefense.pipeline import runner
    from raydefense.pipeline.run import RunContext

    seen = {}

    def stage(name):
        def fn(ctx, *, gpu):
            seen[name] = ctx.upcoming
            return {}
        return name, fn

    names = ("prepare", "models", "attack", "gnr", "denoise", "distill", "baselines", "robust", "evaluate")
    monkeypatch.setattr(runner, "_stages", lambda: [stage(n) for n in names])
    ctx = RunContext(cfg=None, storage=Storage.open(str(tmp_path)), echo=lambda _: None)
    ctx.mark_done("distill", duration_s=1.0)
    runner.run_stages(ctx, gpu=False, stop_after="robust")
    assert seen == {"prepare": ("models", "attack", "gnr", "denoise", "baselines", "robust"),
                    "models": ("attack", "gnr", "denoise", "baselines", "robust"),
                    "attack": ("gnr", "denoise", "baselines", "robust"), "gnr": ("denoise", "baselines", "robust"),
                    "denoise": ("baselines", "robust"), "baselines": ("robust",), "robust": ()}


@pytest.mark.parametrize("upcoming, distill_enabled, merged", [
    (("distill", "baselines", "evaluate"), True, True),   # a whole run: one fit for UDDN, teacher, student
    ((), True, False),                                     # --stop-after denoise
    (("distill", "evaluate"), False, False),               # distill.enabled: false
    (("baselines", "evaluate"), True, False),              # distill finished earlier
])
def test_denoise_stage_trains_the_teacher_and_student_in_its_fit_only_when_distill_runs_next(
        monkeypatch, upcoming, distill_enabled, merged):
    """run_denoise puts the KT trainings after the denoisers in its own fit exactly when this call
    runs the distill stage next; run_distill then reports their results without a fit of its own."""
    from raydefense.config import load_config
    from raydefense.pipeline import denoise, distill
    from raydefense.pipeline.run import RunContext

    cfg = load_config(overrides=[f"distill.enabled={'true' if distill_enabled else 'false'}", "denoise.baselines=[]"])
    lines: list[str] = []
    ctx = RunContext(cfg=cfg, storage=None, echo=lines.append)
    ctx.upcoming = upcoming
    fits = []

    def run_trainings(ctx, tasks, *, gpu, intro, conclude=None):
        fits.append([t.name for t in tasks])
        assert all(t.name in intro for t in tasks)
        return {t.name: {"epoch": 0, "val_acc": 0.9} for t in tasks}

    monkeypatch.setattr(T, "run_trainings", run_trainings)
    monkeypatch.setattr(denoise, "denoiser_datasets", lambda ctx: {"train": object(), "val": object()})
    kt_sets = {"train": object(), "val": object()}
    monkeypatch.setattr(distill, "kt_trainings", lambda ctx: (
        [distill.teacher_args(cfg, num_classes=3, denoise_inputs="uddn"),
         distill.student_args(cfg, num_classes=3, denoise_inputs="uddn")], kt_sets))
    monkeypatch.setattr(RunContext, "layout", property(lambda self: SimpleNamespace(num_classes=lambda: 3)))
    out = denoise.run_denoise(ctx, gpu=False)
    assert fits == [["uddn", "teacher", "student"] if merged else ["uddn"]]
    assert list(out) == ["uddn"]
    if not distill_enabled:
        return
    ctx.upcoming = upcoming[1:]
    kt = distill.run_distill(ctx, gpu=False)
    assert kt["teacher"] == kt["student"] == {"epoch": 0, "val_acc": 0.9}
    assert fits[1:] == ([] if merged else [["teacher", "student"]])
    assert (kt.get("trained_in_stage") == "denoise") is merged and "distill" not in ctx.handover


def test_epoch_log_gives_each_part_its_lines_and_tensorboard_folder(tmp_path):
    """One fit's records, tagged with their part, print under the part's name (epoch/total of
    that part), between the part's announce and conclude lines, and land in
    tensorboard/<part>/ with tags <part>/<metric>."""
    import json

    from raydefense.config import load_config
    from tests.conftest import REPO

    storage = Storage.open(str(tmp_path / "run"))
    lines: list[str] = []
    ctx = SimpleNamespace(cfg=load_config(f"{REPO}/configs/smoke.yaml"), storage=storage, echo=lines.append)
    with T.EpochLog(ctx, "a-b", epochs=3, parts=[("a", 2), ("b", 1)], announce={"b": "  b: starts"},
                    conclude=lambda name, rec: f"  {name}: done at {rec['val_acc']}") as log:
        with open(log.path, "a") as f:
            for task, epoch, acc in (("a", 0, 0.25), ("a", 1, 0.5), ("b", 0, 0.75)):
                f.write(json.dumps({"task": task, "epoch": epoch, "train_loss": 1.0, "val_acc": acc, "epoch_s": 0.1}) + "\n")
        log.poll()
    assert [line.split("  train_loss")[0] for line in lines] == [
        "  a: epoch 1/2", "  a: epoch 2/2", "  a: done at 0.5", "  b: starts", "  b: epoch 1/1", "  b: done at 0.75"]
    assert log.last["a"]["val_acc"] == 0.5 and "task" not in log.last["a"]
    for part, n in (("a", 2), ("b", 1)):
        (events,) = (tmp_path / "run" / "tensorboard" / part).iterdir()
        assert [step for tag, step in _scalars(events.read_bytes()) if tag == f"{part}/val_acc"] == list(range(n))


def _scalars(data: bytes) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in a TensorBoard event file (TFRecord framing: length, its
    CRC, the Event proto, its CRC), read with tensorboardX's own protos."""
    import struct

    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        out += [(v.tag, event.step) for v in event.summary.value]
        i += 12 + n + 4
    return out


def test_a_checkpoint_state_is_a_copy_the_loop_cannot_change_while_it_is_written(monkeypatch):
    """The checkpoint is written in Ray Train's upload thread while the loop trains on (training._report):
    its state must not follow the live parameters, optimizer moments or history."""
    import torch
    from torch import nn

    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    history = [{"epoch": 0}]
    monkeypatch.setattr(T, "_PART", "teacher")
    state = T.checkpoint_state(0, {"model": model, "optimizer": opt}, config={"k": 1}, extra={"history": history})
    weight = model.weight.detach().clone()
    moment = opt.state[model.weight]["exp_avg"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    history.append({"epoch": 1})
    assert torch.equal(state["model"]["weight"], weight)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], moment)
    assert state["extra"]["history"] == [{"epoch": 0}] and state["part"] == "teacher" and state["epoch"] == 0
    # What restore() reads back: the part's own file name, so a later part skips it.
    assert T._state_file() == "state.teacher.pt"
    monkeypatch.setattr(T, "_PART", None)
    assert T._state_file() == "state.pt"
