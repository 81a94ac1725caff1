"""deploy/build_image.py without building: pip's sources turned into build arguments and read-only mounts,
the local CPU torch wheel, and the exit status 3 (the image tests skip on it) for an unreachable source."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "deploy" / "build_image.py"
_spec = importlib.util.spec_from_file_location("build_image", SCRIPT)
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)


def test_pip_sources_become_build_arguments_and_mounts(tmp_path: Path):
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("")
    pip = {"find-links": str(wheels), "extra-index-url": f"file://{index} https://example.invalid/simple",
           "cert": str(cert), "default-timeout": "180"}
    args, mounts = build_image.pip_build_arguments(pip)
    assert args == [f"PIP_FIND_LINKS={wheels}", f"PIP_EXTRA_INDEX_URL=file://{index} https://example.invalid/simple",
                    f"PIP_CERT={cert}"]
    # An index .../simple links its wheels as ../../files/x.whl: its parent is mounted; remote URLs are not.
    assert mounts == [wheels, tmp_path / "pypi", cert]


def test_local_cpu_torch_wheel(tmp_path: Path):
    assert build_image.local_cpu_torch({"find-links": str(tmp_path)}) is None
    (tmp_path / "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")  # a CUDA build: not taken
    assert build_image.local_cpu_torch({"find-links": str(tmp_path)}) is None
    (tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    assert build_image.local_cpu_torch({"find-links": f"https://example.invalid/wheels {tmp_path}"}) == "2.13.0+cpu"


@pytest.mark.skipif(shutil.which("buildah") is None or shutil.which("debootstrap") is None,
                    reason="buildah and debootstrap are not installed (.ci/run installs them with apt-get)")
def test_an_unreachable_mirror_exits_3_with_the_reason():
    mirror = "http://127.0.0.1:9/debian"  # the discard port: nothing listens
    result = subprocess.run([sys.executable, str(SCRIPT), "--rebuild-base", "--base", "localhost/disalign-base:unused",
                             "--mirror", mirror], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3
    assert result.stderr.startswith(f"error: the Debian mirror {mirror}/dists/bookworm/Release cannot be reached")
