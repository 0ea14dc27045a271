"""RunLayout: where a run's files live (pure pyarrow here; the Ray reads run in the pipeline tests)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydefense.pipeline.run import RunLayout
from raydefense.storage import Storage


def _shard(st: Storage, rel: str, rows: dict) -> None:
    st.fs.create_dir(st.path(rel).rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table(rows), st.path(rel), filesystem=st.fs)


def test_paths_are_the_documented_ones():
    assert RunLayout.model_rel("uddn") == "models/uddn.pt"
    assert RunLayout.marker_rel("attack") == "stages/attack.json"
    assert RunLayout.adv_rel("test_white") == "data/adv/set=test_white"
    assert RunLayout.adv_rel("gnr_aug") == RunLayout.GNR_AUG == "data/gnr_aug"
    assert RunLayout.report_rel("a.png") == "report/a.png"
    assert (RunLayout.CONFIG, RunLayout.META, RunLayout.METRICS) == ("config.yaml", "data/meta.json",
                                                                     "report/metrics.json")


def test_models_meta_and_small_reads(tmp_path):
    st = Storage.open(str(tmp_path))
    layout = RunLayout(st)
    assert not layout.has_model("target") and layout.model_names() == []
    st.write_bytes("models/target.pt", b"x")
    st.write_bytes("models/notes.txt", b"x")
    assert layout.has_model("target") and layout.model_names() == ["target"]
    st.write_json(RunLayout.META, {"num_classes": 7})
    assert layout.num_classes() == 7
    _shard(st, "data/clean/part-0.parquet", {"split": ["test", "val", "test"], "label": [1, 2, 3]})
    st.write_text("data/clean/_SUCCESS", "")  # the marker is not a shard
    assert layout.count_rows(RunLayout.CLEAN) == 3
    _shard(st, "data/clean/part-1.parquet", {"split": ["denoise", "test"], "label": [4, 5]})
    assert layout.count_clean("test") == 3 and layout.count_clean(["val", "denoise"]) == 2
    assert layout.count_clean("gnr") == 0
    table = layout.table(RunLayout.CLEAN, columns=["label"], filter=pc.field("split") == "test")
    assert sorted(table.column("label").to_pylist()) == [1, 3, 5]
    assert layout.table(RunLayout.CLEAN, head=1).num_rows == 1


def test_a_dataset_is_complete_only_with_its_marker(tmp_path):
    st = Storage.open(str(tmp_path))
    layout = RunLayout(st)
    _shard(st, "data/gnr_aug/part-0.parquet", {"label": [0]})
    assert not layout.has_dataset(RunLayout.GNR_AUG)  # shards without the marker: interrupted
    st.write_text("data/gnr_aug/_SUCCESS", "")
    assert layout.has_dataset(RunLayout.GNR_AUG)


def test_reads_use_ray_datas_v1_parquet_reader(tmp_path, monkeypatch):
    """RunLayout.read sets the DataContext before read_parquet chooses its reader: V1 (no
    footer-reader actor pool per read) and rows in order, also in a process where init_ray did
    not run. read_parquet is replaced by a probe, so no Ray starts here."""
    import ray

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.setattr(ctx.execution_options, "preserve_order", False)
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    seen = {}

    class Made:  # what read_parquet returns: a Dataset holding a copy of the current context
        def __init__(self, context):
            self.context = context

    def probe(path, **kwargs):
        current = ray.data.DataContext.get_current()
        seen.update(path=path, v2=current.use_datasource_v2, ordered=current.execution_options.preserve_order,
                    bars=current.enable_progress_bars)
        return Made(current.copy())

    monkeypatch.setattr(ray.data, "read_parquet", probe)
    st = Storage.open(str(tmp_path))
    ds = RunLayout(st).read(RunLayout.CLEAN)
    # The footer-sampling bar V1 shows inside read_parquet is off; the dataset's execution and
    # the process's later datasets keep their progress bars.
    assert seen == {"path": st.path(RunLayout.CLEAN), "v2": False, "ordered": True, "bars": False}
    assert ds.context.enable_progress_bars is True and ctx.enable_progress_bars is True


def test_configure_data_context_on_a_fresh_context():
    import ray

    from raydefense.pipeline.runtime import configure_data_context

    fresh = ray.data.DataContext()
    assert fresh.use_datasource_v2  # Ray 2.60's default, which this project turns off
    configure_data_context(fresh)
    assert fresh.use_datasource_v2 is False and fresh.execution_options.preserve_order is True

