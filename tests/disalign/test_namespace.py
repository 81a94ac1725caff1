"""One import name: the distribution installs ``disalign`` and nothing else, so a user's own ``calib/``,
``service/`` or ``feature_extract/`` folder can neither shadow it nor be shadowed by it.

Both installs are checked in a subprocess started from a folder that holds such user packages: the
editable one of the development environment and a regular wheel built from this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

USER_PACKAGES = ("calib", "service", "feature_extract")
# Imported from the user's folder: the user's packages win for their own names, ours live under disalign.
PROBE = """
import importlib.util, json, sys
import calib, service, feature_extract
import numpy as np
import disalign
from disalign.calib.data.synthetic import write_synthetic_bank
train = write_synthetic_bank("train.h5", np.array([60, 30, 12]), feature_dim=8, seed=0)
val = write_synthetic_bank("val.h5", np.array([60, 30, 12]), rows_per_class=np.full(3, 10), feature_dim=8, seed=1)
est = disalign.DisAlign(rho=1.0, epochs=2).fit(str(train), val=str(val))
est.save("calib-out")
print(json.dumps({
    "user": [m.WHO for m in (calib, service, feature_extract)],
    "ours": disalign.__file__,
    "calib": disalign.calib.__file__,
    "fitted": disalign.load_calibration("calib-out").method,
}))
"""


def user_folder(tmp_path: Path) -> Path:
    """A working folder with the user's own packages named like our repository folders."""
    for name in USER_PACKAGES:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    return tmp_path


def run_probe(cwd: Path, code: str, *, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def installed_top_level(pythonpath: str | None, cwd: Path) -> str:
    """Which of the repository folder names the environment itself can import, run from an empty folder."""
    code = ("import importlib.util, json; print(json.dumps({n: importlib.util.find_spec(n) is not None "
            f"for n in {USER_PACKAGES!r}}}))")
    result = run_probe(cwd, code, pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def check_install(tmp_path: Path, *, pythonpath: str | None = None, expect_root: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert installed_top_level(pythonpath, empty) == '{"calib": false, "service": false, "feature_extract": false}'
    folder = user_folder(tmp_path / "work")
    result = run_probe(folder, PROBE, pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["user"] == ["user calib", "user service", "user feature_extract"]
    assert Path(seen["ours"]).is_relative_to(expect_root) and Path(seen["calib"]).is_relative_to(expect_root)
    assert seen["fitted"] == "disalign"


def test_the_development_install_imports_only_disalign(tmp_path):
    check_install(tmp_path, expect_root=REPO)


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    # built from a copy of the sources: a build/ folder left in the checkout must not leak stale files in
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for folder in ("disalign", "calib", "feature_extract", "service"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    if build.returncode != 0 and "No module named" in build.stderr and "setuptools" in build.stderr:
        pytest.skip("setuptools is not installed in this environment: the wheel cannot be built offline")
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("disalign-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"disalign"}
    for module in ("disalign/calib/core/head.py", "disalign/feature_extract/extract.py", "disalign/service/main.py",
                   "disalign/cli/__init__.py"):
        assert module in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # a pure-Python wheel installs by unpacking it
        zf.extractall(site)
    check_install(tmp_path, pythonpath=str(site), expect_root=site)
