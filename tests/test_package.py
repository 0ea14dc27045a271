"""A real package: the built wheel carries the presets and runs the same default as a checkout.

The wheel is built from a copy of the sources (``pip wheel --no-deps``, with this environment's
setuptools, so no build environment is downloaded) and installed with pip into a fresh virtual
environment made ``--without-pip``. That environment sees only the wheel's raydefense: the
project environment's site-packages is added after its own (a ``.pth`` line: its packages,
torch, ray, ..., are reused, but its editable-install hook is not run, since ``.pth`` files are
processed only in site directories). Every check asserts that the imported module's file lies
inside the fresh environment. Whether a fresh install of ``.[dev]`` with constraints.txt
resolves is checked by pip itself (``--dry-run --ignore-installed``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from raydefense.config import load_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def _copy_sources(dst: Path) -> Path:
    """The files a build reads, outside the repository (an in-tree build would write build/ there)."""
    src = dst / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "configs", src / "configs")
    shutil.copytree(REPO / "raydefense", src / "raydefense", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = _copy_sources(tmp)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    res = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = dist.glob("raydefense-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run([*pip, "--python", str(py), "install", "--no-deps", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The project's third-party packages, after the fresh environment's own site-packages.
    Path(purelib, "zz_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"wheel": wheel, "venv": venv, "python": py, "purelib": Path(purelib), "cwd": tmp}


def _run(installed, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=installed["cwd"], env=env)


def test_wheel_carries_the_presets_and_the_console_script(installed):
    with zipfile.ZipFile(installed["wheel"]) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        for preset in PRESETS:
            assert zf.read(f"raydefense/configs/{preset}") == (REPO / "configs" / preset).read_bytes()
    assert "raydefense = raydefense.__main__:main" in entry_points
    assert not any(n.startswith(("tests/", "jobs/")) for n in names)


def test_installed_default_config_equals_configs_default_yaml(installed):
    code = (
        "import json, raydefense\n"
        "from raydefense.cli import DEFAULT_CONFIG, common_parser, config_from_args\n"
        "cfg = config_from_args(common_parser('x').parse_args([]))\n"   # what `raydefense run` resolves
        "print(json.dumps({'module': raydefense.__file__, 'preset': str(DEFAULT_CONFIG), 'config': cfg.to_dict()}))\n"
    )
    res = _run(installed, str(installed["python"]), "-c", code)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert Path(out["module"]).is_relative_to(installed["purelib"])
    assert Path(out["preset"]).is_relative_to(installed["purelib"]) and Path(out["preset"]).is_file()
    assert out["config"] == json.loads(json.dumps(load_config(REPO / "configs" / "default.yaml").to_dict()))


def test_console_script_and_python_m_name_the_preset_and_run_the_pipeline_entry(installed):
    preset = installed["purelib"] / "raydefense" / "configs" / "default.yaml"
    script = installed["venv"] / "bin" / "raydefense"
    res = _run(installed, str(script), "--help")
    assert res.returncode == 0 and f"default preset (used without --config): {preset}" in res.stdout
    for cmd in ("run", "evaluate", "tune", "compare", "export", "serve"):
        assert f"\n  {cmd} " in res.stdout
    res = _run(installed, str(installed["python"]), "-m", "raydefense", "run", "--help")
    assert res.returncode == 0 and str(preset) in res.stdout and "--stop-after" in res.stdout
    # The run subcommand loads the preset and validates overrides before starting anything.
    res = _run(installed, str(script), "run", "--set", "data.image_size=-3")
    assert res.returncode == 2 and "data.image_size" in res.stderr and res.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_a_fresh_dev_install_resolves_with_the_constraints(tmp_path):
    """README's install line: pip resolves '.[dev]' with constraints.txt from scratch (nothing installed)."""
    src = _copy_sources(tmp_path)
    report = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--dry-run",
                          "--ignore-installed", "--report", str(report), f"{src}[dev]", "-c", str(REPO / "constraints.txt")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name, version in pins.items():
        assert chosen[name] == version, name
    # What the tests need: Serve's HTTP stack, ONNX and its runtime, the S3 test server.
    for name in ("fastapi", "uvicorn", "starlette", "onnx", "onnxruntime", "moto", "boto3", "pytest"):
        assert name in chosen, name
