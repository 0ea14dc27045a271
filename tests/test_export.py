"""Export: a finished run's defended model as TorchScript / ONNX with a model card.

The "finished run" is made cheaply: tiny models after one optimiser step, saved through the
project's own artifact functions, plus the files the exporter reads (config.yaml,
data/meta.json, a few clean test images, report/metrics.json). No pipeline, no Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from raydefense.config import load_config
from raydefense.errors import ConfigError, StorageError
from raydefense.export import config_hash, export_defense
from raydefense.pipeline.adaptive import build_defended_models
from raydefense.pipeline.artifacts import build_network, save_artifact
from raydefense.pipeline.evaluate import DEFENSES
from raydefense.storage import Storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "done"
CLASSES = ["alice", "bob", "carol", "dave"]
SIZE = 32


def _one_step(model: torch.nn.Module, x: torch.Tensor, loss_fn) -> None:
    """One Adam step so the weights are not the initial ones (the UDDN starts as the identity)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss_fn(model(x)).backward()
    opt.step()
    model.eval()


def make_finished_run(root: str, *, defenses=("none", "uddn", "uddn_kt", "jpeg")) -> Storage:
    """``<root>/done/``: what the exporter needs from a run that finished (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs", "smoke.yaml"), [f"name={RUN}", f"storage.path={root}"])
    run = Storage.open(root).child(RUN)
    run.write_text("config.yaml", cfg.to_yaml())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.arange(6) % len(CLASSES)
    conf = cfg.to_dict()
    for name in ("target", "student"):
        spec = {"kind": "classifier", "arch": cfg.models.target, "num_classes": len(CLASSES)}
        net = build_network(spec)
        _one_step(net, x, lambda out: torch.nn.functional.cross_entropy(out, y))
        save_artifact(run, name, net, spec, config=conf)
    spec = {"kind": "denoiser", "arch": "uddn", "widths": list(cfg.denoise.widths)}
    net = build_network(spec)
    _one_step(net, x, lambda out: (out - 0.5).abs().mean())
    save_artifact(run, "uddn", net, spec, config=conf)
    run.write_json("data/meta.json", {"source": "synthetic", "image_size": SIZE, "classes": CLASSES,
                                      "num_classes": len(CLASSES)})
    table = pa.table({"image": [im.tolist() for im in images], "label": y.numpy(),
                      "split": ["test"] * 4 + ["val"] * 2, "index": np.arange(6)})
    run.fs.create_dir(run.path("data/clean"), recursive=True)
    pq.write_table(table, run.path("data/clean/part-0.parquet"), filesystem=run.fs)
    acc = {d: {"clean": 0.75, "white_box": 0.5, "black_box": 0.7} for d in defenses}
    acc["uddn_kt"]["adaptive_pgd"] = 0.125
    run.write_json("report/metrics.json", {
        "accuracy": acc, "n_images": {"clean": 12, "white_box": 24},
        "accuracy_detail": {d: {k: {"accuracy": v, "n": 12, "ci95": [0.1, 0.9]} for k, v in row.items()}
                            for d, row in acc.items()}})
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return root, make_finished_run(root)


def _evaluated(run: Storage, defense: str) -> torch.nn.Module:
    """The model as the report's evaluation assembles it."""
    cfg_quality = load_config(os.path.join(REPO, "configs", "smoke.yaml")).baselines.jpeg_quality
    return build_defended_models(run, {defense: DEFENSES[defense]}, jpeg_quality=cfg_quality, device="cpu")[defense]


def _inputs(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


LOAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    {extra_import}
    m = torch.jit.load(sys.argv[1]).eval()
    x = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        np.save(sys.argv[3], m(x).numpy())
    assert not any(k == 'raydefense' or k.startswith('raydefense.') for k in sys.modules), 'raydefense was imported'
""")


def _logits_in_fresh_process(model_path: str, x: torch.Tensor, tmp_path, *, extra_import: str = "") -> np.ndarray:
    np.save(tmp_path / "x.npy", x.numpy())
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(extra_import=extra_import))
    # cwd outside the repository and -I: nothing puts raydefense on sys.path by accident.
    res = subprocess.run([sys.executable, "-I", str(script), model_path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    return np.load(tmp_path / "y.npy")


def test_uddn_kt_round_trips_through_torchscript_and_onnx(finished, tmp_path):
    root, run = finished
    card = export_defense(root, RUN, defense="uddn_kt", echo=lambda _: None)
    out = "export/uddn_kt"
    assert run.read_json(f"{out}/card.json") == json.loads(json.dumps(card))
    # The card: what a user needs to call the model and to know how good it is.
    assert card["classes"] == CLASSES
    assert card["input"]["shape"] == [None, 3, SIZE, SIZE] and card["input"]["range"] == [0.0, 1.0]
    assert card["accuracy"]["clean"] == 0.75 and card["accuracy"]["white_box"] == 0.5
    assert card["accuracy"]["adaptive_pgd"] == 0.125
    assert card["config_sha256"] == config_hash(load_config(os.path.join(REPO, "configs", "smoke.yaml")).to_dict())
    assert card["parts"] == {"preprocess": "uddn", "classifier": "student", "target_arch": "small_cnn"}
    assert card["verification"]["images"].startswith("4 clean test images")
    assert card["files"]["torchscript"]["bytes"] == len(run.read_bytes(f"{out}/model.pt"))

    x = _inputs()
    with torch.no_grad():
        expected = _evaluated(run, "uddn_kt")(x).numpy()
    local = run.path(out, "model.pt")
    got = _logits_in_fresh_process(local, x, tmp_path)
    diff = float(np.abs(got - expected).max())
    print(f"torchscript round trip (fresh process, no raydefense): max |logit diff| = {diff:.3g}")
    assert got.shape == (5, len(CLASSES)) and diff <= 1e-5

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(run.path(out, "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"image": x.numpy()})[0]
    odiff = float(np.abs(onnx_out - expected).max())
    print(f"onnx round trip (onnxruntime): max |logit diff| = {odiff:.3g}")
    assert odiff <= 1e-4
    # The UDDN is part of the export: its output is not the classifier's on the raw images.
    with torch.no_grad():
        bare = _evaluated(run, "none")(x).numpy()
    assert np.abs(bare - expected).max() > 1e-3


def test_jpeg_exports_the_real_codec(finished, tmp_path):
    root, run = finished
    card = export_defense(root, RUN, defense="jpeg", echo=lambda _: None)
    assert "onnx" not in card["files"] and "JPEG" in card["skipped"]["onnx"]
    assert not run.exists("export/jpeg/model.onnx")
    assert card["requires"] == ["torch", "torchvision"]
    # Natural-looking images (smooth), where JPEG changes pixels but keeps the picture.
    x = torch.nn.functional.avg_pool2d(_inputs(4), 5, 1, 2)
    with torch.no_grad():
        expected = _evaluated(run, "jpeg")(x).numpy()          # Pillow's real codec, as evaluated
        no_jpeg = _evaluated(run, "none")(x).numpy()
    got = _logits_in_fresh_process(run.path("export/jpeg/model.pt"), x, tmp_path, extra_import="import torchvision")
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(no_jpeg - expected).max() > 1e-4  # the codec really runs inside the exported file


def test_reexport_replaces_files_and_a_failed_one_leaves_the_last_good_export(finished):
    import hashlib

    root, run = finished
    export_defense(root, RUN, defense="none", echo=lambda _: None)
    export_defense(root, RUN, defense="none", formats=["torchscript"], echo=lambda _: None)
    # The ONNX file of the first export is gone with the second; no temporary files are left behind.
    assert run.listdir("export/none") == ["card.json", "model.pt"]
    blob = run.read_bytes("models/target.pt")
    run.write_bytes("models/target.pt", b"not a checkpoint")
    try:
        with pytest.raises(Exception):
            export_defense(root, RUN, defense="none", formats=["torchscript"], echo=lambda _: None)
    finally:
        run.write_bytes("models/target.pt", blob)
    card = run.read_json("export/none/card.json")
    assert card["files"]["torchscript"]["sha256"] == hashlib.sha256(run.read_bytes("export/none/model.pt")).hexdigest()


@pytest.mark.parametrize("kwargs, error, text", [
    ({"defense": "nope"}, ConfigError, "unknown"),
    ({"defense": "dcn"}, ConfigError, "was not evaluated"),
    ({"formats": ["pickle"]}, ConfigError, "choose from"),
    ({"defense": "jpeg", "formats": ["onnx"]}, ConfigError, "no JPEG codec operator"),
])
def test_bad_requests_name_the_culprit(finished, kwargs, error, text):
    root, _ = finished
    with pytest.raises(error, match=text):
        export_defense(root, RUN, echo=lambda _: None, **kwargs)


def test_unfinished_or_missing_run_is_a_one_line_error(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        export_defense(str(tmp_path), "ghost", echo=lambda _: None)
    run = Storage.open(str(tmp_path)).child("half")
    run.write_text("config.yaml", load_config(os.path.join(REPO, "configs", "smoke.yaml")).to_yaml())
    with pytest.raises(StorageError, match="not evaluated yet"):
        export_defense(str(tmp_path), "half", echo=lambda _: None)


def test_export_job_cli(finished):
    root, run = finished
    res = subprocess.run([sys.executable, "jobs/export.py", "--name", RUN, "--storage", root, "--defense", "uddn",
                          "--format", "torchscript"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "exported 'uddn'" in res.stdout and run.exists("export/uddn/card.json")
    bad = subprocess.run([sys.executable, "jobs/export.py", "--name", "ghost", "--storage", root],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "ghost" in bad.stderr
