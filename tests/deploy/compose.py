"""docker-compose.yml and the other deployment files as the tests read them: `${VAR:-default}` resolved as
`docker compose` resolves it, bind mounts split into their parts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
KUBERNETES_FILE = REPO / "deploy" / "kubernetes.yaml"
NGINX_CONF = REPO / "deploy" / "nginx.conf"
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` and ``${VAR:-default}`` (the default when VAR is unset or empty), as compose does."""
    return _VARIABLE.sub(lambda m: env.get(m["name"]) or (m["default"] or ""), text)


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """The compose file with every variable resolved from ``env`` (nothing from this process's environment)."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env or {}))


@dataclass(frozen=True)
class BindMount:
    source: Path  # on the host, relative paths taken from the compose file's directory
    target: str  # in the container
    read_only: bool


def bind_mounts(service: dict) -> list[BindMount]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append(BindMount((COMPOSE_FILE.parent / source).resolve(), target, mode == ["ro"]))
    return mounts


def dockerfile_user() -> str:
    """The ``USER`` of the image (the last one)."""
    return re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)[-1]
