"""A real server process (``python -m disalign serve`` / ``disalign serve``) on a free loopback port, over HTTP."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    ADMIN_TOKEN,
    REPO,
    Artifacts,
    ServerProcess,
    free_port,
    install,
    png_bomb,
    server_command,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROW = {"features": [0.5] * 64, "logits": [float(i) for i in range(10)]}


def calibrate(url: str) -> dict:
    r = httpx.post(f"{url}/calibrate", json={"rows": [ROW]}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def raw_request(url: str, head: bytes, timeout: float = 10.0) -> bytes:
    """Send raw request bytes on a fresh connection and read the answer until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and b'"}' in data:
                break
        return data


def test_every_route_over_http(server: ServerProcess, cifar_jpegs: list[Path]):
    url = server.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{url}/v2/models/disalign").json()
    version = meta["calibration_version"]
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in cifar_jpegs[:3]]
    r = httpx.post(f"{url}/predict", files=files, params={"top_k": 2, "raw": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["calibration_version"] == version and len(r.json()["predictions"]) == 3
    image = base64.b64encode(cifar_jpegs[0].read_bytes()).decode()
    r = httpx.post(f"{url}/v2/models/disalign/infer", timeout=30,
                   json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]
    r = httpx.post(f"{url}/v2/models/disalign/infer", timeout=30, json={"inputs": [
        {"name": "features", "shape": [1, 64], "datatype": "FP32", "data": ROW["features"]},
        {"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": ROW["logits"]}]})
    assert r.status_code == 200 and r.json()["model_version"] == version
    assert calibrate(url)["calibration_version"] == version
    metrics = httpx.get(f"{url}/metrics").text
    assert 'disalign_requests_total{code="200",method="POST",route="/predict"}' in metrics
    assert r.headers["content-type"] == "application/json"


def test_error_statuses_over_http(server: ServerProcess, cifar_jpegs: list[Path]):
    url = server.url
    cases = [
        (httpx.post(f"{url}/predict", files=[("file", ("x.jpg", b"garbage", "image/jpeg"))]), 400),
        (httpx.post(f"{url}/predict", files=[("file", ("bomb.png", png_bomb(100_000, 100_000), "image/png"))]), 413),
        (httpx.post(f"{url}/admin/reload"), 401),
        (httpx.post(f"{url}/admin/reload", headers={"Authorization": "Bearer nope"}), 401),
        (httpx.get(f"{url}/v2/models/other"), 404),
        (httpx.post(f"{url}/predict", content=b"x", headers={"content-type": "text/plain"}), 415),
        (httpx.post(f"{url}/calibrate", json={"rows": [{"features": [0.0] * 64, "logits": [0.0] * 3}]}), 422),
        (httpx.post(f"{url}/calibrate", content=b'{"rows": [{"features": [NaN], "logits": [1]}]}',
                    headers={"content-type": "application/json"}), 422),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert list(response.json()) == ["error"]


def test_body_limit_before_reading_the_body(server: ServerProcess):
    # Content-Length above the limit and no body at all: answered at once, nothing is read.
    head = (b"POST /calibrate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    answer = raw_request(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"larger than the limit of 8388608 bytes" in answer

    def stream():  # chunked, no Content-Length: counted while it streams
        for _ in range(200):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/calibrate", content=stream(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]
    assert calibrate(server.url)["results"]  # the server is fine afterwards


def test_concurrent_images_share_forward_passes(server: ServerProcess, cifar_jpegs: list[Path]):
    def count() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("disalign_batch_size_count"):
                return float(line.split()[-1])
        return 0.0

    before = count()
    jpeg = cifar_jpegs[0].read_bytes()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/predict", files=[("file", ("a.jpg", jpeg, "image/jpeg"))],
                                                      timeout=30).status_code, range(48)))
    assert statuses == [200] * 48
    assert count() - before < 48  # at least one forward pass served several requests


def test_reload_over_http_and_a_bad_artifact_keeps_the_old_one(server: ServerProcess, server_calibration: Path, artifacts: Artifacts):
    before = calibrate(server.url)
    install(artifacts.wrong_k, server_calibration)
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=30)
    assert r.status_code == 409 and "K=5" in r.json()["error"]
    assert calibrate(server.url) == before
    install(artifacts.other, server_calibration)
    r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["changed"] is True
    assert calibrate(server.url)["calibration_version"] == r.json()["calibration_version"] != before["calibration_version"]
    install(artifacts.good, server_calibration)  # back to where the module started
    assert httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=30).json()["calibration_version"] == before["calibration_version"]


@pytest.mark.parametrize(("entry", "artifact", "sentence"), [
    ("disalign", "wrong_k", "refusing to start: the calibration has K=5 classes but the served model 'disalign' has K=10."),
    ("service", "wrong_fingerprint", "refusing to start: the calibration was fitted for model sha256:000000000000 but the served model"),
])
def test_refuses_to_start_when_the_calibration_does_not_fit(artifacts: Artifacts, entry: str, artifact: str, sentence: str):
    result = subprocess.run(server_command(getattr(artifacts, artifact), "--port", str(free_port()), entry=entry), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert sentence in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_errors_are_one_sentence():
    result = subprocess.run([sys.executable, "-m", "disalign", "serve", "--calibration", "x"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.strip() == "error: --model / DISALIGN_MODEL is required."
