"""The `disalign fit` / `disalign eval` contract: outputs, and one-sentence errors with exit code 2."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from calib.bank import write_bank
from calib.cli import main, parse_bytes


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_then_eval_all_methods(lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], "--val", lt_banks["val"], "--epochs", 2, "--out", tmp_path / "cal")
    assert code == 0, err
    assert "wrote disalign calibration" in out and (tmp_path / "cal" / "calibration.json").exists()
    code, out, err = run(capsys, "eval", lt_banks["test"], "--calibration", tmp_path / "cal", "--train", lt_banks["train"],
                         "--val", lt_banks["val"], "--json", tmp_path / "r.json", "--plots", tmp_path / "plots")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["methods"]) == ["joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm"]
    for name, metrics in report["methods"].items():
        assert set(metrics) == {"accuracy", "mean_class_accuracy", "many", "medium", "few", "ece", "nll"}, name
        assert 0 <= metrics["mean_class_accuracy"] <= 1
    assert report["methods"]["disalign"]["mean_class_accuracy"] > report["methods"]["joint"]["mean_class_accuracy"]
    for name in report["methods"]:
        assert name in out  # one table with every method
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 3


def test_fit_baseline_method_and_eval_without_train(lt_banks, tmp_path, capsys):
    code, _, err = run(capsys, "fit", lt_banks["train"], "--method", "logit-adjust", "--val", lt_banks["val"], "--out", tmp_path / "la")
    assert code == 0, err
    code, out, err = run(capsys, "eval", lt_banks["test"], "--calibration", tmp_path / "la")
    assert code == 0, err
    assert "joint" in out and "logit-adjust" in out


@pytest.fixture()
def bad_banks(tmp_path, lt_banks):
    rng = np.random.default_rng(0)
    x, z, y = rng.normal(size=(6, 32)), rng.normal(size=(6, 10)).astype(np.float32), np.arange(6)
    nan = write_bank(tmp_path / "nan.h5", x, z, y)
    with h5py.File(nan, "r+") as f:
        f["logits"][3, 2] = np.nan
    k5 = write_bank(tmp_path / "k5.h5", x, z[:, :5], y % 5)
    nolabels = write_bank(tmp_path / "nolabels.h5", x, z, np.full(6, -1))
    missing = write_bank(tmp_path / "missing.h5", x, z, y)
    with h5py.File(missing, "r+") as f:
        del f["view"]
    return {"nan": nan, "k5": k5, "nolabels": nolabels, "missing": missing}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "{tmp}/nope.h5", "--out", "{tmp}/out"], r"bank file .*nope.h5 does not exist\."),
        (["fit", "{nan}", "--out", "{tmp}/out"], r"dataset 'logits' has NaN or inf values in row 3\."),
        (["fit", "{missing}", "--out", "{tmp}/out"], r"required dataset 'view' is missing\."),
        (["fit", "{train}", "--val", "{k5}", "--out", "{tmp}/out"], r"val bank .*k5.h5 has K=5 classes but the training bank has K=10\."),
        (["fit", "{nolabels}", "--out", "{tmp}/out"], r"has no labelled rows"),
        (["fit", "{train}", "--method", "svm", "--out", "{tmp}/out"], r"method should be one of disalign, joint, .*found 'svm'\."),
        (["eval", "{k5}", "--calibration", "{cal}"], r"the calibration has K=10 classes but the test bank .* has K=5\."),
        (["eval", "{test}", "--calibration", "{tmp}"], r"is not a calibration directory"),
        (["eval", "{test}", "--calibration", "{cal}", "--methods", "joint,lws"], r"--train is needed to fit lws"),
        (["eval", "{test}", "--calibration", "{cal}", "--methods", "joint,magic"], r"--methods should be a subset of .*found magic\."),
    ],
)
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(argv, message, bad_banks, lt_banks, tmp_path, capsys):
    cal = tmp_path / "cal"
    assert main(["fit", str(lt_banks["train"]), "--rho", "1", "--epochs", "1", "--out", str(cal)]) == 0
    capsys.readouterr()
    names = {"tmp": tmp_path, "cal": cal, **{k: str(v) for k, v in lt_banks.items()}, **bad_banks}
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output file, not even half of one


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calib.cli", "fit", str(tmp_path / "x.h5"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: bank file {tmp_path / 'x.h5'} does not exist."


def test_parse_bytes():
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("2G") == 2 * 2**30 and parse_bytes("1000") == 1000
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)


def test_fit_flags_of_the_disalign_head(lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], "--val", lt_banks["val"], "--rho", "1", "--epochs", 1,
                         "--head-form", "blend", "--gate", "normal", "--no-gate-standardize", "--selection", "accuracy",
                         "--val-weight", "0.2", "--magnitude", "on", "--out", tmp_path / "cal")
    assert code == 0, err
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    hyper = meta["hyperparameters"]
    assert (hyper["head_form"], hyper["gate"], hyper["gate_standardize"], hyper["selection"], hyper["val_weight"],
            hyper["use_magnitude"]) == ("blend", "normal", False, "accuracy", 0.2, True)
    assert meta["report"]["head"] == {"form": "blend", "gate": "normal"} and '"val_weight": 0.2' in out
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, status 2
        main(["fit", str(lt_banks["train"]), "--val-weight", "2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "expected a number in [0, 1) or 'auto', found '2'" in capsys.readouterr().err
