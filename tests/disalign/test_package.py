"""The ``disalign`` package: version, the public API re-exported lazily, packaging metadata."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

import calib
import disalign
from tests.conftest import REPO


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_public_name_is_the_object_of_its_home_module():
    assert disalign.__version__ == calib.__version__
    for name, module in disalign._EXPORTS.items():
        assert getattr(disalign, name) is getattr(importlib.import_module(module), name), name
    assert set(disalign.__all__) == {"__version__", *disalign._EXPORTS} and set(disalign.__all__) <= set(dir(disalign))
    from calib.disalign import DisAlign
    from calib.methods import load_calibration

    assert disalign.DisAlign is DisAlign and disalign.load_calibration is load_calibration
    with pytest.raises(AttributeError, match="module 'disalign' has no attribute 'nope'"):
        disalign.nope  # noqa: B018


def test_import_is_light():
    # the command line's --help and --version must not wait for torch
    assert python("import sys, disalign, disalign.cli; print(sorted(m for m in ('torch', 'numpy', 'h5py') if m in sys.modules))") == "[]"
    assert python("import sys, disalign; disalign.DisAlign; print('torch' in sys.modules)") == "True"


def test_packaging_installs_the_disalign_package_and_its_command():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"disalign": "disalign.cli:main"}
    assert "disalign*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "calib.__version__"}
    assert "scikit-learn>=1.3" in project["project"]["optional-dependencies"]["test"]
    assert not any(d.startswith("scikit-learn") for d in project["project"]["dependencies"])  # a test dependency only
