"""The image, built and run for real without a Docker engine (slow: 13 min from nothing on 2 loaded cores,
6 min with the debootstrap base already built; docs/results.md).

deploy/build_image.py builds it once per session with buildah on a debootstrap base; every check then runs
it with ``buildah run --isolation chroot`` the way compose would: the user, bind mounts, secret, tmpfs and
environment of each service are read from docker-compose.yml, with the host directories prepared as
docs/service.md says (the calibration directory owned by uid 10001, the token file readable by it).

- ``api``: ``disalign serve`` runs as uid 10001, becomes ready, and answers ``/predict`` on a real CIFAR
  JPEG exactly as the same code does in process; the image's HEALTHCHECK passes against it and fails
  where no server listens;
- ``fit`` → reload: the compose ``fit`` job publishes a new version into the directory the running
  ``api`` mounts read-only, and the server serves it (its watcher, and ``POST /admin/reload``);
- ``read_only: true``: after all that, the api container's own layer holds nothing but mount points.

Skipped where buildah or debootstrap is missing (.ci/run installs them) or a network source the build needs
cannot be reached (deploy/build_image.py exits 3 with the reason). The server binds 127.0.0.1 only: chroot
isolation shares the host's network. Build time and size are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from fastapi.testclient import TestClient

from disalign.service.main import create_app
from disalign.service.settings import Settings
from tests.deploy.compose import bind_mounts, load_compose
from tests.service.conftest import (
    ADMIN_TOKEN,
    CARD,
    REPO,
    ServerProcess,
    free_port,
    make_settings,
    wait_ready,
)

BUILD_SCRIPT = REPO / "deploy" / "build_image.py"
UNREACHABLE = 3  # deploy/build_image.py: a network source of the build cannot be reached
TAG = "localhost/disalign:test"
IMAGE_UID = 10001
# The compose `fit` command with one rho and 2 epochs instead of the rho search: seconds instead of a minute.
FAST_FIT = ("--rho", "1.0", "--epochs", "2")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("buildah") is None or shutil.which("debootstrap") is None,
                       reason="buildah and debootstrap are not installed (.ci/run installs them with apt-get)"),
]


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=True, timeout=120).stdout


@pytest.fixture(scope="module")
def image() -> Iterator[dict]:
    """The image's Docker config (Entrypoint, User, Healthcheck, …), built once for the module; or an image
    already built by deploy/build_image.py, named by $DISALIGN_TEST_IMAGE (to iterate on the checks)."""
    given = os.environ.get("DISALIGN_TEST_IMAGE")
    if not given:
        result = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--tag", TAG], capture_output=True, text=True, timeout=1800)
        if result.returncode == UNREACHABLE:
            pytest.skip(result.stderr.strip().splitlines()[-1])
        assert result.returncode == 0, result.stderr[-4000:]
        print(f"\nimage built: {result.stdout.strip().splitlines()[-1]}")
    yield {**json.loads(buildah("inspect", "--type", "image", given or TAG))["Docker"]["config"], "Name": given or TAG}
    if not given:
        subprocess.run(["buildah", "rmi", "--force", TAG], capture_output=True)  # and its containers; the base stays


@pytest.fixture(scope="module")
def host(tmp_path_factory, model_file: Path) -> dict[str, str]:
    """The host side of a compose deployment and the variables that point docker-compose.yml at it."""
    root = tmp_path_factory.mktemp("deployment")
    models, banks, calibration, secrets = (root / name for name in ("models", "banks", "calibration", "secrets"))
    for directory in (models, banks, calibration, secrets):
        directory.mkdir()
    shutil.copy(model_file, models / "model.ts")
    shutil.copy(CARD, models / "model.json")
    for split in ("train", "val"):  # the real CIFAR-10-LT banks of the shared model
        shutil.copy(REPO / "examples" / "cifar10lt" / f"{split}.h5", banks / f"{split}.h5")
    os.chown(calibration, IMAGE_UID, IMAGE_UID)  # install -d -o 10001 -g 10001 calibration
    token = secrets / "admin_token"
    token.write_text(ADMIN_TOKEN + "\n")
    os.chown(token, IMAGE_UID, IMAGE_UID)
    token.chmod(0o400)
    return {"MODELS_DIR": str(models), "BANKS_DIR": str(banks), "CALIBRATION_DIR": str(calibration),
            "DISALIGN_ADMIN_TOKEN_SECRET": str(token)}


@pytest.fixture(scope="module")
def compose(host: dict[str, str]) -> dict:
    return load_compose(host)


def run_options(compose: dict, name: str, image: dict) -> list[str]:
    """``buildah run`` options that give a command what compose gives the service ``name``."""
    service = compose["services"][name]
    options = ["--isolation", "chroot", "--user", service.get("user", image["User"])]
    options += [f"--volume={m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in bind_mounts(service)]
    options += [f"--volume={compose['secrets'][s]['file']}:/run/secrets/{s}:ro" for s in service.get("secrets", [])]
    options += [f"--mount=type=tmpfs,destination={path}" for path in service.get("tmpfs", [])]
    options += [f"--env={key}={value}" for key, value in service.get("environment", {}).items()]
    return options


@pytest.fixture(scope="module")
def containers(image: dict) -> Iterator[dict[str, str]]:
    """One working container of the image per compose service (as `docker compose` makes them)."""
    names = {service: f"disalign-test-{service}-{os.getpid()}" for service in ("api", "fit")}
    for name in names.values():
        buildah("from", "--name", name, image["Name"])
    yield names
    for name in names.values():
        subprocess.run(["buildah", "rm", name], capture_output=True)


def run_fit(compose: dict, image: dict, container: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [*image["Entrypoint"], *compose["services"]["fit"]["command"], *extra]
    return subprocess.run(["buildah", "run", *run_options(compose, "fit", image), container, "--", *argv],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def first_version(compose: dict, image: dict, containers: dict[str, str], host: dict[str, str]) -> str:
    """The compose `fit` job run in the image into the empty calibration directory: what `api` starts with."""
    result = run_fit(compose, image, containers["fit"], *FAST_FIT)
    assert result.returncode == 0, result.stdout + result.stderr
    return os.readlink(Path(host["CALIBRATION_DIR"]) / "current")


@pytest.fixture(scope="module")
def api(compose: dict, image: dict, containers: dict[str, str], first_version: str, tmp_path_factory) -> Iterator[ServerProcess]:
    """The compose `api` service: its command, on a free loopback port instead of 0.0.0.0:8000."""
    command = list(compose["services"]["api"]["command"])
    port = free_port()
    command[command.index("--host") + 1], command[command.index("--port") + 1] = "127.0.0.1", str(port)
    log = tmp_path_factory.mktemp("api") / "api.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(["buildah", "run", *run_options(compose, "api", image), containers["api"], "--",
                                    *image["Entrypoint"], *command], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        assert wait_ready(server, 240), f"the server in the image did not become ready:\n{log.read_text()[-3000:]}"
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # buildah run ends the container's processes with it
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def predict(url: str, jpeg: Path) -> dict:
    response = httpx.post(f"{url}/predict", files={"file": (jpeg.name, jpeg.read_bytes(), "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_serves_as_the_image_user(api: ServerProcess, image: dict):
    assert image["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    # buildah run → buildah-chroot-runtime → buildah-chroot-exec → /opt/venv/bin/python3 /opt/venv/bin/disalign serve …
    servers = [p for p in psutil.Process(api.process.pid).children(recursive=True) if p.cmdline()[:1] == ["/opt/venv/bin/python3"]]
    assert servers and all(p.uids().real == IMAGE_UID and p.gids().real == IMAGE_UID for p in servers)


def test_predict_a_real_jpeg_as_the_code_does(api: ServerProcess, cifar_jpegs: list[Path], host: dict[str, str]):
    """Same top-k and probabilities (1e-4: the image may carry another torch build) as the app in process."""
    jpeg = next(p for p in cifar_jpegs if "airplane" in p.name)
    served = predict(api.url, jpeg)
    with TestClient(create_app(make_settings(Path(host["CALIBRATION_DIR"])))) as client:
        response = client.post("/predict", files={"file": (jpeg.name, jpeg.read_bytes(), "image/jpeg")})
        expected = response.json()
    assert served["calibration_version"] == expected["calibration_version"]
    (got,), (want,) = served["predictions"], expected["predictions"]
    assert [k["label"] for k in got["top_k"]] == [k["label"] for k in want["top_k"]]
    np.testing.assert_allclose([k["probability"] for k in got["top_k"]], [k["probability"] for k in want["top_k"]], atol=1e-4)


def test_healthcheck_command(api: ServerProcess, image: dict, compose: dict, containers: dict[str, str]):
    """The image's HEALTHCHECK, run in the api container as `docker` runs it (its port swapped for the free one)."""
    kind, *command = image["Healthcheck"]["Test"]
    assert kind == "CMD" and any("127.0.0.1:8000/v2/health/ready" in part for part in command)
    port = api.url.rsplit(":", 1)[1]

    def healthcheck(port: str) -> int:
        argv = [part.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for part in command]
        return subprocess.run(["buildah", "run", *run_options(compose, "api", image), containers["api"], "--", *argv],
                              capture_output=True, timeout=60).returncode

    assert healthcheck(port) == 0
    assert healthcheck(str(free_port())) != 0  # nothing listens there


def served_version(url: str, jpeg: Path) -> str:
    return predict(url, jpeg)["calibration_version"]


def test_fit_publishes_a_version_the_api_serves(api: ServerProcess, compose: dict, image: dict, containers: dict[str, str],
                                                host: dict[str, str], first_version: str, cifar_jpegs: list[Path]):
    """The compose flow: `fit` into the calibration mount while `api` serves it read-only; the server's watcher
    serves the new version within seconds, and predictions change with it."""
    jpeg = cifar_jpegs[0]
    before = served_version(api.url, jpeg)
    result = run_fit(compose, image, containers["fit"], "--rho", "0.0", "--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.readlink(Path(host["CALIBRATION_DIR"]) / "current") != first_version
    deadline = time.monotonic() + 10
    while (now := served_version(api.url, jpeg)) == before and time.monotonic() < deadline:
        time.sleep(0.25)
    assert now != before, "the server did not pick up the newly published calibration within 10 s"


@pytest.mark.skipif("admin_token_file" not in Settings.model_fields, reason="needs DISALIGN_ADMIN_TOKEN_FILE of branch http")
def test_admin_reload_with_the_secret_token(api: ServerProcess):
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = httpx.post(f"{api.url}/admin/reload", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert httpx.post(f"{api.url}/admin/reload", headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=60).status_code == 401


def test_api_writes_nothing_outside_its_mounts(api: ServerProcess, compose: dict, containers: dict[str, str]):
    """What `read_only: true` would refuse: after serving, predicting, the healthcheck and a reload, the api
    container's own layer holds only the (empty) mount points that `buildah run` made."""
    merged = buildah("mount", containers["api"]).strip()
    try:
        (line,) = [line for line in Path("/proc/mounts").read_text().splitlines() if f" {merged} " in line]
        upper = Path(re.search(r"upperdir=([^,\s]+)", line)[1])
        targets = [m.target for m in bind_mounts(compose["services"]["api"])]
        targets += [f"/run/secrets/{s}" for s in compose["services"]["api"]["secrets"]] + compose["services"]["api"]["tmpfs"]
        allowed = {str(parent) for target in targets for parent in [Path(target), *Path(target).parents]}
        # A mount point is an empty directory, or an empty file where a file (the secret) is mounted.
        unexpected = sorted("/" + str(p.relative_to(upper)) for p in upper.rglob("*")
                            if "/" + str(p.relative_to(upper)) not in allowed or (p.is_file() and p.stat().st_size > 0))
        assert not unexpected, f"written outside the mounts: {unexpected}"
    finally:
        buildah("umount", containers["api"])
