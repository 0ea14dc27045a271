"""The benchmark suite's helpers (bench/rdbench): statistics, interleaving, the table and JSON,
and the CPU sections that need no Ray, on tiny models (the full suite is `python bench/run.py`)."""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from bench.rdbench import attacks as bench_attacks
from bench.rdbench import cli, default_run, gpu, ray_stages, results, stats, throughput


# ----------------------------------------------------------------------------- statistics


def test_summarize_median_min_max():
    s = stats.summarize([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    assert stats.summarize([1, 2, 3, 10]).median == 2.5
    with pytest.raises(ValueError, match="no values"):
        stats.summarize([])
    with pytest.raises(ValueError, match="NaN"):
        stats.summarize([1.0, float("nan")])


def test_round_order_alternates():
    assert stats.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert stats.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert stats.round_order(["a", "b"], 2) == ["a", "b"]


def test_interleave_runs_contenders_alternately_and_drops_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = stats.interleave(fns, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # never all a then all b
    assert set(out) == {"a", "b"} and all(len(v) == 3 for v in out.values())
    assert all(t >= 0 for v in out.values() for t in v)
    seen = iter(range(100))
    measured = stats.interleave(fns, rounds=2, warmup=0, measure=lambda name, fn: float(next(seen)))
    assert measured == {"a": [0.0, 3.0], "b": [1.0, 2.0]}
    with pytest.raises(ValueError):
        stats.interleave(fns, rounds=0)


def test_paired_ratios():
    assert stats.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="against"):
        stats.paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not positive"):
        stats.paired_ratios([1.0], [0.0])


# ----------------------------------------------------------------------------- table and JSON


def _sections():
    s = results.Section("1", "demo")
    s.rows.append(results.Row.of("absolute", [10.0, 12.0, 11.0], "img/s"))
    s.rows.append(results.Row.of("a ratio", [1.1, 0.9, 1.0], "x", ratio=True, pair="a/b"))
    skipped = results.Section("6", "gpu", skipped="no CUDA device")
    failed = results.Section("2", "ray", error="RuntimeError: boom")
    return [s, skipped, failed]


def test_format_table_puts_ratios_first_and_says_why_skipped():
    text = results.format_table(_sections())
    lines = text.splitlines()
    assert lines[0].startswith("1. demo")
    assert "a ratio" in lines[1] and "1x  [0.9, 1.1]  (n=3)" in lines[1]
    assert "absolute" in lines[2] and "11 img/s  [10, 12]" in lines[2]
    assert "skipped: no CUDA device" in text and "FAILED: RuntimeError: boom" in text


def test_results_path_and_json_writer(tmp_path):
    import datetime as dt

    when = dt.datetime(2026, 12, 2, 13, 0, tzinfo=dt.timezone.utc)
    assert results.results_path("r", host="vm", when=when, quick=False) == os.path.join("r", "vm-2026-12-02.json")
    assert results.results_path("r", host="a b/c", when=when, quick=True) == os.path.join("r", "a_b_c-2026-12-02-quick.json")
    path = str(tmp_path / "out" / "vm.json")
    results.write_json(path, sections=_sections(), machine={"host": "vm"}, args={"quick": True}, started=when, seconds=1.23)
    doc = json.loads(open(path).read())
    assert os.listdir(tmp_path / "out") == ["vm.json"]  # no temporary file left
    assert doc["started_utc"] == "2026-12-02T13:00:00Z" and doc["machine"] == {"host": "vm"}
    row = doc["sections"]["1"]["rows"][1]
    assert row == {"name": "a ratio", "unit": "x", "ratio": True, "median": 1.0, "min": 0.9, "max": 1.1, "n": 3,
                   "detail": {"pair": "a/b"}}
    assert doc["sections"]["6"]["skipped"] == "no CUDA device" and doc["sections"]["2"]["error"] == "RuntimeError: boom"


# ----------------------------------------------------------------------------- section 1


def _fake_torchattacks():
    """Stand-ins with torchattacks' class names and signatures, built on our attacks, which
    (like torchattacks) differentiate the model as given."""
    from raydefense.attacks import APGD, FGSM, IFGSM, PGD

    def as_given(attack):
        attack.fold_batch_norm = False
        return attack

    return types.SimpleNamespace(
        FGSM=lambda model, eps: as_given(FGSM(model, eps=eps)),
        BIM=lambda model, eps, alpha, steps: as_given(IFGSM(model, eps=eps, alpha=alpha, steps=steps)),
        PGD=lambda model, eps, alpha, steps, random_start: as_given(PGD(model, eps=eps, alpha=alpha, steps=steps,
                                                                        random_start=random_start)),
        APGD=lambda model, eps, norm, steps, n_restarts, loss, rho: as_given(APGD(model, eps=eps, steps=steps,
                                                                                  restarts=n_restarts, loss=loss, rho=rho)),
    )


def test_attack_section_on_a_tiny_model():
    section = results.Section("1", "attacks")
    bench_attacks.run_attacks(section, sizes=[32], batch=4, rounds=2, warmup=0, apgd_steps=3, model_name="small_cnn",
                              num_classes=4, theirs=_fake_torchattacks(), log=lambda _: None)
    ratios = [r for r in section.rows if r.ratio]
    assert len(ratios) == 4 + 6 and len(section.rows) == 12 + 6
    assert all(r.summary.n == 2 and r.summary.min > 0 for r in section.rows)
    fgsm = ratios[0].detail["check"]
    # Ours folds the model's BatchNorms, the stand-in does not: the same images to float rounding.
    assert fgsm["pixels_agree"] >= 0.99 and fgsm["linf_ours"] <= bench_attacks.EPS + 1e-6
    assert [r.name.split(": ")[1] for r in ratios[-6:]] == [
        "ours (BatchNorms folded) / ours on the model as given", "ours / torchattacks, both on the inference form",
        "ours on the model as built / on its inference form (folding at each call)"] * 2
    assert all(r.detail["check"]["pixels_agree"] >= 0.99 for r in ratios[-6:])


def test_check_pair_refuses_outputs_outside_the_ball():
    x = torch.full((1, 3, 4, 4), 0.5)
    ok = x + bench_attacks.EPS
    assert bench_attacks.check_pair(ok, ok, x, eps=bench_attacks.EPS, deterministic=True)["pixels_agree"] == 1.0
    with pytest.raises(ValueError, match="theirs"):
        bench_attacks.check_pair(ok, x + 2 * bench_attacks.EPS, x, eps=bench_attacks.EPS, deterministic=False)


def test_missing_torchattacks_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import now raises ImportError
    module, why = bench_attacks.load_torchattacks()
    assert module is None and "pip install --no-deps torchattacks" in why


# ----------------------------------------------------------------------------- sections 3 and 4 without Ray


def _tiny_config():
    from raydefense.config import load_config

    return load_config(None, ["models.target=small_cnn", "data.image_size=32", "denoise.widths=[4,4,8,8,8]",
                              "denoise.batch_size=4", "gnr.widths=[8,8,8]", "gnr.critic_widths=[4,4,8,8]",
                              "gnr.batch_size=4", "gnr.n_critic=2", "eval.batch_size=8", "scale.cpus_per_worker=1"])


def test_throughput_section_on_a_tiny_config():
    section = results.Section("4", "throughput")
    throughput.run_throughput(section, _tiny_config(), num_classes=3, steps=1, rounds=2, warmup=0, log=lambda _: None)
    names = [r.name for r in section.rows]
    assert names[0].startswith("eval: UDDN + target / target alone") and section.rows[0].ratio
    assert any(n.startswith("UDDN training") for n in names) and any(n.startswith("GNR training") for n in names)
    assert any(n.startswith("UDDN training: eq. 5 reference") and r.ratio for n, r in zip(names, section.rows))
    assert all(r.summary.median > 0 for r in section.rows)


def test_checkpoint_rows_on_a_tiny_config(tmp_path):
    """Section 3's checkpoint rows: the three ways run, the ratios are ratios, nothing is left behind."""
    section = results.Section("3", "train")
    ray_stages.run_checkpoint(section, _tiny_config(), rounds=2, steps=1, warmup=0, root=str(tmp_path),
                              log=lambda _: None)
    names = [r.name for r in section.rows]
    assert names[0].startswith("checkpoint + steps: Ray's synchronous save / in the background") and section.rows[0].ratio
    assert names[1].startswith("checkpoint + steps in the background / the steps alone") and section.rows[1].ratio
    assert [n.rsplit(", ", 2)[-2] for n in names[2:]] == ["Ray's synchronous save", "in the background", "no checkpoint"]
    assert all(r.summary.median > 0 and r.summary.n == 2 for r in section.rows)
    assert list(tmp_path.iterdir()) == []


def test_save_state_writes_a_torch_file_in_a_new_folder(tmp_path):
    import pyarrow.fs as pafs

    from raydefense.pipeline.training import save_state

    state = {"epoch": 3, "model": {"w": torch.arange(6.0)}}
    path = f"{tmp_path}/checkpoint_x/state.pt"
    save_state(state, pafs.LocalFileSystem(), path)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(6.0))


def test_plain_classifier_loop_and_image_column():
    import pyarrow as pa

    from raydefense.config import TrainConfig
    from raydefense.pipeline.loop_args import ClassifierArgs

    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    nested = pa.array(images.tolist())  # list<list<list<uint8>>>
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 32 * 32 * 3)
    native = pa.FixedShapeTensorArray.from_numpy_ndarray(images)  # an extension type, as Ray's tensor columns
    for column in (nested, pa.chunked_array([flat[:5], flat[5:]]), native):
        assert np.array_equal(ray_stages.image_array(column, 32), images)
    cfg = _tiny_config()
    args = ClassifierArgs(task="t", arch="small_cnn", num_classes=3, artifact="t",
                          train=TrainConfig(epochs=2, batch_size=4))
    data = {"image": torch.from_numpy(images), "label": torch.arange(12) % 3}
    seconds, losses = ray_stages.plain_classifier_epochs(cfg, args, data, data)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert len(losses) == 2 and all(np.isfinite(losses))
    # The plain loop trains in the precision the Ray Train worker would (scale.amp): forced bf16
    # autocast and forced fp32 round differently, from the first step on.
    from raydefense.config import load_config

    base = ["models.target=small_cnn", "data.image_size=32", "scale.cpus_per_worker=1"]
    by_amp = {amp: ray_stages.plain_classifier_epochs(load_config(None, base + [f"scale.amp={amp}"]), args, data, data)[1]
              for amp in ("true", "false")}
    assert by_amp["false"] == ray_stages.plain_classifier_epochs(load_config(None, base + ["scale.amp=false"]), args,
                                                                 data, data)[1]
    assert by_amp["true"] != by_amp["false"]


def test_plain_attack_pass_reads_attacks_and_writes_parquet(tmp_path):
    """Section 2's plain loop on a clean Parquet written here (the layout's columns), small_cnn target."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydefense.models import create_model
    from raydefense.pipeline.artifacts import save_artifact
    from raydefense.pipeline.run import RunContext, RunLayout
    from raydefense.storage import Storage

    cfg = _tiny_config()
    storage = Storage.open(str(tmp_path))
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    table = pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 32 * 32 * 3),
                      "label": pa.array([0, 1, 2, 0, 1, 2], pa.int64()), "split": ["gnr"] * 4 + ["val"] * 2,
                      "index": pa.array(range(6), pa.int64())})
    (tmp_path / RunLayout.CLEAN).mkdir(parents=True)
    pq.write_table(table, str(tmp_path / RunLayout.CLEAN / "part-0.parquet"))
    save_artifact(storage, "target", create_model("small_cnn", num_classes=3), {"kind": "classifier", "arch": "small_cnn",
                  "num_classes": 3}, config=cfg.to_dict())
    ctx = RunContext(cfg=cfg, storage=storage)
    kwargs = {"storage": storage, "plan": {"gnr": [("bench", "target", ["fgsm", "ifgsm2"])]}, "seed": 0,
              "eps_min": 2 / 255, "eps_max": 8 / 255}
    n = ray_stages.plain_attack_pass(ctx, kwargs, batch_size=3, threads=1, rel="bench/plain")
    assert n == 8  # 4 gnr images x 2 methods; the val rows are not read
    out = ctx.layout.table("bench/plain/set=bench")
    assert sorted(set(out.column("method").to_pylist())) == ["fgsm", "ifgsm2"]
    adv = ray_stages.image_array(out.column("adv"), 32).astype(int)
    clean = ray_stages.image_array(out.column("clean"), 32).astype(int)
    assert np.abs(adv - clean).max() <= 8 + 1  # within eps_max (8/255) after rounding to uint8

    # The whole stage's shape: two splits, a split feeding two sets (white-box on the target,
    # black-box on the surrogate), one Parquet folder per set as run_attack writes them.
    save_artifact(storage, "surrogate", create_model("small_cnn", num_classes=3),
                  {"kind": "classifier", "arch": "small_cnn", "num_classes": 3}, config=cfg.to_dict())
    plan = {"gnr": [("train", "target", ["fgsm", "ifgsm2"])],
            "val": [("val_white", "target", ["fgsm"]), ("val_black", "surrogate", ["fgsm"])]}
    n = ray_stages.plain_attack_pass(ctx, {**kwargs, "plan": plan}, batch_size=3, threads=1, rel="bench/whole")
    assert n == 4 * 2 + 2 + 2
    counts = {name: ctx.layout.count_rows(f"bench/whole/set={name}") for name in ("train", "val_white", "val_black")}
    assert counts == {"train": 8, "val_white": 2, "val_black": 2}
    white = ctx.layout.table("bench/whole/set=val_white").column("adv").to_pylist()
    black = ctx.layout.table("bench/whole/set=val_black").column("adv").to_pylist()
    assert white != black  # each set attacked its own model


# ----------------------------------------------------------------------------- sections 5 and 6, the command


def test_default_run_section_reads_the_stage_timings(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "full_pipeline.py").write_text(
        "import json, os, sys\n"
        "a = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "if 'fail' in a['--config']: sys.exit('error: bad config')\n"
        "d = os.path.join(a['--storage'], a['--name'], 'report'); os.makedirs(d)\n"
        "json.dump({'timings_s': {'prepare': 1.0, 'models': 3.0}, 'accuracy': {'uddn_kt': {'white_box': 0.9}}},"
        " open(os.path.join(d, 'metrics.json'), 'w'))\n")
    section = results.Section("5", "default run")
    default_run.run_default(section, repo=str(tmp_path), config=str(tmp_path / "ok.yaml"), log_dir=str(tmp_path / "out"),
                            timeout_s=60, log=lambda _: None)
    assert [r.name for r in section.rows] == ["full run, wall (process start to exit)", "stage prepare", "stage models"]
    assert section.rows[2].summary.median == 3.0 and section.rows[2].detail["share"] == 0.75
    assert section.rows[0].detail["accuracy"] == {"uddn_kt.white_box": 0.9}
    with pytest.raises(RuntimeError, match="bad config"):
        default_run.run_default(results.Section("5", "x"), repo=str(tmp_path), config=str(tmp_path / "fail.yaml"),
                                log_dir=str(tmp_path / "out"), timeout_s=60, log=lambda _: None)


def test_gpu_peaks():
    assert gpu.peak_for("NVIDIA H200")["bf16"] == pytest.approx(989.4)
    assert gpu.peak_for("NVIDIA H100 PCIe")["bf16"] == pytest.approx(756.0)
    assert gpu.peak_for("Some GPU") is None
    assert gpu.peak_for("Some GPU", override_bf16=100.0) == {"bf16": 100.0, "tf32": 50.0}
    assert gpu.count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2)) == 2 * 4 * 8 * 2


def test_gpu_section_code_path_on_cpu():
    """Section 6's code on CPU (bf16 autocast on CPU, a tiny model, a stated peak): the rows it makes."""
    section = results.Section("6", "gpu")
    gpu.run_gpu(section, _tiny_config(), num_classes=3, batch=4, steps=1, rounds=1, warmup=0, peak_override=1.0,
                log=lambda _: None, device="cpu", model_name="small_cnn", attack_size=32)
    names = [r.name for r in section.rows]
    assert names[:3] == ["I-FGSM4: bf16 / fp32 speed", "PGD-10: bf16 / fp32 speed", "UDDN training: bf16 / fp32 speed"]
    mfu = [r for r in section.rows if r.name.endswith("model FLOP utilisation")]
    assert len(mfu) == 6 and all(0 < r.summary.median < 100 for r in mfu)
    assert all(r.detail["flops_per_call"] > 0 for r in section.rows if r.unit == "img/s")


def test_cli_arguments():
    args = cli.parse_args(["--quick", "--sections", "4, 1", "--rounds", "3"])
    assert args.chosen == ["1", "4"]
    s = cli.settings_for(args)
    assert s.attack_sizes == (80,) and s.attack_rounds == s.epoch_rounds == 3
    assert cli.settings_for(cli.parse_args([])).attack_sizes == (80, 160)
    with pytest.raises(SystemExit):
        cli.parse_args(["--sections", "7"])
    assert cli.parse_args([]).device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cli_refuses_a_cuda_device_it_does_not_have(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--device", "cuda", "--sections", "1"])
    assert exc.value.code == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of section 6")
def test_main_writes_results_with_skipped_sections(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert cli.main(["--quick", "--sections", "5,6", "--skip-default-run", "--out", out]) == 0
    doc = json.loads(open(out).read())
    assert doc["sections"]["5"]["skipped"] == "--skip-default-run"
    assert "no CUDA device" in doc["sections"]["6"]["skipped"]
    assert "skipped: no CUDA device" in capsys.readouterr().out
