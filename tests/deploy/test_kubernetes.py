"""deploy/kubernetes.yaml against the Kubernetes JSON schema of a pinned version (strict: an unknown or
misspelt field is an error), and its wiring: probes on the server's health routes, ports, volumes, user."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from disalign.service.routers.health import router as health_router
from tests.deploy.compose import KUBERNETES_FILE, dockerfile_user

KUBERNETES_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    """The manifest's objects by ``Kind/name``."""
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(KUBERNETES_FILE.read_text())}


@pytest.fixture(scope="module")
def pod(documents: dict[str, dict]) -> dict:
    return documents["Deployment/disalign"]["spec"]["template"]["spec"]


def test_every_object_validates(documents: dict[str, dict]):
    assert sorted(documents) == ["Deployment/disalign", "PersistentVolumeClaim/disalign-calibration",
                                 "PersistentVolumeClaim/disalign-models", "Service/disalign"]
    for document in documents.values():
        assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == "1.33"


def test_a_misspelt_field_is_refused(documents: dict[str, dict]):
    deployment = copy.deepcopy(documents["Deployment/disalign"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="'readinesProbe' was unexpected"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_call_the_v2_health_routes(pod: dict):
    (container,) = pod["containers"]
    (port,) = container["ports"]
    routes = {route.path for route in health_router.routes if "GET" in route.methods}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/v2/health/live", "livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready"}
    assert {probe["path"] for probe in probes.values()} <= routes
    assert {probe["port"] for probe in probes.values()} == {port["name"]}
    assert container["args"][-2:] == ["--port", str(port["containerPort"])]


def test_service_selects_the_pods(documents: dict[str, dict], pod: dict):
    deployment, service = documents["Deployment/disalign"], documents["Service/disalign"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in pod["containers"][0]["ports"]}


def test_volumes(documents: dict[str, dict], pod: dict):
    """Model and calibration from claims of this manifest, read-only; the token from a secret; /tmp in memory
    (the root filesystem is read-only); the settings point into those mounts."""
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} == set(volumes)
    env = {e["name"]: e["value"] for e in container["env"]}
    for path, claim in (("/models", "disalign-models"), ("/calibration", "disalign-calibration")):
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert f"PersistentVolumeClaim/{claim}" in documents
    assert env["DISALIGN_CALIBRATION"] == "/calibration" and env["DISALIGN_MODEL"].startswith("/models/")
    token_dir = env["DISALIGN_ADMIN_TOKEN_FILE"].rsplit("/", 1)[0]
    assert "secret" in volumes[mounts[token_dir]["name"]] and mounts[token_dir]["readOnly"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and container["securityContext"]["readOnlyRootFilesystem"] is True


def test_runs_as_the_image_user_without_privileges(pod: dict):
    (container,) = pod["containers"]
    user = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert user == dockerfile_user() and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
