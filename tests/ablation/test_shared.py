"""A run reading its shared stages from another run's folder (SharedStorage), locally and on S3."""
from __future__ import annotations

import pickle

import pytest

from raydefense.ablation.shared import SharedStorage, stage_outputs
from raydefense.errors import StorageError
from raydefense.pipeline.run import RunContext, RunLayout
from raydefense.storage import Storage


def make_base(base: Storage) -> None:
    """A base run as far as its files go: prepare, models, attack and gnr finished."""
    base.write_text(f"{RunLayout.CLEAN}/part-0.parquet", "clean")
    base.write_text(f"{RunLayout.CLEAN}/{RunLayout.DONE}", "")
    base.write_json(RunLayout.META, {"num_classes": 3})
    for name in ("target", "surrogate", "gnr_generator"):
        base.write_text(RunLayout.model_rel(name), name)
    base.write_text(f"{RunLayout.adv_rel('train')}/part-0.parquet", "adv")
    base.write_text(f"{RunLayout.GNR_AUG}/part-0.parquet", "aug")
    ctx = RunContext(cfg=None, storage=base)
    for stage in ("prepare", "models", "attack", "gnr"):
        ctx.mark_done(stage, duration_s=1.0)


def test_stage_outputs_list_what_each_stage_wrote(tmp_path):
    base = Storage.open(str(tmp_path / "s0-base"))
    make_base(base)
    assert stage_outputs(base, ("prepare", "models", "attack")) == [
        RunLayout.CLEAN, RunLayout.META, RunLayout.marker_rel("prepare"),
        RunLayout.model_rel("surrogate"), RunLayout.model_rel("target"), RunLayout.marker_rel("models"),
        RunLayout.ADV, RunLayout.marker_rel("attack")]
    assert stage_outputs(base, ("gnr",)) == [RunLayout.GNR_AUG, RunLayout.model_rel("gnr_generator"),
                                            RunLayout.marker_rel("gnr")]
    base.delete_file(RunLayout.marker_rel("gnr"))
    with pytest.raises(StorageError, match="stage 'gnr' of that run has not finished"):
        stage_outputs(base, ("gnr",))


def _exercise(root: Storage) -> None:
    base, own = root.child("s0-base"), root.child("s0-full")
    make_base(base)
    shared = {rel: base for rel in stage_outputs(base, ("prepare", "models", "attack", "gnr"))}
    st = SharedStorage(own, shared)
    ctx = RunContext(cfg=None, storage=st)
    # Shared stages are finished here, their outputs readable where the pipeline looks for them.
    assert all(ctx.is_done(s) for s in ("prepare", "models", "attack", "gnr")) and not ctx.is_done("denoise")
    assert st.read_json(RunLayout.META) == {"num_classes": 3}
    assert st.read_text(RunLayout.model_rel("target")) == "target"
    assert st.path(RunLayout.adv_rel("train")) == base.path(RunLayout.adv_rel("train"))  # what Ray Data reads
    assert ctx.layout.has_dataset(RunLayout.CLEAN)
    assert st.display(RunLayout.META) == base.display(RunLayout.META)
    # Its own files are its own; the folders list both.
    st.save_torch(RunLayout.model_rel("uddn"), {"w": 1})
    assert own.exists(RunLayout.model_rel("uddn")) and not base.exists(RunLayout.model_rel("uddn"))
    assert sorted(ctx.layout.model_names()) == ["gnr_generator", "surrogate", "target", "uddn"]
    ctx.mark_done("denoise", duration_s=2.0)
    assert own.exists(RunLayout.marker_rel("denoise")) and not base.exists(RunLayout.marker_rel("denoise"))
    assert st.path("train") == own.path("train")  # Ray Train checkpoints: the run's own
    # Nothing shared is written or deleted through the run that reads it.
    for act in (lambda: st.write_text(RunLayout.model_rel("target"), "x"),
                lambda: ctx.layout.write_dataset(RunLayout.GNR_AUG, None),
                lambda: st.delete_dir(RunLayout.adv_rel("train")),
                lambda: st.delete_file(RunLayout.marker_rel("attack")),
                lambda: ctx.mark_done("attack", duration_s=0.0)):
        with pytest.raises(StorageError, match="shared read-only"):
            act()
    assert base.read_text(RunLayout.model_rel("target")) == "target"
    assert base.exists(f"{RunLayout.GNR_AUG}/part-0.parquet")
    assert not own.exists("data")  # nothing was copied
    # Pickled into Ray tasks and workers with its table.
    again = pickle.loads(pickle.dumps(st))
    assert isinstance(again, SharedStorage) and again.read_text(RunLayout.model_rel("surrogate")) == "surrogate"
    assert again.path(RunLayout.CLEAN) == base.path(RunLayout.CLEAN)


def test_shared_storage_local(tmp_path):
    _exercise(Storage.open(str(tmp_path / "ablation")))


def test_shared_storage_s3(s3_server, s3_bucket):
    _exercise(Storage.open(f"s3://{s3_bucket}/ablation", endpoint_url=s3_server))


def test_shared_paths_must_be_run_relative(tmp_path):
    own, base = Storage.open(str(tmp_path / "a")), Storage.open(str(tmp_path / "b"))
    for bad in ("/abs", "data/../x", ""):
        with pytest.raises(ValueError, match="run-relative"):
            SharedStorage(own, {bad: base})
