"""The compose flow on real mounts, without a Docker engine: ``unshare --mount`` gives a process its own mount
namespace where ``mount --bind`` reproduces what Docker does with a volume.

- ``fit --out /calibration`` where ``/calibration`` is itself a mount point (the compose ``fit`` service):
  publishing never renames or deletes the directory, so it works (a rename gave "Device or resource busy").
- A host-side re-fit into a directory that a running server sees through a read-only bind mount (the
  compose ``api`` service): the server sees the new version through the same mount, and ``POST
  /admin/reload`` serves it (replacing the directory left the server looking at the old, emptied inode).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
import pytest

from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import load_calibration
from tests.service.conftest import ADMIN_TOKEN, REPO, Artifacts, install, start_server

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private")


@pytest.fixture(scope="module")
def mounts(tmp_path_factory) -> None:
    """Skip (with the reason) where a private mount namespace cannot be made: no unshare, or no privilege."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = tmp_path_factory.mktemp("probe")
    result = subprocess.run([*PRIVATE_MOUNTS, "sh", "-c", 'mount -t tmpfs tmpfs "$1"', "sh", str(probe)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"unshare --mount cannot mount here: {result.stderr.strip()}")


def test_fit_out_on_a_mount_point(mounts, lt_banks, tmp_path):
    host, point = tmp_path / "host", tmp_path / "calibration"
    DisAlign(rho=1.0, epochs=1, seed=0).fit(lt_banks["train"]).save(host)  # the calibration the re-fit replaces
    point.mkdir()
    script = 'mount --bind "$1" "$2" && "$3" -m disalign fit "$4" --rho 1 --epochs 1 --seed 1 --out "$2"'
    result = subprocess.run([*PRIVATE_MOUNTS, "sh", "-c", script, "sh", str(host), str(point), sys.executable, str(lt_banks["train"])],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "wrote disalign calibration" in result.stdout
    assert load_calibration(host).meta_.hyperparameters["seed"] == 1  # published through the mount point
    assert sorted(p.name for p in host.iterdir()) == ["current", "versions"] and not any(point.iterdir())


def test_a_host_side_refit_into_a_read_only_bind_mount_is_served_after_reload(mounts, artifacts: Artifacts, tmp_path):
    host, point = tmp_path / "host", tmp_path / "calibration"
    install(artifacts.good, host)
    point.mkdir()
    read_only_bind = (*PRIVATE_MOUNTS, "sh", "-c", 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"',
                      "sh", str(host), str(point))
    server = start_server(point, tmp_path / "server.log", wrapper=read_only_bind, deadline_s=180)
    try:
        before = httpx.get(f"{server.url}/v2/models/disalign", timeout=10).json()["calibration_version"]
        load_calibration(artifacts.other).save(host)  # the re-fit on the host: Calibrator.save, as `disalign fit --out` does
        r = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["changed"] is True and r.json()["previous_version"] == before
        after = httpx.get(f"{server.url}/v2/models/disalign", timeout=10).json()["calibration_version"]
        assert after == r.json()["calibration_version"] != before
    finally:
        assert server.stop() == 0, server.log.read_text()[-2000:]
