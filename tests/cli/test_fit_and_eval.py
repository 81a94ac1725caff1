"""The `disalign fit` / `disalign eval` contract: outputs, and one-sentence errors with exit code 2."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.data.bank import write_bank
from disalign.cli import main
from disalign.cli.common import parse_bytes
from tests.cli.conftest import run
from tests.conftest import REPO


def test_fit_then_eval_all_methods(lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], "--val", lt_banks["val"], "--epochs", 2, "--out", tmp_path / "cal")
    assert code == 0, err
    assert "wrote disalign calibration" in out and (tmp_path / "cal" / "current").is_symlink()
    code, out, err = run(capsys, "eval", lt_banks["test"], "--calibration", tmp_path / "cal", "--train", lt_banks["train"],
                         "--val", lt_banks["val"], "--json", tmp_path / "r.json", "--plots", tmp_path / "plots")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["methods"]) == ["joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde"]
    for name, metrics in report["methods"].items():
        assert set(metrics) == {"accuracy", "mean_class_accuracy", "many", "medium", "few", "ece", "nll"}, name
        assert 0 <= metrics["mean_class_accuracy"] <= 1
    assert report["methods"]["disalign"]["mean_class_accuracy"] > report["methods"]["joint"]["mean_class_accuracy"]
    for name in report["methods"]:
        assert name in out  # one table with every method
        low, high = report["bootstrap"]["mean_class_accuracy"][name]
        assert low <= report["methods"][name]["mean_class_accuracy"] <= high
    assert f"best on the validation bank: {report['validation']['best']} (val mean-cls" in out
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 3


def test_max_steps_caps_lws_and_crt(lt_banks, tmp_path, capsys):
    code, _, err = run(capsys, "fit", lt_banks["train"], "--method", "crt", "--epochs", 2, "--max-steps", 3, "--out", tmp_path / "crt")
    assert code == 0, err
    report = json.loads((artifact_dir(tmp_path / "crt") / "calibration.json").read_text())
    assert report["hyperparameters"]["max_steps"] == 3 and report["report"]["steps_per_epoch"] == 1
    code, _, err = run(capsys, "fit", lt_banks["train"], "--method", "lws", "--max-steps", 0, "--out", tmp_path / "lws")
    assert code == 2 and err == "error: max_steps should be an integer >= 1 or None, found 0.\n"


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
        (["fit", "{train}", "--method", "svm", "--out", "{tmp}/out"], r"method should be one of joint, disalign, .*found 'svm'\."),
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
    result = subprocess.run([sys.executable, "-m", "disalign", "fit", str(tmp_path / "x.h5"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: bank file {tmp_path / 'x.h5'} does not exist."


def test_parse_bytes():
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("2G") == 2 * 2**30 and parse_bytes("1000") == 1000
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)


# -- fit --out and eval on artifacts that are not what they claim --------------------------------------
@pytest.mark.parametrize(("out", "message"), [
    ("work", r"--out .*work holds files that are not a calibration \(notes\.txt, train\.h5\)"),
    ("work/notes.txt", r"--out .*notes\.txt is an existing file, not a calibration directory"),
    (".", r"--out \. holds files that are not a calibration \(notes\.txt, train\.h5\)"),
    ("work/notes.txt/cal", r"--out .*cal cannot be created: .*notes\.txt is not a directory"),
])
def test_fit_out_refuses_anything_but_a_calibration_and_touches_nothing(out, message, lt_banks, tmp_path, capsys, monkeypatch):
    """A folder holding the bank and notes, a file, the working directory: refused before the fit, exit 2."""
    import re

    work = tmp_path / "work"
    work.mkdir()
    (work / "train.h5").write_bytes(lt_banks["train"].read_bytes())
    (work / "notes.txt").write_text("notes")
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "fit", work / "train.h5", "--epochs", 1, "--out", "." if out == "." else tmp_path / out)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and sorted(p.name for p in work.iterdir()) == ["notes.txt", "train.h5"]
    assert (work / "notes.txt").read_text() == "notes" and (work / "train.h5").stat().st_size == lt_banks["train"].stat().st_size


@pytest.mark.parametrize("case", ["notes", "current_file", "versions_file", "current_outside"])
def test_fit_out_with_a_user_file_of_our_names_is_refused_before_the_fit(case, lt_banks, tmp_path, capsys):
    """Issue 21 §2: a notes file named calibration.json was deleted (exit 0); current/versions made the fit run, then fail."""
    out = tmp_path / "d"
    out.mkdir()
    if case == "notes":
        (out / "calibration.json").write_text("my notes")
    elif case == "current_file":
        (out / "current").write_text("my notes")
    elif case == "versions_file":
        (out / "versions").write_text("my notes")
    else:
        (out / "current").symlink_to(tmp_path)
    code, out_text, err = run(capsys, "fit", tmp_path / "missing.h5", "--out", out)
    assert (code, out_text) == (2, "") and err.startswith(f"error: --out {out}") and "missing.h5" not in err, err  # before the bank is opened
    code, _, err = run(capsys, "fit", lt_banks["train"], "--rho", 1, "--epochs", 1, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(os.listdir(out)) == [{"notes": "calibration.json", "versions_file": "versions"}.get(case, "current")]


def test_fit_suggests_only_flags_it_has_and_count_smoothing_is_one(tmp_path, capsys):
    """Issue 21 §5: the GRW error said 'pass count_smoothing > 0', which had no flag."""
    rng = np.random.default_rng(0)
    bank = write_bank(tmp_path / "gap.h5", rng.normal(size=(6, 4)), rng.normal(size=(6, 3)).astype(np.float32), [0, 1, 0, 1, 0, 1],
                      class_counts=[3, 3, 0], model_fingerprint="sha256:gap")
    code, out, err = run(capsys, "fit", bank, "--rho", 1, "--epochs", 1, "--out", tmp_path / "cal")
    assert (code, out) == (2, "") and err.endswith("pass count_smoothing > 0 (disalign fit --count-smoothing).\n"), err
    code, _, err = run(capsys, "fit", bank, "--rho", 1, "--epochs", 1, "--count-smoothing", 1, "--out", tmp_path / "cal", "--quiet")
    assert code == 0, err
    assert json.loads((artifact_dir(tmp_path / "cal") / "calibration.json").read_text())["hyperparameters"]["count_smoothing"] == 1.0
    code, _, err = run(capsys, "fit", bank, "--method", "lws", "--count-smoothing", 1, "--out", tmp_path / "lws")
    assert code == 2 and err.startswith("error: --count-smoothing does not apply to --method lws"), err


def test_fit_out_is_checked_before_the_fit(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "fit", tmp_path / "missing.h5", "--out", tmp_path / "file" / "cal")
    assert code == 2 and "--out" in err and "missing.h5" not in err, err  # the bank was not even opened


def test_fit_out_replaces_a_calibration_with_a_new_version(lt_banks, tmp_path, capsys):
    for seed in (0, 1):
        code, _, err = run(capsys, "fit", lt_banks["train"], "--rho", 1, "--epochs", 1, "--seed", seed, "--out", tmp_path / "cal")
        assert code == 0, err
    from disalign.calib.estimators.methods import load_calibration

    assert load_calibration(tmp_path / "cal").meta_.hyperparameters["seed"] == 1
    assert len(list((tmp_path / "cal" / "versions").iterdir())) == 2


@pytest.mark.parametrize(("mutate", "message"), [
    ({"background_index": 50}, r"'background_index' should be in 0\.\.9 or null, found 50\."),
    ({"report": {"rho_curve": [{"rho": "x"}]}}, r"'report\.rho_curve\.0\.rho' should be a valid number, found 'x'\."),
    ({"report": {"rho_curve": 3}}, r"'report\.rho_curve' should be a valid list, found 3\."),
    ({"hyperparameters": {"cosine": "no"}}, r"hyperparameter 'cosine' should be bool, found 'no'\."),
])
def test_eval_on_an_invalid_artifact_is_one_sentence_exit_2(mutate, message, lt_banks, tmp_path, capsys):
    import re

    from disalign.calib.artifact.publish import artifact_dir

    assert main(["fit", str(lt_banks["train"]), "--rho", "1", "--epochs", "1", "--out", str(tmp_path / "cal")]) == 0
    meta_path = artifact_dir(tmp_path / "cal") / "calibration.json"
    raw = json.loads(meta_path.read_text())
    for key, value in mutate.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    meta_path.write_text(json.dumps(raw))
    capsys.readouterr()
    code, _, err = run(capsys, "eval", lt_banks["test"], "--calibration", tmp_path / "cal", "--plots", tmp_path / "plots")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "plots").exists()


# -- settings that do not apply, ignored settings ---------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "lws", "--rho", "2", "--cosine"],
         "error: --rho, --cosine do not apply to --method lws; its settings are --epochs, --seed, --max-steps (and --val).\n"),
        (["--method", "joint", "--seed", "1"], "error: --seed does not apply to --method joint; its settings are none (and --val).\n"),
        (["--method", "ncm", "--max-memory", "1G"],
         "error: --max-memory does not apply to --method ncm; its settings are none (and --val).\n"),
        (["--no-grw", "--rho", "1"], "error: --rho does not apply with --no-grw: plain cross-entropy has no GRW exponent.\n"),
    ],
)
def test_fit_refuses_flags_that_do_not_apply_to_the_method(extra, message, lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], *extra, "--out", tmp_path / "cal")
    assert (code, out, err) == (2, "", message)
    assert not (tmp_path / "cal").exists()


def test_fit_without_val_says_once_that_rho_auto_used_the_default(lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], "--epochs", 1, "--out", tmp_path / "cal")
    assert code == 0 and "rho = 1, magnitude alpha on\n" in out
    assert err == "warning: --rho auto chooses rho on a validation bank and no --val was given: used rho = 1.0.\n"
    code, _, err = run(capsys, "fit", lt_banks["train"], "--rho", "1.5", "--epochs", 1, "--seed", 3, "--out", tmp_path / "cal2")
    assert code == 0 and err == ""  # an explicit rho is not a fallback
    hyperparameters = json.loads((artifact_dir(tmp_path / "cal2") / "calibration.json").read_text())["hyperparameters"]
    assert (hyperparameters["rho"], hyperparameters["epochs"], hyperparameters["seed"]) == (1.5, 1, 3)


# -- eval outputs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibration(lt_banks, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "cal"
    assert main(["fit", str(lt_banks["train"]), "--val", str(lt_banks["val"]), "--rho", "1", "--epochs", "1", "--out", str(out)]) == 0
    return out


def disalign_cli(*argv, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m disalign ARGV`` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "disalign", *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300, **kwargs)


def test_eval_json_dash_writes_the_report_to_stdout_and_the_table_to_stderr(lt_banks, calibration, tmp_path):
    result = disalign_cli("eval", lt_banks["test"], "--calibration", calibration, "--json", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["methods"]) == ["joint", "disalign"]
    assert "mean-cls" in result.stderr and "disalign" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no file named '-'


def test_eval_report_says_how_to_reproduce_it(lt_banks, calibration, tmp_path, capsys):
    import hashlib

    from disalign.calib import __version__

    argv = ["eval", str(lt_banks["test"]), "--calibration", str(calibration), "--methods", "joint,disalign", "--json", str(tmp_path / "r.json")]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["class_names"] == [f"class_{i}" for i in range(10)]
    provenance = report["provenance"]
    assert provenance["tool_version"] == __version__ and provenance["command"] == "disalign " + " ".join(argv)
    meta = json.loads((artifact_dir(calibration) / "calibration.json").read_text())
    assert provenance["calibration"] == {"path": str(calibration), "method": "disalign", "artifact_version": meta["artifact_version"],
                                         "created": meta["created"], "model_fingerprint": meta["model_fingerprint"],
                                         "hyperparameters": meta["hyperparameters"]}
    test = lt_banks["test"]
    assert provenance["inputs"] == {"test": {"path": str(test), "sha256": "sha256:" + hashlib.sha256(test.read_bytes()).hexdigest(),
                                             "bytes": test.stat().st_size, "rows": 2000, "model_fingerprint": "sha256:synthetic-1234-10-32",
                                             "created": provenance["inputs"]["test"]["created"]}}


@pytest.mark.parametrize("bad", ["plots_is_a_file", "json_is_a_dir", "json_parent_is_a_file"])
def test_eval_checks_every_output_before_any_work_and_writes_nothing(bad, lt_banks, calibration, tmp_path, capsys):
    """Issue 9 item 13: an unusable --plots must not leave the JSON written (it did: exit 2 after the JSON)."""
    (tmp_path / "file.png").write_text("not a directory")
    (tmp_path / "dir").mkdir()
    json_path, plots = {"plots_is_a_file": (tmp_path / "r.json", tmp_path / "file.png"),
                        "json_is_a_dir": (tmp_path / "dir", tmp_path / "plots"),
                        "json_parent_is_a_file": (tmp_path / "file.png" / "r.json", tmp_path / "plots")}[bad]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run(capsys, "eval", lt_banks["test"], "--calibration", calibration, "--train", lt_banks["train"],
                         "--json", json_path, "--plots", plots)
    assert code == 2 and out == ""
    assert err == {"plots_is_a_file": f"error: --plots {plots} exists and is not a directory; expected a directory for the files.\n",
                   "json_is_a_dir": f"error: --json {json_path} is a directory; expected a file name.\n",
                   "json_parent_is_a_file": f"error: --json {json_path}: {tmp_path / 'file.png'} is not a directory.\n"}[bad]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# -- progress bars: on a terminal's stderr only, never with --quiet -----------------------------------
def run_with_terminal_stderr(*argv) -> tuple[int, str]:
    """``python -m disalign ARGV`` with stderr on a pseudo-terminal (80 columns); returns (exit code, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "disalign", *map(str, argv)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=terminal, env=env)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_eval_shows_a_bar_per_method_fit_on_a_terminal_only(lt_banks, calibration):
    argv = ["eval", lt_banks["test"], "--calibration", calibration, "--train", lt_banks["train"], "--methods", "joint,disalign,lws"]
    code, terminal = run_with_terminal_stderr(*argv)
    assert code == 0, terminal
    assert "fitting lws" in terminal and "\r" in terminal and "2/2" in terminal  # joint and lws, each fitted under the bar
    code, terminal = run_with_terminal_stderr(*argv, "--quiet")
    assert code == 0 and terminal == ""
    piped = disalign_cli(*argv)
    assert piped.returncode == 0 and piped.stderr == ""  # stderr is a pipe here: no bar


def test_fit_flags_of_the_disalign_head(lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "fit", lt_banks["train"], "--val", lt_banks["val"], "--rho", "1", "--epochs", 1,
                         "--head-form", "blend", "--gate", "normal", "--no-gate-standardize", "--selection", "accuracy",
                         "--val-weight", "0.2", "--magnitude", "on", "--out", tmp_path / "cal")
    assert code == 0, err
    meta = json.loads((artifact_dir(tmp_path / "cal") / "calibration.json").read_text())
    hyper = meta["hyperparameters"]
    assert (hyper["head_form"], hyper["gate"], hyper["gate_standardize"], hyper["selection"], hyper["val_weight"],
            hyper["use_magnitude"]) == ("blend", "normal", False, "accuracy", 0.2, True)
    assert meta["report"]["head"] == {"form": "blend", "gate": "normal"} and "val weight = 0.2" in out
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, status 2
        main(["fit", str(lt_banks["train"]), "--val-weight", "2", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "expected a number in [0, 1), 'regime' or 'auto', found '2'" in capsys.readouterr().err


def test_fit_prints_a_summary_for_a_person_and_the_exact_numbers_with_json(lt_banks, tmp_path, capsys):
    """Issue 21 §5: a human summary (rho, alpha on/off, val scores, time), not a raw JSON line; --json keeps it exact."""
    import re

    code, out, err = run(capsys, "fit", lt_banks["train"], "--val", lt_banks["val"], "--rho", "auto", "--epochs", 1,
                         "--out", tmp_path / "cal", "--json", tmp_path / "fit.json", "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "fit.json").read_text())
    lines = out.splitlines()
    assert re.fullmatch(rf"wrote disalign calibration to {re.escape(str(tmp_path / 'cal'))} in \d+\.\d s \(fit \d+\.\d s\)", lines[0])
    assert lines[1] == (f"  rho = {summary['rho']:g} (chosen on --val), "
                        f"magnitude alpha {'on' if summary['magnitude'] else 'off'} (chosen on --val)")
    validation = summary["validation"]
    assert lines[2] == (f"  validation: mean-class accuracy {100 * validation['val_mean_class_accuracy']:.2f} %, "
                        f"accuracy {100 * validation['val_accuracy']:.2f} %, NLL {validation['val_nll']:.3f}")
    # The regime and what to do in it, one sentence each (the synthetic bank still shows its bias).
    assert lines[3] == summary["regime"]["sentence"] and lines[3].startswith("regime: bias visible — ")
    assert lines[4] == summary["regime"]["recommendation"] == (
        "recommendation: the default fit (DisAlign on the training bank, rho and alpha chosen on the validation bank).")
    assert len(lines) == 5 and "{" not in out
    assert summary["method"] == "disalign" and summary["seconds"] >= summary["fit_seconds"] > 0
    code, out, err = run(capsys, "fit", lt_banks["train"], "--method", "tau-norm", "--val", lt_banks["val"], "--out", tmp_path / "tau",
                         "--json", "-")
    assert code == 0 and json.loads(out)["tau"] > 0  # stdout is the JSON; the summary went to stderr
    assert re.search(r"^  tau = [0-9.]+ \(chosen on --val\)$", err, re.MULTILINE), err


def test_fit_magnitude_off_is_a_value_and_conflicts_with_no_magnitude(lt_banks, tmp_path, capsys):
    code, _, err = run(capsys, "fit", lt_banks["train"], "--rho", "1", "--epochs", 1, "--magnitude", "off", "--out", tmp_path / "cal")
    assert code == 0, err
    assert json.loads((artifact_dir(tmp_path / "cal") / "calibration.json").read_text())["hyperparameters"]["use_magnitude"] is False
    code, out, err = run(capsys, "fit", lt_banks["train"], "--magnitude", "on", "--no-magnitude", "--out", tmp_path / "cal2")
    assert (code, out, err) == (2, "", "error: --no-magnitude and --magnitude set the same thing; give one of them.\n")


def test_fit_and_eval_name_the_regime_and_the_recommendation_on_the_real_demo_banks(tmp_path, capsys):
    """The shared IR50 model's banks (examples/cifar10lt): its training bank still shows 46 % of the held-out
    error (mean-class error 14.3 % against 31.0 % on the 200 validation rows), so the regime is "bias visible"."""
    demo = REPO / "examples" / "cifar10lt"
    regime = ("regime: bias visible — the stage-1 model's mean-class error is 14.3 % on the training bank against 31.0 % on the "
              "validation bank, so the training bank shows 46 % of the bias, and methods fitted on the training bank (DisAlign, "
              "LWS, cRT) can learn it.")
    code, out, err = run(capsys, "fit", demo / "train.h5", "--val", demo / "val.h5", "--out", tmp_path / "cal", "--quiet")
    assert code == 0, err
    assert out.splitlines()[-2:] == [regime, "recommendation: the default fit (DisAlign on the training bank, rho and alpha "
                                             "chosen on the validation bank)."]
    code, out, err = run(capsys, "eval", demo / "test.h5", "--calibration", tmp_path / "cal", "--train", demo / "train.h5",
                         "--val", demo / "val.h5", "--methods", "joint,disalign,logit-adjust", "--json", tmp_path / "r.json", "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["regime"]["name"] == "bias-visible" and round(report["regime"]["visible_share"], 2) == 0.46
    # DisAlign has the lowest validation NLL, logit adjustment one more right row out of 200: both are named.
    assert out.splitlines()[-2:] == [regime, f"recommendation: disalign (lowest validation NLL: {report['validation']['nll']['disalign']:.3f} "
                                             "on 200 rows), or logit-adjust (best validation mean-class accuracy: 80.5 % against 80.0 %); "
                                             "the training bank shows the bias, so a method fitted on it can be trusted here."]
    assert report["recommendation"] == out.splitlines()[-1]
