"""Fixtures of the service tests: the shared ResNet-32 model, a few real CIFAR JPEGs, calibrations
fitted for it in a temporary directory, an in-process app (TestClient) and a real server process.

Shared data is read from ``../shared`` beside the repository root (``DISALIGN_SHARED_DIR`` overrides).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from disalign.calib.artifact.publish import ARTIFACT_FILES, artifact_dir, publish
from disalign.calib.data.bank import write_bank
from disalign.calib.estimators.disalign import DisAlign
from disalign.service.main import create_app
from disalign.service.settings import Settings
from tests.conftest import EXAMPLE_CARD, EXAMPLE_MODEL, REPO, SHARED

MODEL, CARD = EXAMPLE_MODEL, EXAMPLE_CARD  # the shared ResNet-32, embedded in the repository
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
ADMIN_TOKEN = "test-admin-token-0123456789"
IMAGES_PER_CLASS = 2


@pytest.fixture(scope="session")
def model_file() -> Path:
    if not MODEL.is_file():
        pytest.fail(f"the shared model {MODEL} is missing; put shared/ beside the repository or set DISALIGN_SHARED_DIR.")
    return MODEL


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    return json.loads(CARD.read_text())["classes"]


@pytest.fixture(scope="session")
def fingerprint(model_file: Path) -> str:
    return "sha256:" + hashlib.sha256(model_file.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cifar_jpegs(shared_dir, tmp_path_factory) -> list[Path]:
    """The first IMAGES_PER_CLASS test JPEGs of each CIFAR-10 class, extracted to a temporary directory."""
    root = tmp_path_factory.mktemp("cifar")
    wanted = {f"test/{c}/{i:04d}.jpg" for c in json.loads(CARD.read_text())["classes"] for i in range(IMAGES_PER_CLASS)}
    found: list[Path] = []
    with tarfile.open(ARCHIVE, "r|gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                target = root / member.name.replace("/", "_")
                target.write_bytes(tar.extractfile(member).read())
                found.append(target)
                if len(found) == len(wanted):
                    break
    assert len(found) == len(wanted), f"found {len(found)} of {len(wanted)} JPEGs in {ARCHIVE}"
    return sorted(found)


def fit_calibration(directory: Path, *, fingerprint: str, seed: int, num_classes: int = 10, feature_dim: int = 64,
                    class_names: list[str] | None = None) -> Path:
    """A DisAlign artifact fitted (1 epoch) on a small random bank that claims to come from ``fingerprint``."""
    rng = np.random.default_rng(seed)
    n = 20 * num_classes
    labels = np.repeat(np.arange(num_classes), 20)
    features = np.abs(rng.normal(size=(n, feature_dim))).astype(np.float32)
    logits = (rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[labels]).astype(np.float32)
    bank = write_bank(directory.with_suffix(".h5"), features, logits, labels, model_fingerprint=fingerprint,
                      class_names=class_names or [f"class{i}" for i in range(num_classes)],
                      class_counts=np.linspace(200, 10, num_classes).astype(np.int64), overwrite=True)
    DisAlign(rho=1.0, epochs=1, seed=seed).fit(bank).save(directory)
    return directory


@dataclass(frozen=True)
class Artifacts:
    good: Path  # fits the shared model
    other: Path  # fits it too, different parameters (a second version)
    wrong_k: Path  # K=5
    wrong_fingerprint: Path  # K and d right, fitted for another model


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, fingerprint: str, class_names: list[str]) -> Artifacts:
    root = tmp_path_factory.mktemp("artifacts")
    return Artifacts(
        good=fit_calibration(root / "good", fingerprint=fingerprint, seed=0, class_names=class_names),
        other=fit_calibration(root / "other", fingerprint=fingerprint, seed=1, class_names=class_names),
        wrong_k=fit_calibration(root / "wrong_k", fingerprint=fingerprint, seed=2, num_classes=5),
        wrong_fingerprint=fit_calibration(root / "wrong_fp", fingerprint="sha256:" + "0" * 64, seed=3),
    )


def install(source: Path, target: Path) -> None:
    """Publish the artifact of ``source`` as the new version of calibration directory ``target`` (what ``disalign fit
    --out target`` does before a reload)."""
    files = artifact_dir(source)
    publish(target, {name: (files / name).read_bytes() for name in ARTIFACT_FILES})


@pytest.fixture
def calibration_dir(tmp_path, artifacts: Artifacts) -> Path:
    """A private copy of the good calibration, which a test may overwrite before a reload."""
    target = tmp_path / "calibration"
    install(artifacts.good, target)
    return target


def make_settings(calibration: Path, **overrides) -> Settings:
    values = {"model": str(MODEL), "card": CARD, "calibration": calibration, "admin_token": ADMIN_TOKEN,
              "torch_threads": 1, "watch_interval_s": 0, **overrides}  # tests of the watcher turn it on
    return Settings(**values)


@pytest.fixture(scope="module")
def client(tmp_path_factory, artifacts: Artifacts) -> Iterator[TestClient]:
    """One started app per test module, for tests that do not change its calibration."""
    target = tmp_path_factory.mktemp("client") / "calibration"
    install(artifacts.good, target)
    with TestClient(create_app(make_settings(target))) as c:
        yield c


@pytest.fixture
def fresh_client(calibration_dir: Path) -> Iterator[TestClient]:
    """A started app of its own, serving ``calibration_dir``, for tests that reload or count."""
    with TestClient(create_app(make_settings(calibration_dir))) as c:
        yield c


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


# -- a real server process -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int:
        """Stop as ``docker stop`` does (SIGTERM); a graceful shutdown exits 0."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def server_command(calibration: Path, *extra: str, entry: str = "service", card: Path | None = CARD) -> list[str]:
    prefix = [sys.executable, "-m", "disalign", "serve"] if entry == "service" else [sys.executable, "-m", "disalign", "serve"]
    return [*prefix, "--model", str(MODEL), *(["--card", str(card)] if card else []), "--calibration", str(calibration),
            "--host", "127.0.0.1", *extra]


def start_server(calibration: Path, log: Path, *extra: str, env: dict | None = None, entry: str = "service",
                 deadline_s: float = 60.0, card: Path | None = CARD, wrapper: tuple[str, ...] = ()) -> ServerProcess:
    """Start the server on a free loopback port and wait (bounded) until /v2/health/ready answers 200."""
    environment = {**os.environ, "DISALIGN_ADMIN_TOKEN": ADMIN_TOKEN, "DISALIGN_TORCH_THREADS": "1",
                   "DISALIGN_WATCH_INTERVAL_S": "0", **(env or {})}  # tests of the watcher turn it on
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        with open(log, "wb") as fh:
            process = subprocess.Popen([*wrapper, *server_command(calibration, "--port", str(port), *extra, entry=entry, card=card)],
                                       stdout=fh, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
        server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
        if wait_ready(server, deadline_s):
            return server
        server.stop()
        if b"address already in use" not in log.read_bytes():
            break
    raise AssertionError(f"the server did not become ready:\n{log.read_text()[-3000:]}")


def wait_ready(server: ServerProcess, deadline_s: float) -> bool:
    """Poll /v2/health/ready (bounded) until it answers 200; False if the process ends or time runs out."""
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at and server.process.poll() is None:
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server_calibration(tmp_path_factory, artifacts: Artifacts) -> Path:
    target = tmp_path_factory.mktemp("server") / "calibration"
    install(artifacts.good, target)
    return target


@pytest.fixture(scope="module")
def server(server_calibration: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    proc = start_server(server_calibration, tmp_path_factory.mktemp("log") / "server.log", entry="disalign")
    yield proc
    assert proc.stop() == 0, proc.log.read_text()[-3000:]
