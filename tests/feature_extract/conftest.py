"""Fixtures for the feature_extract tests: the shared CIFAR-10-LT data, unpacked once per session.

Shared data lives at ``../shared`` beside the repository (CI clones the repo with shared/ next to it),
or at ``$DISALIGN_SHARED_DIR``. The CIFAR JPEGs are unpacked to a session temp dir (or taken from
``$DISALIGN_CIFAR_DIR``) and never written into the repository.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_CARD, EXAMPLE_MODEL, REPO
from tests.conftest import SHARED as SHARED_AS_GIVEN

SHARED = SHARED_AS_GIVEN.resolve()
MODEL, CARD = EXAMPLE_MODEL, EXAMPLE_CARD  # the shared ResNet-32, embedded in the repository
LISTS = SHARED / "data" / "cifar10lt-ir50"


@pytest.fixture(scope="session")
def shared(shared_dir: Path) -> Path:
    return shared_dir.resolve()


@pytest.fixture(scope="session")
def small_lists(shared, tmp_path_factory) -> dict[str, Path]:
    """Subsets of the shared lists: train16/64/256 (first rows), val20 (every 10th row: 2 per class)."""
    out = tmp_path_factory.mktemp("lists")
    train = (LISTS / "train.txt").read_text().splitlines()
    val = (LISTS / "val.txt").read_text().splitlines()
    lists = {"train16": train[:16], "train64": train[:64], "train256": train[:256], "val20": val[::10]}
    paths = {}
    for name, lines in lists.items():
        paths[name] = out / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def load_script(path: Path):
    """torch.jit.load without the deprecation warning newer torch versions give (TorchScript is an input format)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path)).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(args: list[str], *, timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m disalign extract …`` (or any ``-m`` module) in a subprocess from the repository root."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs,
    )


def extract_args(cifar_root: Path, list_file: Path, out: Path) -> list[str]:
    """``python -m disalign extract`` arguments of the subprocess tests: small batches and chunks, 1 thread."""
    return ["-m", "disalign", "extract", "--model", str(MODEL), "--card", str(CARD), "--root", str(cifar_root),
            "--list", str(list_file), "--out", str(out), "--batch-size", "16", "--chunk-size", "32",
            "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="session")
def reference256(cifar_root, small_lists, tmp_path_factory) -> Path:
    """An uninterrupted single-process bank of the first 256 training rows."""
    out = tmp_path_factory.mktemp("reference") / "train256.h5"
    proc = run_module([*extract_args(cifar_root, small_lists["train256"], out), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return out
