"""Inputs built to break a reader (issue 21 §3), in every command that reads them: a calibration.json or a bank
attribute nested 100,000 levels deep, a FIFO inside a published version, a prior file nested as deep. Each is
one ``error:`` sentence and exit status 2 — no RecursionError traceback, no command waiting for ever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from disalign.calib.artifact.publish import artifact_dir
from disalign.cli import main
from tests.conftest import REPO

NESTED = "[" * 100_000 + "]" * 100_000
TOO_DEEP = "is nested deeper than 32 levels (JSON arrays and objects)."


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def calibration(lt_banks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "calibration"
    assert main(["fit", str(lt_banks["train"]), "--method", "logit-adjust", "--val", str(lt_banks["val"]), "--out", str(out),
                 "--quiet"]) == 0
    return out


@pytest.fixture
def nested_calibration(calibration: Path, tmp_path: Path) -> Path:
    """A copy of the calibration whose calibration.json nests 100,000 arrays in its report."""
    copy = tmp_path / "nested"
    copy.mkdir()
    for name in ("calibration.json", "parameters.safetensors"):  # the flat layout, which every reader accepts
        (copy / name).write_bytes((artifact_dir(calibration) / name).read_bytes())
    meta = (copy / "calibration.json").read_text()
    (copy / "calibration.json").write_text(meta.replace('"report": {', '"report": {"deep": ' + NESTED + ", ", 1))
    return copy


@pytest.fixture
def nested_bank(lt_banks, tmp_path: Path) -> Path:
    """The test bank with a class_names attribute nested 100,000 levels deep."""
    bank = tmp_path / "nested.h5"
    bank.write_bytes(Path(lt_banks["test"]).read_bytes())
    with h5py.File(bank, "r+") as f:
        f.attrs["class_names"] = NESTED
    return bank


def commands(bank: Path, calibration: Path, out: Path) -> dict[str, list]:
    return {"eval": ["eval", bank, "--calibration", calibration, "--quiet"],
            "predict": ["predict", bank, "--calibration", calibration, "--out", out / "p.csv", "--quiet"],
            "adapt": ["adapt", bank, "--calibration", calibration, "--bootstrap", 0, "--quiet"]}


@pytest.mark.parametrize("command", ["eval", "predict", "adapt"])
def test_a_deeply_nested_calibration_json_is_one_sentence(command, lt_banks, nested_calibration, tmp_path, capsys):
    code, err = run(capsys, *commands(lt_banks["test"], nested_calibration, tmp_path)[command])
    assert code == 2 and err.startswith("error: ") and err.strip().endswith(f"calibration.json {TOO_DEEP}"), err
    assert "Traceback" not in err and "RecursionError" not in err


@pytest.mark.parametrize("command", ["eval", "predict", "adapt", "fit"])
def test_a_deeply_nested_bank_attribute_is_one_sentence(command, nested_bank, calibration, tmp_path, capsys):
    argv = (["fit", nested_bank, "--method", "joint", "--out", tmp_path / "cal", "--quiet"] if command == "fit"
            else commands(nested_bank, calibration, tmp_path)[command])
    code, err = run(capsys, *argv)
    assert code == 2 and err.strip() == f"error: {nested_bank}: attribute 'class_names' {TOO_DEEP}", err
    assert not (tmp_path / "cal").exists() and not (tmp_path / "p.csv").exists()  # nothing half-written


def test_a_deeply_nested_prior_file_is_one_sentence(lt_banks, calibration, tmp_path, capsys):
    (tmp_path / "prior.json").write_text(NESTED)
    code, err = run(capsys, "eval", lt_banks["test"], "--calibration", calibration, "--target-prior", tmp_path / "prior.json", "--quiet")
    assert code == 2 and err.strip() == f"error: prior file {tmp_path / 'prior.json'} {TOO_DEEP}", err


@pytest.mark.parametrize("name", ["calibration.json", "parameters.safetensors"])
def test_eval_on_a_version_with_a_fifo_refuses_without_waiting(name, lt_banks, calibration, tmp_path):
    copy = tmp_path / "fifo"
    subprocess.run(["cp", "-a", str(calibration), str(copy)], check=True)
    version = artifact_dir(copy)
    (version / name).unlink()
    os.mkfifo(version / name)  # nothing writes to it: a plain read waits for ever
    result = subprocess.run([sys.executable, "-m", "disalign", "eval", str(lt_banks["test"]), "--calibration", str(copy), "--quiet"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {version / name} should be a regular file, found a FIFO.", result.stderr
