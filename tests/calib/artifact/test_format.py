"""Every field of a calibration artifact is checked on read, with one sentence naming it: typed metadata,
tensor dtypes and values, hyper-parameters, and a canary for parameters that pass all of that and still
break calibration. The artifacts are written in the flat layout, which every reader also accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from disalign.calib.artifact.publish import artifact_dir
from disalign.calib.errors import ArtifactError
from disalign.calib.estimators.disalign import DisAlign
from disalign.calib.estimators.methods import load_calibration


@pytest.fixture(scope="module")
def good(lt_banks, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("good") / "cal"
    DisAlign(rho="auto", epochs=1).fit(lt_banks["train"], val=lt_banks["val"]).save(directory)
    return artifact_dir(directory)


def flat_copy(good: Path, target: Path, *, meta=None, params=None) -> Path:
    """The good artifact in ``target`` (flat layout) with ``meta(dict)`` / ``params(dict)`` applied to it."""
    target.mkdir()
    raw = json.loads((good / "calibration.json").read_text())
    tensors = load_file(str(good / "parameters.safetensors"))
    if meta is not None:
        meta(raw)
    if params is not None:
        params(tensors)
    (target / "calibration.json").write_text(json.dumps(raw))
    save_file(tensors, str(target / "parameters.safetensors"))
    return target


def set_key(*path, value):
    def apply(raw):
        for key in path[:-1]:
            raw = raw[key]
        raw[path[-1]] = value
    return apply


def set_tensor(name, fn):
    def apply(tensors):
        tensors[name] = fn(tensors[name])
    return apply


def alpha_huge(t):
    t = t.clone()
    t[0] = 3e38
    return t


def nan_bias(t):
    return torch.tensor(float("nan"))


META_CASES = [
    (set_key("background_index", value=50), r"'background_index' should be in 0\.\.9 or null, found 50\."),
    (set_key("background_index", value="3"), r"'background_index' should be a valid integer, found '3'\."),
    (set_key("background_index", value=-1), r"'background_index' should be in 0\.\.9 or null, found -1\."),
    (set_key("hyperparameters", "cosine", value="no"), r"hyperparameter 'cosine' should be bool, found 'no'\."),
    (set_key("hyperparameters", "epochs", value=2.5), r"hyperparameter 'epochs' should be int, found 2\.5\."),
    (set_key("hyperparameters", "magic", value=1), r"hyperparameter 'magic' is not a parameter of DisAlign\."),
    (set_key("class_names", value=list(range(10))), r"'class_names\.0' should be a valid string, found 0\."),
    (set_key("class_names", value=["a"] * 9), r"'class_names' should have K=10 names, found 9\."),
    (set_key("model_fingerprint", value=""), r"'model_fingerprint' should have at least 1 character, found ''\."),
    (set_key("model_fingerprint", value=None), r"'model_fingerprint' should be a valid string, found None\."),
    (set_key("created", value=None), r"'created' should be a valid string, found None\."),
    (set_key("artifact_version", value="1"), r"'artifact_version' should be a valid integer, found '1'\."),
    (set_key("artifact_version", value=2), r"'artifact_version' should be 1, found 2\."),
    (set_key("num_classes", value=10.0), r"'num_classes' should be a valid integer, found 10\.0\."),
    (set_key("class_counts", value=[1, 2]), r"'class_counts' should be K=10 counts >= 0, found \[1, 2\]\."),
    (set_key("report", "rho_curve", value="flat"), r"'report\.rho_curve' should be a valid list, found 'flat'\."),
    (set_key("report", "rho_curve", value=[{"rho": "one"}]), r"'report\.rho_curve\.0\.rho' should be a valid number, found 'one'\."),
    (set_key("report", "validation", value=[]), r"'report\.validation' should be a valid dictionary, found \[\]\."),
    (set_key("unexpected", value=1), r"unknown key 'unexpected'"),
    (lambda raw: raw.pop("method"), r"'method' is missing\."),
]


@pytest.mark.parametrize(("mutate", "match"), META_CASES)
def test_metadata_is_typed_strictly(good, tmp_path, mutate, match):
    directory = flat_copy(good, tmp_path / "bad", meta=mutate)
    with pytest.raises(ArtifactError, match=rf"calibration\.json: {match}" if "hyperparameter" not in match else match):
        load_calibration(directory)


@pytest.mark.parametrize(("mutate", "match"), [
    (set_tensor("alpha", lambda t: t.to(torch.bfloat16)), r"parameter 'alpha' has dtype bfloat16; float32 or float16 expected\."),
    (set_tensor("alpha", lambda t: t.to(torch.complex64)), r"parameter 'alpha' has dtype complex64; float32 or float16 expected\."),
    (set_tensor("gate_bias", nan_bias), r"parameter 'gate_bias' has NaN or inf values\."),
    (set_tensor("alpha", alpha_huge), r"the calibration gives NaN, inf or unnormalised probabilities on test rows"),
    (set_tensor("beta", lambda t: t[:5].clone()), r"parameter 'beta' should have shape \(10,\), found \(5,\)\."),
])
def test_tensors_are_checked_and_a_canary_catches_what_passes_the_checks(good, tmp_path, mutate, match):
    with pytest.raises(ArtifactError, match=match):
        load_calibration(flat_copy(good, tmp_path / "bad", params=mutate))


def test_float16_parameters_load_as_float32(good, tmp_path):
    reference = load_calibration(good)
    loaded = load_calibration(flat_copy(good, tmp_path / "half", params=lambda t: t.update({k: v.half() for k, v in t.items()})))
    assert {t.dtype for t in loaded.params_.values()} == {torch.float32}
    for name, tensor in reference.params_.items():
        assert torch.equal(loaded.params_[name], tensor.half().float())


def test_the_artifact_records_the_training_banks_preprocessing_and_model(good, lt_banks):
    from disalign.calib.data.bank import load_bank

    meta = load_calibration(good).meta_
    info = load_bank(lt_banks["train"]).info
    assert meta.model_fingerprint == info.model_fingerprint != ""
    assert meta.preprocessing == (info.preprocessing or None)


def test_save_refuses_what_load_would_refuse(lt_banks, tmp_path):
    est = DisAlign(rho=1.0, epochs=1).fit(lt_banks["train"])
    est.meta_.model_fingerprint = ""
    with pytest.raises(ArtifactError, match="records no model fingerprint"):
        est.save(tmp_path / "cal")
    est = DisAlign(rho=1.0, epochs=1).fit(lt_banks["train"])
    est.params_["alpha"][0] = 3e38  # a diverged fit
    with pytest.raises(ArtifactError, match="the calibration gives NaN, inf or unnormalised probabilities"):
        est.save(tmp_path / "cal")
    assert not (tmp_path / "cal").exists()


# -- what serving uses beyond the calibration's own predictions (issue 21 §3) -----------------------------------
def test_the_canary_exercises_the_probability_calibration_and_the_target_prior(good):
    """Values past the range checks (set after load, as a buggy writer would) are still caught by the canary:
    the server applies z / T + b + log π to every answer with a prior."""
    import dataclasses

    from disalign.calib.artifact.format import canary

    calibrator = load_calibration(good)
    assert calibrator.meta_.probability_calibration is not None  # fitted with --val
    canary(calibrator, "the calibration")
    for temperature, bias, prior in ((1e-300, 0.0, None), (1.0, 1e300, None), (1.0, 0.0, [1e308] * 10)):
        k = calibrator.meta_.num_classes
        calibrator.meta_ = dataclasses.replace(calibrator.meta_, target_prior=prior, probability_calibration={
            "temperature": temperature, "bias": [bias] * k, "bias_penalty": None})
        with pytest.raises(ArtifactError, match="on test rows"):
            canary(calibrator, "the calibration")


DEEP = 100_000  # far past json's recursion limit
NESTED = "[" * DEEP + "]" * DEEP


@pytest.mark.parametrize("depth", [40, 800, DEEP])  # 800: json reads it, dataclasses.asdict would not
def test_deeply_nested_metadata_is_one_sentence(good, tmp_path, depth):
    nested = "[" * depth + "]" * depth
    directory = flat_copy(good, tmp_path / "bad")
    text = (directory / "calibration.json").read_text()
    (directory / "calibration.json").write_text(text.replace('"report": {', f'"report": {{"deep": {nested}, ', 1))
    with pytest.raises(ArtifactError, match=r"calibration\.json is nested deeper than 32 levels \(JSON arrays and objects\)\."):
        load_calibration(directory)


def run_with_deadline(fn, seconds: float):
    """``fn()`` on a thread: its result or exception, or AssertionError if it is still running after ``seconds``."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked reading a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


@pytest.mark.parametrize("name", ["calibration.json", "parameters.safetensors"])
def test_a_fifo_in_a_version_is_refused_without_blocking(good, tmp_path, name):
    import os

    from disalign.calib.artifact.publish import publish

    files = {n: (good / n).read_bytes() for n in ("calibration.json", "parameters.safetensors")}
    version = publish(tmp_path / "cal", files)
    (version / name).unlink()
    os.mkfifo(version / name)  # nothing ever writes to it: a plain open() for reading waits for ever
    with pytest.raises(ArtifactError, match=rf"{name} should be a regular file, found a FIFO\."):
        run_with_deadline(lambda: load_calibration(tmp_path / "cal"), 10)
    (version / name).unlink()
    os.symlink("/dev/zero", version / name)  # a device: reads never end
    with pytest.raises(ArtifactError, match=rf"{name} should be a regular file, found a character device\."):
        run_with_deadline(lambda: load_calibration(tmp_path / "cal"), 10)
    publish(tmp_path / "cal", files)  # a later good version loads
    assert run_with_deadline(lambda: load_calibration(tmp_path / "cal"), 30).meta_.num_classes == 10
