"""Fixtures shared by all test packages: the shared real data and small synthetic banks.

The shared data (``../shared`` beside the repository, or ``$DISALIGN_SHARED_DIR``; the README says where it
comes from) is checked once, up front. When it is missing, the tests that need it — every test that
requests the ``shared_dir`` fixture, directly or through another fixture, or carries the ``shared_data``
mark — are skipped with one reason, printed once, and the rest of the suite runs; with ``CI=true`` a
missing shared directory is one immediate error instead, since CI must run everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from disalign.calib.data.synthetic import write_synthetic_bank

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it; a developer checkout has it at ../shared as well.
SHARED = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO.parent / "shared"))
SHARED_MISSING = not (SHARED / "models").is_dir()
SHARED_REASON = (f"the shared data directory {SHARED} is missing: put shared/ beside the repository or set "
                 "DISALIGN_SHARED_DIR (README, 'Tests')")
# The embedded demo model and card: byte for byte the shared cifar10lt-ir50-resnet32.{ts,json}
# (tests/disalign/test_package.py checks it), so the tests that need only the model run without shared/.
EXAMPLE_MODEL = REPO / "examples" / "cifar10lt" / "cifar10lt-ir50-resnet32.ts"
EXAMPLE_CARD = REPO / "examples" / "cifar10lt" / "cifar10lt-ir50-resnet32.json"
LT_COUNTS = (5000 * (1 / 50) ** (np.arange(10) / 9)).astype(np.int64)  # CIFAR-10-LT IR50 shape


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data: needs the shared data directory (skipped when it is missing)")
    if SHARED_MISSING and in_ci():
        raise pytest.UsageError(f"CI=true and {SHARED_REASON}.")


def pytest_sessionstart(session: pytest.Session) -> None:
    # one line up front, even under -q (which hides the report header)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if SHARED_MISSING and reporter is not None:
        reporter.write_line(f"{SHARED_REASON}; the tests that need it are skipped.", yellow=True)


def needs_shared_data(item: pytest.Item) -> bool:
    return "shared_dir" in getattr(item, "fixturenames", ()) or item.get_closest_marker("shared_data") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # raised here, before any fixture, and always from this line: `-ra` folds every such skip into one line
    if SHARED_MISSING and needs_shared_data(item):
        pytest.skip(SHARED_REASON)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.fail(f"the shared data directory {SHARED} is missing; set DISALIGN_SHARED_DIR")
    return SHARED


@pytest.fixture(scope="session")
def lt_banks(tmp_path_factory) -> dict[str, Path]:
    """Synthetic CIFAR-10-LT-shaped train / val / test banks (K=10, d=32) sharing one 'model'."""
    root = tmp_path_factory.mktemp("lt_banks")
    counts = LT_COUNTS // 10  # 500 … 10 rows: small but still long-tailed (IR50)
    return {
        "train": write_synthetic_bank(root / "train.h5", counts, feature_dim=32, seed=0, separation=1.5),
        "val": write_synthetic_bank(root / "val.h5", counts, rows_per_class=np.full(10, 30), feature_dim=32, seed=1, separation=1.5),
        "test": write_synthetic_bank(root / "test.h5", counts, rows_per_class=np.full(10, 200), feature_dim=32, seed=2, separation=1.5),
    }


@pytest.fixture(scope="session")
def cifar_root(shared_dir, tmp_path_factory) -> Path:
    """Directory with the shared CIFAR-10 JPEGs (train/, test/), unpacked once per session — never into the
    repository — or taken from ``$DISALIGN_CIFAR_DIR``."""
    given = os.environ.get("DISALIGN_CIFAR_DIR")
    if given and (Path(given) / "test").is_dir():
        return Path(given)
    root = tmp_path_factory.mktemp("cifar10")
    archive = shared_dir / "data" / "cifar10-jpeg.tar.gz"
    if shutil.which("tar"):  # ~10x faster than tarfile for 60,000 small files
        subprocess.run(["tar", "xzf", str(archive), "-C", str(root)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def real_cifar_banks(shared_dir, cifar_root, tmp_path_factory) -> dict[str, Path]:
    """The CIFAR-10-LT IR50 train/val/test banks extracted from scratch by `disalign extract` with the shared
    stage-1 ResNet-32 (about 24,000 images; shared by every slow end-to-end test of the session)."""
    from disalign.cli import main

    out = tmp_path_factory.mktemp("real_cifar_banks")
    lists = shared_dir / "data" / "cifar10lt-ir50"
    banks: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        banks[split] = out / f"{split}.h5"
        argv = ["extract", "--model", str(shared_dir / "models" / "cifar10lt-ir50-resnet32.ts"),
                "--card", str(shared_dir / "models" / "cifar10lt-ir50-resnet32.json"), "--root", str(cifar_root),
                "--list", str(lists / f"{split}.txt"), "--out", str(banks[split]), "--workers", "1", "--quiet"]
        if split != "train":
            argv += ["--class-counts-from", str(banks["train"])]
        if main(argv) != 0:
            pytest.fail(f"disalign extract failed for the {split} split")
    return banks
