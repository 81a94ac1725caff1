"""``disalign predict``: per-row top-k in CSV, JSON Lines and HDF5 that agree with the estimator, the path
column from the list, refusals before any work, and nothing half-written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from disalign.calib.data.bank import write_bank
from disalign.calib.estimators.methods import load_calibration
from disalign.cli import main
from tests.conftest import REPO

K = 10


@pytest.fixture(scope="module")
def setup(lt_banks, tmp_path_factory):
    """A calibration fitted on the synthetic train bank, the test bank's arrays and a list file for it."""
    root = tmp_path_factory.mktemp("predict")
    assert main(["fit", str(lt_banks["train"]), "--rho", "1", "--epochs", "1", "--out", str(root / "cal"), "--quiet"]) == 0
    with h5py.File(lt_banks["test"], "r") as f:
        arrays = {name: f[name][...] for name in ("features", "logits", "labels", "sample_index")}
    list_file = root / "test.txt"
    list_file.write_text("# image label\n" + "".join(f"img/{i:05d}.jpg {y}\n" for i, y in enumerate(arrays["labels"])))
    return {"cal": root / "cal", "list": list_file, **arrays}


def expected_top(setup, k):
    """Top-k (labels, probabilities) of the calibrated and of the raw probabilities, from the Python API (numpy in)."""
    probabilities = load_calibration(setup["cal"]).predict_proba(setup["features"], setup["logits"])
    assert isinstance(probabilities, np.ndarray)
    raw = np.exp(setup["logits"] - setup["logits"].max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    tops = []
    for p in (probabilities, raw):
        order = np.argsort(-p, axis=1, kind="stable")[:, :k]
        tops.append((order, np.take_along_axis(p, order, axis=1)))
    return tops


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_csv_has_every_row_with_path_topk_and_stage1(lt_banks, setup, tmp_path, capsys):
    out = tmp_path / "p.csv"
    code, _, err = run(capsys, "predict", lt_banks["test"], "--calibration", setup["cal"], "--out", out, "--top-k", 3,
                       "--stage1", "--list", setup["list"])
    assert code == 0, err
    assert err == f"note: wrote 2000 rows of disalign predictions (top 3) to {out}\n"
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    header = ["row", "sample_index", "view", "true_index", "true_label", "path"] + [
        f"{p}top{i}_{c}" for p in ("", "stage1_") for i in (1, 2, 3) for c in ("label", "index", "probability")]
    assert list(rows[0]) == header and len(rows) == 2000
    (labels, probabilities), (raw_labels, raw_probabilities) = expected_top(setup, 3)
    for j in (0, 1, 777, 1999):
        row = rows[j]
        assert int(row["row"]) == j and int(row["sample_index"]) == setup["sample_index"][j]
        assert int(row["true_index"]) == setup["labels"][j] and row["true_label"] == f"class_{setup['labels'][j]}"
        assert row["path"] == f"img/{setup['sample_index'][j]:05d}.jpg"
        for i in range(3):
            assert int(row[f"top{i + 1}_index"]) == labels[j, i] and row[f"top{i + 1}_label"] == f"class_{labels[j, i]}"
            assert float(row[f"top{i + 1}_probability"]) == pytest.approx(probabilities[j, i], rel=1e-5)
            assert int(row[f"stage1_top{i + 1}_index"]) == raw_labels[j, i]
            assert float(row[f"stage1_top{i + 1}_probability"]) == pytest.approx(raw_probabilities[j, i], rel=1e-4)
    top1 = np.array([int(r["top1_index"]) for r in rows])
    assert np.array_equal(top1, labels[:, 0])


def test_jsonl_and_hdf5_hold_the_same_predictions(lt_banks, setup, tmp_path, capsys):
    (labels, probabilities), (raw_labels, _) = expected_top(setup, K)
    code, _, err = run(capsys, "predict", lt_banks["test"], "--calibration", setup["cal"], "--out", tmp_path / "p.jsonl",
                       "--top-k", 50, "--quiet")  # more than K: K classes
    assert (code, err) == (0, "")
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == 2000 and set(records[0]) == {"row", "sample_index", "view", "true_index", "true_label", "top_k"}  # no --list: no path
    assert [t["index"] for t in records[5]["top_k"]] == labels[5].tolist()
    assert [t["label"] for t in records[5]["top_k"]] == [f"class_{c}" for c in labels[5]]
    assert np.allclose([t["probability"] for t in records[5]["top_k"]], probabilities[5], atol=1e-6)
    code, _, err = run(capsys, "predict", lt_banks["test"], "--calibration", setup["cal"], "--out", tmp_path / "p.h5", "--top-k", 2,
                       "--stage1", "--list", setup["list"], "--quiet")
    assert (code, err) == (0, "")
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert json.loads(f.attrs["class_names"]) == [f"class_{i}" for i in range(K)] and f.attrs["top_k"] == 2
        assert np.array_equal(f["top_k_indices"][...], labels[:, :2]) and np.array_equal(f["stage1_top_k_indices"][...], raw_labels[:, :2])
        assert np.array_equal(f["true_index"][...], setup["labels"]) and "label" not in f
        assert np.allclose(f["top_k_probabilities"][...], probabilities[:, :2], atol=1e-6)
        assert np.array_equal(f["row"][...], np.arange(2000)) and f["path"][7].decode() == "img/00007.jpg"


def test_one_vocabulary_with_the_server_index_label_probability(lt_banks, setup, tmp_path, capsys):
    """Issue 21 §5: the CLI said label = index and name = class, the server label = class and index = index."""
    from disalign.service.schemas import Prediction

    unlabelled = write_bank(tmp_path / "u.h5", setup["features"][:3], setup["logits"][:3], np.full(3, -1),
                            class_names=[f"class_{i}" for i in range(K)], model_fingerprint="sha256:synthetic-1234-10-32")
    code, _, err = run(capsys, "predict", unlabelled, "--calibration", setup["cal"], "--out", tmp_path / "p.jsonl", "--top-k", 2,
                       "--stage1", "--quiet")
    assert code == 0, err
    record = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert list(record["top_k"][0]) == list(record["stage1_top_k"][0]) == list(Prediction.model_fields) == ["label", "index", "probability"]
    assert record["top_k"][0]["label"] == f"class_{record['top_k'][0]['index']}"
    assert (record["true_index"], record["true_label"]) == (-1, None)


def test_the_bank_source_attribute_is_data_never_a_file_to_open(lt_banks, setup, tmp_path, capsys):
    """Issue 21 §2: `source` named a list file that predict read, so any local file's first fields became the path column."""
    bank = tmp_path / "bank.h5"
    bank.write_bytes(lt_banks["test"].read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("".join(f"password{i} x\n" for i in range(2000)))
    with h5py.File(bank, "r+") as f:
        f.attrs["source"] = str(secret)
    code, _, err = run(capsys, "predict", bank, "--calibration", setup["cal"], "--out", tmp_path / "p.jsonl", "--top-k", 1)
    assert code == 0, err
    assert err.splitlines()[0] == (f"note: no path column: the bank records its source list as {str(secret)!r}, which is not "
                                   f"opened unless you pass it (--list {secret}).")
    assert "path" not in json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])
    assert "password" not in (tmp_path / "p.jsonl").read_text()
    code, _, err = run(capsys, "predict", bank, "--calibration", setup["cal"], "--out", tmp_path / "q.jsonl", "--top-k", 1,
                       "--list", setup["list"])
    assert code == 0, err
    assert json.loads((tmp_path / "q.jsonl").read_text().splitlines()[-1])["path"] == "img/01999.jpg"  # the user's list: read


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("extension", "error: --out should end in one of .csv, .jsonl, .ndjson, .h5, .hdf5, found 'p.txt'.\n"),
        ("exists", "error: --out {out} already exists; pass --overwrite to replace it.\n"),
        ("top_k", "error: --top-k should be >= 1, found 0.\n"),
        ("short_list", "error: --list {short} has 3 rows but the bank refers to row 1999.\n"),
        ("nan_row", "error: {nan}: dataset 'logits' has NaN or inf values in row 1500.\n"),
        ("k_mismatch", "error: the calibration has K=10 classes but the bank {k5} has K=5.\n"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_half_written(case, message, lt_banks, setup, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a.jpg\nb.jpg\nc.jpg\n")
    nan = tmp_path / "nan.h5"
    nan.write_bytes(lt_banks["test"].read_bytes())
    with h5py.File(nan, "r+") as f:
        f["logits"][1500, 3] = np.nan  # in the second block: the first block was already written to the temporary file
    k5 = write_bank(tmp_path / "k5.h5", setup["features"][:4], setup["logits"][:4, :5], np.arange(4) % 5)
    out = tmp_path / ("p.txt" if case == "extension" else "p.csv")
    if case == "exists":
        out.write_text("keep me")
    argv = {"extension": [], "exists": [], "top_k": ["--top-k", 0], "short_list": ["--list", short], "nan_row": [], "k_mismatch": []}[case]
    bank = {"nan_row": nan, "k_mismatch": k5}.get(case, lt_banks["test"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, out_text, err = run(capsys, "predict", bank, "--calibration", setup["cal"], "--out", out, *argv)
    assert (code, out_text) == (2, "")
    assert err == message.format(out=out, short=short, nan=nan, k5=k5)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no output, no temporary file


def test_console_entry_point(lt_banks, setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "disalign", "predict", str(lt_banks["test"]), "--calibration", str(setup["cal"]),
                             "--out", str(tmp_path / "p.ndjson"), "--top-k", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "p.ndjson").read_text().splitlines()) == 2000
