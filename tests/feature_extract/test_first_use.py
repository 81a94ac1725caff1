"""Issue 21 §5: what a new user of ``disalign extract`` hits first — a list that matches no image, a one-class
model, the default number of workers, resuming a randomly initialised factory model, the progress bar.

Data-free: a few JPEGs made here and the embedded demo model (the shared ResNet-32, byte for byte).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from disalign.cli import main
from tests.conftest import EXAMPLE_CARD, EXAMPLE_MODEL


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def images(root: Path, n: int = 6) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    return [f"{i}.jpg" for i in range(n)]


def extract(capsys, root: Path, listing: Path, *extra, model=EXAMPLE_MODEL):
    card = ["--card", EXAMPLE_CARD] if model == EXAMPLE_MODEL else ["--no-resize", "--crop", "32"]
    return run(capsys, "extract", "--model", model, *card, "--root", root, "--list", listing, "--out", root / "bank.h5",
               "--workers", 0, "--quiet", *extra)


def test_a_list_that_matches_no_image_writes_no_bank(tmp_path, capsys):
    names = images(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name},{i}\n" for i, name in enumerate(names)))  # comma-separated: one field per line
    code, out, err = extract(capsys, tmp_path, listing)
    assert (code, out) == (2, "")
    assert err == (f"error: none of the 6 images of --list {listing} exists under --root {tmp_path} (the first is '0.jpg,0'); "
                   "expected lines 'relative/path [label]' separated by whitespace.\n")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jpg")) == ["list.txt"]  # no bank, no parts


def test_images_none_of_which_decode_write_no_bank(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("not a JPEG")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{i}.jpg {i}\n" for i in range(3)))
    code, out, err = extract(capsys, tmp_path, listing)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: none of the 3 images of {listing} could be decoded (all skipped, the first: list row 0 (0.jpg): "), err
    assert err.endswith("); no bank was written.\n") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jpg")) == ["list.txt"]


def test_a_one_class_model_is_refused_before_the_work(tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name}\n" for name in images(tmp_path)))
    code, out, err = extract(capsys, tmp_path, listing, model="tests.feature_extract.factories:one_class")
    assert (code, out) == (2, "")
    assert err == ("error: --model tests.feature_extract.factories:one_class has K=1 output class; a bank needs K >= 2 classes "
                   "(a calibration balances classes against each other).\n")
    assert not (tmp_path / "bank.h5").exists() and not (tmp_path / "bank.h5.parts").exists()


def test_banks_of_one_class_are_refused_by_the_writer_and_the_reader(tmp_path):
    import h5py

    from disalign.calib.data.bank import BankWriter, load_bank, write_bank
    from disalign.calib.errors import BankError

    with pytest.raises(BankError, match=r"^class_names has 1 class; a bank needs K >= 2 classes"):
        BankWriter(tmp_path / "one.h5", feature_dim=4, class_names=["only"])
    assert list(tmp_path.iterdir()) == []
    path = write_bank(tmp_path / "two.h5", np.zeros((2, 4)), np.zeros((2, 2)), [0, 1])
    with h5py.File(path, "r+") as f:  # a one-class bank from elsewhere: K = 1 logits column
        for name in ("logits",):
            data = f[name][:, :1]
            del f[name]
            f.create_dataset(name, data=data, maxshape=(None, 1), chunks=True)
        f.attrs["class_names"] = '["only"]'
    with pytest.raises(BankError, match=r"two.h5: the logits have K=1 column; a bank needs K >= 2 classes"):
        load_bank(path)


def test_workers_default_to_the_cores_available(tmp_path):
    from disalign.cli import build_parser
    from disalign.cli.extract import config_from_args

    args = build_parser().parse_args(["extract", "--model", "m.ts", "--folder", str(tmp_path), "--out", "b.h5"])
    assert args.workers is None
    assert config_from_args(args).workers == len(os.sched_getaffinity(0))
    help_text = build_parser()._subparsers._group_actions[0].choices["extract"].format_help()
    assert "the cores available to this process" in " ".join(help_text.split())


def test_resuming_a_randomly_initialised_factory_says_what_to_do(tmp_path, capsys):
    names = images(tmp_path, 4)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name} 1\n" for name in names) + "broken.jpg 1\n")
    (tmp_path / "broken.jpg").write_text("not a JPEG")
    factory = "tests.feature_extract.factories:RandomInit"
    argv = ["--chunk-size", 4, "--batch-size", 4, "--strict"]
    code, _, err = extract(capsys, tmp_path, listing, *argv, model=factory)
    assert code == 2 and "--strict stops at the first bad image" in err and (tmp_path / "bank.h5.parts").is_dir()  # chunk 0 is kept
    code, out, err = extract(capsys, tmp_path, listing, *argv, model=factory)
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {tmp_path / 'bank.h5.parts'} holds an unfinished extraction of another model: --model {factory} "
                          "has no --weights, so its parameters are a new random initialisation on every run (model_fingerprint: "), err
    assert err.endswith(f"pass --weights (a state_dict) to make the extraction resumable, or delete {tmp_path / 'bank.h5.parts'} "
                        "to start over.\n")


def test_the_progress_bar_says_what_it_counts(tmp_path):
    from tests.cli.test_fit_and_eval import run_with_terminal_stderr

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name} 0\n" for name in images(tmp_path, 3)))
    code, terminal = run_with_terminal_stderr("extract", "--model", EXAMPLE_MODEL, "--card", EXAMPLE_CARD, "--root", tmp_path,
                                              "--list", listing, "--out", tmp_path / "bank.h5", "--workers", 0)
    assert code == 0, terminal
    assert "extract bank.h5: 100%" in terminal and "3/3" in terminal, terminal
