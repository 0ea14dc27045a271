"""Ray Serve: an exported model behind HTTP on loopback, real requests, good and bad.

One ``jobs/serve.py`` for the whole module, started as a user starts it (it starts its own local
Ray) on a free loopback port; the module's last test stops it with SIGTERM and reads its console.
The model is the export of the cheap "finished run" of tests/test_export.py.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from raydefense.data import render_identity_images
from raydefense.export import export_defense
from raydefense.serve import BadImage, decode_request, load_export
from tests.test_export import CLASSES, REPO, RUN, SIZE, make_finished_run

MAX_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    run = make_finished_run(root)
    export_defense(root, RUN, defense="uddn_kt", formats=["torchscript"], echo=lambda _: None)
    return run.path("export/uddn_kt")


class ServeJob:
    """``jobs/serve.py`` running as a user runs it (its own local Ray), and its console so far."""

    def __init__(self, exported: str):
        import queue
        import threading

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = subprocess.Popen(
            [sys.executable, "jobs/serve.py", "--model", exported, "--port", str(self.port), "--top-k", "3",
             "--max-pixels", str(MAX_PIXELS), "--max-batch-size", "4", "--batch-wait-s", "0.05"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            while not (self.lines and self.lines[-1].startswith("serving ")):
                self.read_line(timeout=240)
        except BaseException:
            self.kill()
            raise

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def read_line(self, timeout: float) -> str:
        line = self._queue.get(timeout=timeout)
        if line is None:
            raise AssertionError("the serve job ended:\n" + "\n".join(self.lines))
        self.lines.append(line)
        return line

    def stop(self) -> int:
        """SIGTERM, as `kill PID` or a supervisor sends; the exit status, the console read to its end."""
        import signal

        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return rc

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def job(exported):
    job = ServeJob(exported)
    yield job
    job.kill()


@pytest.fixture(scope="module")
def server(job):
    return job.url


def _expected(exported: str, image: np.ndarray) -> np.ndarray:
    """The exported model's probabilities for a uint8 (S, S, 3) image (already at the input size)."""
    model, _ = load_export(exported)
    x = torch.from_numpy(np.array(image[None])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[0].numpy()


def _face() -> np.ndarray:
    return render_identity_images(1, [0], image_size=SIZE, seed=0, difficulty=1.0)[0]


def test_served_predictions_equal_the_exported_model_and_bad_images_get_4xx(server, exported):
    face = _face()
    t0 = time.perf_counter()
    status, answer = _post(server, _png(face))
    latency = time.perf_counter() - t0
    print(f"served request: {answer} in {1000 * latency:.1f} ms")
    assert status == 200
    probs = _expected(exported, face)
    top = np.argsort(-probs)[:3]
    assert [p["identity"] for p in answer["predictions"]] == [CLASSES[i] for i in top]
    assert np.allclose([p["probability"] for p in answer["predictions"]], probs[top], atol=1e-5)
    assert answer["defense"] == "uddn_kt" and answer["run"] == RUN

    # Bad requests: 4xx with one line each, the server keeps serving.
    corrupt = _png(face)[: 60]
    gray = Image.fromarray(face).convert("L")
    huge = Image.new("L", (2000, 1000), 128)  # 2 MP > the 1 MP limit; a few KB as PNG
    buf = io.BytesIO()
    huge.save(buf, format="PNG")
    for body, code, text in ((b"this is not an image", 400, "cannot decode image"),
                             (corrupt, 400, "cannot decode image"),
                             (buf.getvalue(), 413, "2000 x 1000"),
                             (b"", 400, "empty request body")):
        status, reply = _post(server, body)
        assert status == code and text in reply["error"] and "\n" not in reply["error"], (status, reply)

    # Grayscale is converted to RGB as the training loader does (not rejected).
    gbuf = io.BytesIO()
    gray.save(gbuf, format="PNG")
    status, reply = _post(server, gbuf.getvalue())
    assert status == 200
    gprobs = _expected(exported, np.asarray(gray.convert("RGB")))
    assert np.isclose(reply["predictions"][0]["probability"], gprobs.max(), atol=1e-5)

    # Still serving after the bad ones, and the same answer as before.
    status, again = _post(server, _png(face))
    assert status == 200 and again["predictions"] == answer["predictions"]


def test_concurrent_requests_are_batched_by_serve(server, exported):
    from concurrent.futures import ThreadPoolExecutor

    faces = [render_identity_images(i, [1], image_size=SIZE, seed=0, difficulty=1.0)[0] for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda f: _post(server, _png(f)), faces * 2))
    assert all(code == 200 for code, _ in replies)
    assert max(r["batch_size"] for _, r in replies) > 1  # Serve put several requests in one forward pass
    for face, (_, reply) in zip(faces * 2, replies):
        probs = _expected(exported, face)
        assert reply["predictions"][0]["identity"] == CLASSES[int(np.argmax(probs))]


def test_get_returns_the_card(server):
    with urllib.request.urlopen(server, timeout=30) as resp:
        card = json.loads(resp.read())
    assert card["classes"] == CLASSES and "config" not in card and card["input"]["shape"][-1] == SIZE


def test_decode_request_rules():
    """The request rules without a server: crop/resize to the input size, limits from the header."""
    big = np.zeros((64, 96, 3), dtype=np.uint8)
    big[:, 16:80] = 200  # the centre square is the bright part
    out = decode_request(_png(big), image_size=SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8 and out.min() >= 190
    with pytest.raises(BadImage) as err:
        decode_request(b"\x00garbage", image_size=SIZE)
    assert err.value.status == 400 and err.value.reason.startswith("cannot decode image: not an image file")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(BadImage) as err:
        decode_request(buf.getvalue(), image_size=SIZE)
    assert err.value.status == 415
    with pytest.raises(BadImage) as err:
        decode_request(_png(big), image_size=SIZE, max_bytes=10)
    assert err.value.status == 413
    # The default pixel limit, read from the header: a 30 MP bitmap in a ~30 KB file is refused undecoded.
    buf = io.BytesIO()
    Image.new("L", (6000, 5000), 0).save(buf, format="PNG")
    with pytest.raises(BadImage) as err:
        decode_request(buf.getvalue(), image_size=SIZE)
    assert err.value.status == 413 and "30000000 pixels" in err.value.reason


def test_serve_job_refuses_a_folder_that_is_not_an_export(tmp_path):
    res = subprocess.run([sys.executable, "jobs/serve.py", "--model", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 2 and "not a finished export" in res.stderr and res.stderr.strip().count("\n") == 0


def test_the_serve_job_prints_only_its_own_lines_and_stops_cleanly(job, exported):
    """Last in this module: after the requests above (good, bad, concurrent), the job's console
    holds its own two lines and nothing of Ray's or Serve's (their INFO lines, the raylet's
    retry notice that ``serve.shutdown()`` causes), and SIGTERM stops it with exit status 0."""
    status, _ = _post(job.url, _png(_face()))
    assert status == 200
    assert job.stop() == 0
    shown = [line for line in job.lines if line.strip()]
    assert len(shown) == 2 and shown[0].startswith(f"serving {exported} at {job.url}"), job.lines
    assert shown[1] == "stopping", job.lines
