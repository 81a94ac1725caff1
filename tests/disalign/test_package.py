"""The ``disalign`` package: version, the public API re-exported lazily, packaging metadata."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import disalign
import disalign.calib
from tests.conftest import REPO


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_public_name_is_the_object_of_its_home_module():
    assert disalign.__version__ == disalign.calib.__version__
    for name, module in disalign._EXPORTS.items():
        assert getattr(disalign, name) is getattr(importlib.import_module(module), name), name
    assert set(disalign.__all__) == {"__version__", *disalign._EXPORTS} and set(disalign.__all__) <= set(dir(disalign))
    from disalign.calib.estimators.disalign import DisAlign
    from disalign.calib.estimators.methods import load_calibration

    assert disalign.DisAlign is DisAlign and disalign.load_calibration is load_calibration
    with pytest.raises(AttributeError, match="module 'disalign' has no attribute 'nope'"):
        disalign.nope  # noqa: B018


def test_every_method_class_is_exported_under_its_class_name():
    """Issue 21 §5: TDE, one of the eight methods, was missing from ``import disalign``."""
    from disalign.calib.estimators.methods import METHODS

    for name in METHODS:
        cls = disalign.method_class(name)
        assert getattr(disalign, cls.__name__) is cls, f"disalign.{cls.__name__} ({name})"


def test_import_is_light():
    # the command line's --help and --version must not wait for torch
    assert python("import sys, disalign, disalign.cli; print(sorted(m for m in ('torch', 'numpy', 'h5py') if m in sys.modules))") == "[]"
    assert python("import sys, disalign; disalign.DisAlign; print('torch' in sys.modules)") == "True"


def test_packaging_installs_the_disalign_package_and_its_command():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"disalign": "disalign.cli:main"}
    packages = project["tool"]["setuptools"]["packages"]
    assert all(name == "disalign" or name.startswith("disalign.") for name in packages)  # one import name
    assert project["tool"]["setuptools"]["package-dir"] == {"disalign": "disalign", "disalign.calib": "calib",
                                                             "disalign.feature_extract": "feature_extract", "disalign.service": "service"}
    # every package folder of the repository is listed (a new sub-package that is not would be left out of the wheel)
    folders = {p.parent for root in ("disalign", "calib", "feature_extract", "service") for p in (REPO / root).rglob("__init__.py")}
    listed = set()
    for name in packages:
        parts = name.split(".")
        for prefix, folder in sorted(project["tool"]["setuptools"]["package-dir"].items(), key=lambda kv: -len(kv[0])):
            if name == prefix or name.startswith(prefix + "."):
                listed.add(REPO / folder / Path(*parts[len(prefix.split(".")):]))
                break
    assert listed == folders
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "disalign.calib.__version__"}
    extras = project["project"]["optional-dependencies"]
    assert "scikit-learn>=1.6" in extras["test"] and extras["sklearn"] == ["scikit-learn>=1.6"]  # __sklearn_tags__ (1.6)
    for heavy in ("scikit-learn", "timm", "transformers"):  # optional extras (and test dependencies), never required
        assert not any(d.startswith(heavy) for d in project["project"]["dependencies"])
        assert any(d.startswith(heavy) for d in extras["test"])
    assert extras["timm"] == ["timm>=1.0"] and extras["hf"] == ["transformers>=4.56"]


def test_the_embedded_demo_model_is_the_shared_one(shared_dir):
    """tests/conftest.py's EXAMPLE_MODEL / EXAMPLE_CARD stand in for the shared ResNet-32 in data-free tests."""
    from tests.conftest import EXAMPLE_CARD, EXAMPLE_MODEL

    for embedded in (EXAMPLE_MODEL, EXAMPLE_CARD):
        assert embedded.read_bytes() == (shared_dir / "models" / embedded.name).read_bytes(), embedded.name
