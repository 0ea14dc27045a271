"""A Ray cluster node as a cluster has it: a virtual environment with only
``ray[default,train,tune,data]`` and torch/torchvision (no raydefense), and a ``ray start --head``
from it on loopback, stopped by PID.

Used by test_clean_node.py; also runnable by hand to get a bare head for experiments:

    python -m tests.cluster.bare_ray     # prints the address and token, Ctrl-C stops the head
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
RAY_EXTRAS = "default,train,tune,data"
# Seconds a job may take to be accepted by a fresh head: the dashboard's job agent starts a few
# seconds after `ray start` returns.
JOB_API_TIMEOUT_S = 120
STOP_GRACE_S = 10.0


def pins() -> dict[str, str]:
    """``{name: version}`` for the ``name==version`` lines of constraints.txt."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def bare_venv_path() -> Path:
    """Where the bare venv is cached: the user's cache dir, keyed by Python, ray and torch versions
    (a new pin makes a new venv)."""
    p = pins()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = (f"py{sys.version_info.major}{sys.version_info.minor}-ray{p['ray']}-torch{p['torch']}"
           f"-tv{p['torchvision']}-linked")
    return cache / "raydefense" / f"bare-node-venv-{key}"


def node_requirements() -> list[str]:
    """What a node of the documented cluster has: ``ray[default,train,tune,data]`` and
    torch/torchvision at constraints.txt's pins."""
    p = pins()
    return [f"ray[{RAY_EXTRAS}]=={p['ray']}", f"torch=={p['torch']}", f"torchvision=={p['torchvision']}"]


def distribution_closure(requirements: list[str]):
    """The distributions installed in this test process's environment that ``pip install
    requirements`` would install: each requirement's distribution and, recursively, what it
    requires for the extras asked for (environment markers evaluated on this machine).

    Raises RuntimeError naming a requirement that is not installed here or at another version
    than the one pinned."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{req} is not installed in {sys.prefix}: the bare node venv is made of this "
                               "environment's packages") from None
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            raise RuntimeError(f"{req} is installed at {dist.version} in {sys.prefix}")
        found[name] = dist
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            for line in dist.requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return sorted(found.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _link_distributions(venv: Path, dists) -> None:
    """Make ``dists`` importable in ``venv`` as symlinks to this environment's installed files (each
    distribution's top-level packages, modules and ``.dist-info``, so pip sees them as installed),
    and write their console scripts (``ray``) into ``venv/bin``. A distribution the venv already
    has at another version (setuptools from ``python -m venv``) is uninstalled first."""
    from packaging.utils import canonicalize_name

    py = venv / "bin" / "python"
    probe = ("import json, sysconfig, importlib.metadata as m; print(json.dumps([sysconfig.get_paths()['purelib'], "
             "{d.metadata['Name']: d.version for d in m.distributions()}]))")
    site, present = json.loads(subprocess.run([str(py), "-c", probe], check=True, capture_output=True,
                                              text=True).stdout)
    site = Path(site)
    present = {canonicalize_name(n): v for n, v in present.items()}
    # Already there at the same version: kept. At another version (setuptools from `python -m
    # venv`, older than torch needs): pip would upgrade it, so it goes and the closure's is linked.
    todo = [d for d in dists if present.get(canonicalize_name(d.metadata["Name"])) != d.version]
    stale = [d.metadata["Name"] for d in todo if canonicalize_name(d.metadata["Name"]) in present]
    if stale:
        subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", *stale], check=True, capture_output=True)
    for dist in todo:
        if not dist.files:
            raise RuntimeError(f"{dist.metadata['Name']} has no RECORD of its files in {sys.prefix}: cannot link it")
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files} - {"..", "__pycache__"}
        for top in sorted(tops):
            src, dst = base / top, site / top
            if src.exists() and not (dst.exists() or dst.is_symlink()):
                dst.symlink_to(src)
        for ep in dist.entry_points.select(group="console_scripts"):
            first, _, rest = ep.attr.partition(".")
            script = venv / "bin" / ep.name
            script.write_text(f"#!{py}\nimport sys\nfrom {ep.module} import {first}\n"
                              f"sys.exit({first}{'.' + rest if rest else ''}())\n")
            script.chmod(0o755)


def bare_venv() -> tuple[Path, float]:
    """The bare node venv, created when absent: ``python -m venv`` (with pip, which Ray's
    runtime-env pip plugin needs), then the distributions of :func:`node_requirements`
    (:func:`distribution_closure`) linked from this test process's environment, where
    constraints.txt installed the same versions. The node's Python then has exactly what a
    ``pip install`` of them gives it, and nothing of the project; linking, not installing,
    takes seconds instead of minutes (torch's 5 GB build unpacked once more), and Ray's clone
    of the node's venv for a job's ``pip`` runtime env (``copytree(symlinks=True)``) copies
    links, not gigabytes.

    A ``.complete`` marker is written last, so a half-built venv (killed build) is rebuilt, and
    so is one whose links point into another environment than this one; a file lock keeps two
    test runs from building it at once.
    """
    path = bare_venv_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = path / ".complete"
        if marker.exists():
            with contextlib.suppress(ValueError, OSError):
                if json.loads(marker.read_text()).get("linked_from") == sys.prefix:
                    return path, 0.0
        t0 = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        # A venv is not relocatable (absolute paths in its scripts): build it in place.
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, env=_clean_env(path))
        _link_distributions(path, distribution_closure(node_requirements()))
        marker.write_text(json.dumps({"created_s": time.monotonic() - t0, "linked_from": sys.prefix}))
        return path, time.monotonic() - t0


def _clean_env(venv: Path) -> dict[str, str]:
    """This process's environment without anything that points at the test's own Python or Ray
    (VIRTUAL_ENV, PYTHONPATH, RAY_ADDRESS, RAY_AUTH_*), with the bare venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS", "RAY_AUTH_MODE",
                        "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
           and not k.startswith("RAYDEFENSE_")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class BareHead:
    """A running ``ray start --head --block`` from the bare venv (see ``start_head``)."""

    venv: Path
    temp_dir: Path
    proc: subprocess.Popen
    dashboard_url: str
    env: dict[str, str] = field(repr=False)
    log_path: Path = field(default=None)

    def ray_cli(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        """Run the bare venv's ``ray`` CLI against this head (token auth on)."""
        return subprocess.run([str(self.venv / "bin" / "ray"), *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def python(self, code: str) -> subprocess.CompletedProcess:
        """Run ``python -c code`` with the bare venv's Python (outside Ray), from a neutral cwd."""
        return subprocess.run([str(self.venv / "bin" / "python"), "-c", code], env=self.env, cwd=self.temp_dir,
                              capture_output=True, text=True, timeout=120)


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (Linux /proc; no psutil in the test's own venv needed)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the given PIDs, then SIGKILL whichever is still alive after ``grace_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start_head(venv: Path, *, num_cpus: int = 4, object_store_mb: int = 512) -> Iterator[BareHead]:
    """``ray start --head --block`` from ``venv`` on 127.0.0.1 with its own temp dir, ports,
    dashboard and dashboard-agent ports, and a token of its own (RAY_AUTH_MODE=token,
    RAY_AUTH_TOKEN: nothing read from or written to ~/.ray). Waits until ``ray job list``
    answers. On exit stops the head and every process it started by PID (SIGTERM, then SIGKILL
    after a grace period); never ``ray stop``, which would stop every Ray on the machine.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rdh-", dir="/tmp"))  # short: Ray's socket paths
    env = _clean_env(venv)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    (gcs, dash, agent_http, agent_grpc, node_mgr, obj_mgr, metrics, rt_agent, client,
     worker_lo) = free_ports(10)
    del worker_lo
    cmd = [str(venv / "bin" / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--object-store-memory={object_store_mb * 1024 * 1024}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
           f"--ray-client-server-port={client}", "--disable-usage-stats"]
    log_path = temp_dir / "ray-start.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    env["RAY_ADDRESS"] = url
    head = BareHead(venv=venv, temp_dir=temp_dir, proc=proc, dashboard_url=url, env=env, log_path=log_path)
    try:
        deadline = time.monotonic() + JOB_API_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            r = head.ray_cli("job", "list", timeout=60)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"`ray job list` did not answer within {JOB_API_TIMEOUT_S} s: {r.stderr[-2000:]}")
            time.sleep(2)
        yield head
    finally:
        # Everything below `ray start --block` (GCS, raylet, dashboard, agents, job supervisors,
        # workers), collected before the parent goes so that none is missed as an orphan.
        pids = _descendants(proc.pid) + [proc.pid]
        stop_pids(pids)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        log.close()
        # Workers re-parented away from the tree while stopping: anything still holding our temp dir.
        stray = [int(d) for d in os.listdir("/proc") if d.isdigit() and _cmdline_mentions(int(d), str(temp_dir))]
        if stray:
            stop_pids(stray, grace_s=2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


if __name__ == "__main__":
    venv, took = bare_venv()
    print(f"bare venv {venv} ({took:.0f} s to create)", flush=True)
    with start_head(venv) as h:
        print(f"RAY_ADDRESS={h.dashboard_url} RAY_AUTH_MODE=token RAY_AUTH_TOKEN={h.env['RAY_AUTH_TOKEN']}", flush=True)
        print(f"PATH={venv / 'bin'}:$PATH  head pid {h.proc.pid}; Ctrl-C or SIGTERM stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with contextlib.suppress(KeyboardInterrupt):
            while h.proc.poll() is None:
                time.sleep(1)
