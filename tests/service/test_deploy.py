"""Static checks of the deployment files (no Docker engine runs here): compose wiring and Dockerfile habits."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.service.conftest import REPO


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_api_service(compose: dict):
    api = compose["services"]["api"]
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped"
    assert any(v.endswith(":/models:ro") for v in api["volumes"]) and any(v.endswith(":/calibration:ro") for v in api["volumes"])
    assert api["environment"]["DISALIGN_CALIBRATION"] == "/calibration"
    assert api["ports"] == ["127.0.0.1:${DISALIGN_PORT:-8000}:8000"]  # published on loopback only


def test_jobs_are_behind_profiles(compose: dict):
    extract, fit = compose["services"]["extract"], compose["services"]["fit"]
    assert extract["profiles"] == ["extract"] and fit["profiles"] == ["fit"]
    (device,) = extract["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and extract["shm_size"]
    assert extract["command"][0] == "extract" and fit["command"][0] == "fit"


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "TORCH_INDEX_URL" in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text.split("HEALTHCHECK", 1)[1]
    assert "EXPOSE 8000" in text and "USER 10001:10001" in text
    assert '"--host", "0.0.0.0", "--port", "8000"' in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (client) is not installed")
def test_compose_config_validates():
    result = subprocess.run(["docker-compose", "--profile", "extract", "--profile", "fit", "config", "--quiet"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
