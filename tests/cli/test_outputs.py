"""Issue 21 §2: what every command does with the file it is told to write.

One rule for every output (``eval --json``, ``adapt --json``, ``fit --json``, ``predict --out``, ``extract --out``,
the PNGs of ``--plots``): a new name, or an existing regular file with ``--overwrite``. A symlink, a FIFO, a
device node or a directory is refused before any work and left as it was; ``-`` is the way to standard
output. The failure paths are made to happen (real FIFOs and symlinks); no device node is ever written —
``/dev/null`` is only looked at.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import h5py
import numpy as np
import pytest

from disalign.calib.errors import InputError
from disalign.cli import main
from tests.cli.conftest import run
from tests.conftest import REPO

EXAMPLE_MODEL = REPO / "examples" / "cifar10lt" / "cifar10lt-ir50-resnet32.ts"
EXAMPLE_CARD = REPO / "examples" / "cifar10lt" / "cifar10lt-ir50-resnet32.json"


@pytest.fixture(scope="module")
def calibration(lt_banks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "cal"
    assert main(["fit", str(lt_banks["train"]), "--method", "logit-adjust", "--val", str(lt_banks["val"]), "--out", str(out),
                 "--quiet"]) == 0
    return out


def make_target(tmp_path: Path, kind: str) -> Path:
    """A FIFO, a symlink to a file, a dangling symlink or a regular file at ``tmp_path/target.<ext>``."""
    target = tmp_path / "target.csv"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "elsewhere.txt").write_text("keep me")
        target.symlink_to(tmp_path / "elsewhere.txt")
    elif kind == "dangling":
        target.symlink_to(tmp_path / "nowhere.txt")
    elif kind == "file":
        target.write_text("keep me")
    return target


def snapshot(path: Path) -> tuple:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_ino, os.readlink(path) if path.is_symlink() else None


KIND_WORDS = {"fifo": "a FIFO", "symlink": "a symlink", "dangling": "a symlink"}


# -- the one check, in disalign.calib.files --------------------------------------------------------
def test_check_output_file_names_what_it_found(tmp_path):
    from disalign.calib.files import check_output_file, file_kind

    check_output_file(tmp_path / "new.json", "--json", overwrite=False)  # a new name
    assert file_kind("/dev/null") == "a character device"  # only looked at, never written
    with pytest.raises(InputError, match=r"^--json /dev/null is a character device; expected a regular file or a new name "
                                         r"\(use - for standard output\)\.$"):
        check_output_file(Path("/dev/null"), "--json", overwrite=True)
    with pytest.raises(InputError, match=r"--out .*target.csv is a FIFO; expected a regular file"):
        check_output_file(make_target(tmp_path, "fifo"), "--out", overwrite=True)
    (tmp_path / "target.csv").unlink()
    with pytest.raises(InputError, match=r"--out .*target.csv is a symlink; expected a regular file"):
        check_output_file(make_target(tmp_path, "dangling"), "--out", overwrite=True)
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match=r"--out .*d is a directory; expected a file name\.$"):
        check_output_file(tmp_path / "d", "--out", overwrite=True)
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(InputError, match=r"^--json .*f.json already exists; pass --overwrite to replace it\.$"):
        check_output_file(tmp_path / "f.json", "--json", overwrite=False)
    check_output_file(tmp_path / "f.json", "--json", overwrite=True)


def test_the_atomic_rename_itself_never_replaces_a_fifo_or_a_symlink(tmp_path):
    """The last line of defence, below every command: write_atomic refuses instead of renaming over them."""
    from disalign.calib.files import write_atomic

    for kind in ("fifo", "symlink"):
        target = make_target(tmp_path, kind)
        before = snapshot(target)
        with pytest.raises(InputError, match=f"is {KIND_WORDS[kind]}"):
            write_atomic(target, b"data")
        assert snapshot(target) == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))  == []
        target.unlink()


# -- every command --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling"])
def test_eval_and_adapt_json_refuse_a_fifo_or_a_symlink(kind, lt_banks, calibration, tmp_path, capsys):
    target = make_target(tmp_path, kind)
    before = snapshot(target)
    for argv in (["eval", lt_banks["test"], "--calibration", calibration, "--json", target, "--overwrite"],
                 ["adapt", lt_banks["test"], "--calibration", calibration, "--bootstrap", 0, "--json", target, "--overwrite"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), err
        assert err == (f"error: --json {target} is {KIND_WORDS[kind]}; expected a regular file or a new name "
                       "(use - for standard output).\n")
        assert snapshot(target) == before
    if kind == "symlink":
        assert (tmp_path / "elsewhere.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["eval", "adapt", "fit"])
def test_json_replaces_an_existing_file_only_with_overwrite(command, lt_banks, calibration, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("keep me")
    argv = {"eval": ["eval", lt_banks["test"], "--calibration", calibration],
            "adapt": ["adapt", lt_banks["test"], "--calibration", calibration, "--bootstrap", 0],
            "fit": ["fit", lt_banks["train"], "--method", "joint", "--out", tmp_path / "cal"]}[command]
    code, out, err = run(capsys, *argv, "--json", report)
    assert (code, out, err) == (2, "", f"error: --json {report} already exists; pass --overwrite to replace it.\n")
    assert report.read_text() == "keep me" and not (tmp_path / "cal").exists()
    code, out, err = run(capsys, *argv, "--json", report, "--overwrite")
    assert code == 0, err
    assert isinstance(json.loads(report.read_text()), dict)


def test_predict_overwrite_refuses_a_fifo_and_a_symlink(lt_banks, calibration, tmp_path, capsys):
    for kind in ("fifo", "symlink"):
        target = make_target(tmp_path, kind)
        before = snapshot(target)
        code, out, err = run(capsys, "predict", lt_banks["test"], "--calibration", calibration, "--out", target, "--overwrite")
        assert (code, out) == (2, "")
        assert err == f"error: --out {target} is {KIND_WORDS[kind]}; expected a regular file or a new name (use - for standard output).\n"
        assert snapshot(target) == before
        target.unlink()


def test_plots_never_replace_a_png_without_overwrite_nor_a_fifo_with_it(lt_banks, calibration, tmp_path, capsys):
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "per_class_accuracy.png").write_text("my own figure")
    argv = ["eval", lt_banks["test"], "--calibration", calibration, "--plots", plots, "--json", tmp_path / "r.json"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"error: --plots {plots / 'per_class_accuracy.png'} already exists; pass --overwrite to replace it.\n"
    assert (plots / "per_class_accuracy.png").read_text() == "my own figure" and not (tmp_path / "r.json").exists()
    os.mkfifo(plots / "reliability.png")
    code, out, err = run(capsys, *argv, "--overwrite")
    assert code == 2 and err == (f"error: --plots {plots / 'reliability.png'} is a FIFO; expected a regular file or a new name "
                                 "(use - for standard output).\n")
    assert stat.S_ISFIFO(os.lstat(plots / "reliability.png").st_mode) and not (tmp_path / "r.json").exists()
    (plots / "reliability.png").unlink()
    code, out, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert (plots / "per_class_accuracy.png").read_bytes().startswith(b"\x89PNG")


def tiny_images(root: Path, n: int = 4) -> Path:
    """``n`` 32x32 JPEGs under ``root`` and a list file of them with labels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        lines.append(f"{i}.jpg {i % 10}\n")
    (root / "list.txt").write_text("".join(lines))
    return root / "list.txt"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_extract_overwrite_refuses_a_fifo_and_a_symlink(kind, tmp_path, capsys):
    listing = tiny_images(tmp_path)
    target = make_target(tmp_path, kind).rename(tmp_path / "bank.h5")
    before = snapshot(target)
    code, out, err = run(capsys, "extract", "--model", EXAMPLE_MODEL, "--card", EXAMPLE_CARD, "--root", tmp_path, "--list", listing,
                         "--out", target, "--workers", 0, "--overwrite", "--quiet")
    assert (code, out) == (2, "")
    assert err == f"error: --out {target} is {KIND_WORDS[kind]}; expected a regular file or a new name (use - for standard output).\n"
    assert snapshot(target) == before


def test_extract_refuses_an_existing_bank_in_the_same_words(tmp_path, capsys):
    listing = tiny_images(tmp_path)
    (tmp_path / "bank.h5").write_text("keep me")
    code, out, err = run(capsys, "extract", "--model", EXAMPLE_MODEL, "--card", EXAMPLE_CARD, "--root", tmp_path, "--list", listing,
                         "--out", tmp_path / "bank.h5", "--workers", 0, "--quiet")
    assert (code, out, err) == (2, "", f"error: --out {tmp_path / 'bank.h5'} already exists; pass --overwrite to replace it.\n")
    assert (tmp_path / "bank.h5").read_text() == "keep me"
    code, out, err = run(capsys, "extract", "--model", EXAMPLE_MODEL, "--card", EXAMPLE_CARD, "--root", tmp_path, "--list", listing,
                         "--out", tmp_path / "bank.h5", "--workers", 0, "--quiet", "--overwrite")
    assert code == 0, err
    with h5py.File(tmp_path / "bank.h5", "r") as f:
        assert f["logits"].shape == (4, 10)
