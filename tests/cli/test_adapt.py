"""`disalign adapt` and `disalign eval --target-prior`: the estimate, the derived calibration, the prior file,
and one-sentence errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.estimators.methods import load_calibration
from disalign.cli import main
from tests.cli.conftest import run

FORWARD = np.round(200 * 20 ** (-np.arange(10) / 9)).astype(int)  # rows per class of a shifted bank (imbalance 20)


@pytest.fixture(scope="module")
def fitted(lt_banks, tmp_path_factory) -> Path:
    """logit-adjust on the synthetic IR50 banks, with its probability calibration fitted on val."""
    out = tmp_path_factory.mktemp("adapt") / "calibration"
    assert main(["fit", str(lt_banks["train"]), "--method", "logit-adjust", "--val", str(lt_banks["val"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def shifted(lt_banks, tmp_path_factory) -> Path:
    """The first FORWARD[c] test rows of each class c (the test bank has 200 per class)."""
    test = load_bank(lt_banks["test"])
    labels = test.labels.numpy()
    rows = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(FORWARD)])
    info = test.info
    return write_bank(tmp_path_factory.mktemp("shifted") / "shifted.h5", test.features[rows].numpy(), test.logits[rows].numpy(),
                      labels[rows], class_names=info.class_names, model_fingerprint=info.model_fingerprint, class_counts=info.class_counts)


def test_adapt_prints_the_estimate_and_writes_a_derived_calibration(fitted, shifted, lt_banks, tmp_path, capsys):
    assert json.loads((artifact_dir(fitted) / "calibration.json").read_text())["probability_calibration"]["temperature"] > 0
    code, out, err = run(capsys, "adapt", shifted, "--calibration", fitted, "--out", tmp_path / "aligned",
                         "--json", tmp_path / "prior.json", "--bootstrap", 20)
    assert code == 0, err
    assert "95% interval" in out and "→ adapt to the estimate" in out and "wrote a calibration aligned to the estimated prior" in out
    estimate = json.loads((tmp_path / "prior.json").read_text())
    prior = np.array(estimate["prior"])
    true = FORWARD / FORWARD.sum()
    assert np.abs(prior - true).sum() < 0.25 and estimate["test"]["adapt"]
    assert all(lo <= p <= hi for lo, p, hi in zip(estimate["interval"]["low"], prior, estimate["interval"]["high"], strict=True))
    printed = re.search(r"L1 from the labelled rows' frequencies: ([0-9.]+)", out)
    assert printed and float(printed.group(1)) == pytest.approx(np.abs(prior - true).sum(), abs=1e-3)

    aligned = load_calibration(tmp_path / "aligned")
    assert aligned.meta_.target_prior == pytest.approx(estimate["prior"])
    bank = load_bank(shifted)
    balanced = load_calibration(fitted).predict_logits(bank.features, bank.logits)
    p_bal = torch.softmax(balanced.double() / aligned.meta_.probability_calibration["temperature"]
                          + torch.tensor(aligned.meta_.probability_calibration["bias"], dtype=torch.float64), dim=1)
    expected = p_bal * torch.from_numpy(prior) / (p_bal * torch.from_numpy(prior)).sum(1, keepdim=True)  # Bayes' rule
    torch.testing.assert_close(aligned.predict_proba(bank.features, bank.logits).double(), expected, atol=1e-5, rtol=0)

    # eval: the derived calibration, and the balanced one with each --target-prior choice, on the shifted bank.
    code, out, err = run(capsys, "eval", shifted, "--calibration", fitted, "--methods", "logit-adjust",
                         "--target-prior", tmp_path / "prior.json", "--json", tmp_path / "report.json")
    assert code == 0, err
    methods = json.loads((tmp_path / "report.json").read_text())["methods"]
    assert methods["logit-adjust@prior.json"]["accuracy"] > methods["logit-adjust"]["accuracy"] + 0.02
    for choice in ("estimate", "uniform", "train"):
        code, out, err = run(capsys, "eval", shifted, "--calibration", fitted, "--methods", "logit-adjust",
                             "--target-prior", choice, "--json", tmp_path / f"{choice}.json")
        assert code == 0, err
    accuracy = {c: json.loads((tmp_path / f"{c}.json").read_text())["methods"][f"logit-adjust@{c}"]["accuracy"]
                for c in ("estimate", "uniform", "train")}
    assert accuracy["estimate"] == pytest.approx(methods["logit-adjust@prior.json"]["accuracy"], abs=0.01)
    assert accuracy["uniform"] == methods["logit-adjust"]["accuracy"]  # uniform: the calibration as fitted
    assert accuracy["train"] > accuracy["uniform"]  # the training prior is forward-shifted too (IR50)


def test_eval_labels_the_row_of_a_prior_adapted_calibration(fitted, shifted, tmp_path, capsys):
    """Issue 21 §5: eval on `adapt --out`'s calibration labelled its row just with the method name."""
    assert main(["adapt", str(shifted), "--calibration", str(fitted), "--out", str(tmp_path / "aligned"), "--bootstrap", "0",
                 "--quiet"]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, "eval", shifted, "--calibration", tmp_path / "aligned", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert list(json.loads((tmp_path / "r.json").read_text())["methods"]) == ["joint", "logit-adjust@target-prior"]
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["joint", "logit-adjust@target-prior"]
    assert "logit-adjust@target-prior: aligned to the class prior recorded in the calibration (disalign adapt --out)" in out


def test_adapt_keeps_the_reference_on_balanced_traffic(fitted, lt_banks, tmp_path, capsys):
    code, out, err = run(capsys, "adapt", lt_banks["test"], "--calibration", fitted, "--out", tmp_path / "kept", "--bootstrap", 0)
    assert code == 0, err
    assert "→ keep the balanced reference" in out and "95% interval" not in out
    assert load_calibration(tmp_path / "kept").meta_.target_prior is None


@pytest.mark.parametrize(("argv", "message"), [
    (["adapt", "{test}", "--calibration", "{aligned}"], r"is already aligned to a target prior; adapt the balanced calibration\."),
    (["adapt", "{test}", "--calibration", "{cal}", "--bootstrap", "-1"], r"--bootstrap should be >= 0, found -1\."),
    (["adapt", "{test}", "--calibration", "{cal}", "--significance", "2"], r"significance should be between 0 and 1, found 2\.0\."),
    (["eval", "{test}", "--calibration", "{cal}", "--target-prior", "{tmp}/nope.json"], r"prior file .*nope.json does not exist\."),
    (["eval", "{test}", "--calibration", "{cal}", "--target-prior", "{short}"], r"prior file .*short.json: the prior should have 10 values"),
    (["eval", "{test}", "--calibration", "{cal}", "--target-prior", "{text}"], r"prior file .*text.json is not readable JSON"),
    (["eval", "{test}", "--calibration", "{cal}", "--target-prior", "{named}"], r"'classes' should be the calibration's class names"),
])
def test_bad_input_is_one_sentence_exit_2(argv, message, fitted, lt_banks, tmp_path, capsys):
    aligned = tmp_path / "aligned"
    names = {"tmp": tmp_path, "cal": fitted, "aligned": aligned, "short": tmp_path / "short.json", "text": tmp_path / "text.json",
             "named": tmp_path / "named.json", **{k: str(v) for k, v in lt_banks.items()}}
    (tmp_path / "named.json").write_text(json.dumps({"prior": [0.1] * 10, "classes": [f"c{i}" for i in range(10)]}))
    (tmp_path / "short.json").write_text(json.dumps({"prior": [0.5, 0.5]}))
    (tmp_path / "text.json").write_text("uniform, please")
    assert main(["adapt", str(lt_banks["test"]), "--calibration", str(fitted), "--out", str(aligned), "--no-test", "--bootstrap", "0"]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


# -- adapt --publish: the deployment's prior, published as a server's estimate is (issue 21 §1) ------------------
def test_publish_moves_the_deployments_prior_in_bounded_significant_steps(fitted, shifted, lt_banks, tmp_path, capsys):
    import shutil

    from disalign.calib.artifact import priors
    from disalign.calib.artifact.format import version_name
    from disalign.calib.core import label_shift as ls

    calibration = tmp_path / "calibration"
    shutil.copytree(fitted, calibration, symlinks=True)
    loaded = load_calibration(calibration)
    code, out, err = run(capsys, "adapt", lt_banks["test"], "--calibration", calibration, "--publish", "--bootstrap", 0)
    assert code == 0 and "the published prior stays (the traffic is balanced)" in out, err  # balanced traffic: nothing
    assert priors.pointer(calibration / "prior") is None
    uniform, true = ls.uniform_prior(10), torch.from_numpy(FORWARD / FORWARD.sum())
    served, steps = uniform, 0
    for _ in range(8):
        code, out, err = run(capsys, "adapt", shifted, "--calibration", calibration, "--publish", "--max-step", 0.3, "--bootstrap", 0)
        assert code == 0, err
        if "the published prior stays" in out:
            break
        pointer, version = priors.read_current(calibration / "prior")
        assert f"published {pointer} in {calibration / 'prior'}" in out
        assert version.source == "adapt" and version.calibration_version == version_name(loaded.params_, loaded.meta_)
        assert version.classes == loaded.meta_.class_names and version.rows == 681 == version.rows_by_source["adapt"]  # the shifted bank's rows
        prior = torch.tensor(version.prior, dtype=torch.float64)
        assert ls.l1_distance(prior, served) <= 0.3 + 1e-9  # a bounded step
        served, steps = prior, steps + 1
    assert "not significantly better than the current prior" in out and steps >= 2
    assert ls.l1_distance(served, true) < ls.l1_distance(uniform, true) / 2
    # The published prior is a prior file too: eval --target-prior reads it.
    code, out, err = run(capsys, "eval", shifted, "--calibration", calibration, "--target-prior",
                         calibration / "prior" / "published" / pointer / "prior.json", "--quiet")
    assert code == 0, err


@pytest.mark.parametrize(("prepare", "argv", "message"), [
    ("frozen", [], r"the prior published in .* is frozen \(POST /admin/prior\); unfreeze it to publish another\."),
    (None, ["--prior-dir", "{tmp}/file/prior"], r"the prior directory .*file/prior is not writable"),
    (None, ["--max-step", "3"], r"--max-step should be in \(0, 2\] \(an L1 distance between priors\), found 3\.0\."),
    ("no-probability-calibration", ["--val", "{val}"], r"--publish estimates with the calibration the servers serve"),
])
def test_publish_errors_are_one_sentence_and_publish_nothing(prepare, argv, message, fitted, shifted, lt_banks, tmp_path, capsys):
    import shutil

    from disalign.calib.artifact import priors

    calibration = tmp_path / "calibration"
    (tmp_path / "file").write_text("x")
    if prepare == "no-probability-calibration":
        assert main(["fit", str(lt_banks["train"]), "--method", "logit-adjust", "--out", str(calibration), "--quiet"]) == 0
    else:
        shutil.copytree(fitted, calibration, symlinks=True)
    if prepare == "frozen":
        loaded = load_calibration(calibration)
        from disalign.calib.artifact.format import version_name

        priors.publish_version(calibration / "prior", priors.PriorVersion(
            prior=[0.1] * 10, classes=loaded.meta_.class_names, calibration_version=version_name(loaded.params_, loaded.meta_),
            source="admin", epoch=priors.INITIAL_EPOCH, created=priors.now_iso(), frozen=True))
    before = priors.pointer(calibration / "prior")
    code, _, err = run(capsys, "adapt", shifted, "--calibration", calibration, "--publish", "--bootstrap", 0,
                       *[a.format(tmp=tmp_path, val=lt_banks["val"]) for a in argv])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert priors.pointer(calibration / "prior") == before
