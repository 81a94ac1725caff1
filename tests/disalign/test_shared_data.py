"""Issue 21 §5: a clone without the shared data. Outside CI: one line up front, the data-free tests run and
the rest are skipped with one reason, counted once; with CI=true: one immediate error (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

SUBSET = ["tests/disalign/test_package.py", "-k", "embedded_demo_model or every_public_name"]  # one needs shared/, one not


def pytest_without_shared_data(tmp_path, *argv: str, ci: bool) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env |= {"DISALIGN_SHARED_DIR": str(tmp_path / "no-shared"), "PYTHONPATH": str(REPO), **({"CI": "true"} if ci else {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_outside_ci_the_data_free_part_runs_and_the_rest_is_skipped_with_one_reason(tmp_path):
    result = pytest_without_shared_data(tmp_path, *SUBSET, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    reason = f"the shared data directory {tmp_path / 'no-shared'} is missing: put shared/ beside the repository or set DISALIGN_SHARED_DIR"
    lines = result.stdout.splitlines()
    assert lines[0].startswith(reason) and lines[0].endswith("; the tests that need it are skipped.")  # up front
    assert [line for line in lines if line.startswith("SKIPPED")] == [f"SKIPPED [1] tests/conftest.py:{skip_line()}: {reason} (README, 'Tests')"]
    assert "1 passed, 1 skipped" in lines[-1]


def test_in_ci_missing_shared_data_is_one_immediate_error(tmp_path):
    result = pytest_without_shared_data(tmp_path, "tests/disalign", ci=True)
    assert result.returncode == 4  # pytest's usage error: nothing was collected or run
    assert result.stderr.strip() == (f"ERROR: CI=true and the shared data directory {tmp_path / 'no-shared'} is missing: put shared/ "
                                     "beside the repository or set DISALIGN_SHARED_DIR (README, 'Tests').")
    assert "passed" not in result.stdout


def skip_line() -> int:
    text = (REPO / "tests" / "conftest.py").read_text().splitlines()
    return next(i for i, line in enumerate(text, start=1) if "pytest.skip(SHARED_REASON)" in line)
