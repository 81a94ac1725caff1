"""``disalign export``: for the demo model and every method, onnxruntime's probabilities on real CIFAR JPEGs
equal ``disalign predict``'s on the bank ``disalign extract`` made of the same images (1e-4); a target
prior travels with the graph; a Triton repository takes a re-calibration as a new head version only;
flags that do not apply are refused before any work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest
import torch

from disalign.calib.estimators.methods import METHODS
from disalign.cli import main
from disalign.feature_extract.preprocess import Preprocessing, clean_view, decode_image
from tests.conftest import REPO

DEMO = REPO / "examples" / "cifar10lt"
MODEL = DEMO / "cifar10lt-ir50-resnet32.ts"
CARD = DEMO / "cifar10lt-ir50-resnet32.json"
QUICK = {"disalign": ["--epochs", "2"], "lws": ["--epochs", "1", "--max-steps", "20"], "crt": ["--epochs", "1", "--max-steps", "20"]}
IMAGES = 200


def ok(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"disalign {' '.join(map(str, argv))} exited {code}"


def run_onnx(path: Path, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def predicted_probabilities(calibration: Path, bank: Path, out: Path) -> np.ndarray:
    """`disalign predict --top-k K` into HDF5, scattered back to the (N, K) probabilities."""
    ok("predict", bank, "--calibration", calibration, "--out", out, "--top-k", 10, "--quiet")
    with h5py.File(out, "r") as f:
        labels, top = f["top_k_indices"][...], f["top_k_probabilities"][...]
    probabilities = np.zeros_like(top)
    np.put_along_axis(probabilities, labels, top, axis=1)
    return probabilities


@pytest.fixture(scope="module")
def demo(shared_dir, cifar_root, tmp_path_factory):
    """200 demo test images (every class): a float32 bank `disalign extract` made of them, and the same images as
    the uint8 clean views the extractor and the server build."""
    root = tmp_path_factory.mktemp("export_demo")
    lines = (shared_dir / "data" / "cifar10lt-ir50" / "test.txt").read_text().splitlines()
    rows = [line for line in lines if line.strip() and not line.startswith("#")][:: max(1, len(lines) // IMAGES)][:IMAGES]
    (root / "images.txt").write_text("\n".join(rows) + "\n")
    ok("extract", "--model", MODEL, "--card", CARD, "--root", cifar_root, "--list", root / "images.txt", "--out", root / "images.h5",
       "--feature-dtype", "float32", "--class-counts-from", DEMO / "train.h5", "--workers", "1", "--quiet")
    prep = Preprocessing.from_card(CARD)
    images = torch.stack([clean_view(decode_image(cifar_root / row.split()[0], draft_size=prep.draft_size), prep) for row in rows])
    return {"root": root, "bank": root / "images.h5", "images": images.numpy()}


def fitted(demo, method: str) -> Path:
    out = demo["root"] / f"cal-{method}"
    if not out.exists():
        ok("fit", DEMO / "train.h5", "--val", DEMO / "val.h5", "--method", method, *QUICK.get(method, []), "--out", out, "--quiet")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_onnxruntime_equals_disalign_predict_on_the_demo_images(method, demo, tmp_path):
    calibration = fitted(demo, method)
    ok("export", "--calibration", calibration, "--model", MODEL, "--out", tmp_path / "onnx", "--quiet")
    probabilities, calibrated = run_onnx(tmp_path / "onnx" / "model.onnx", {"images": demo["images"]})
    expected = predicted_probabilities(calibration, demo["bank"], tmp_path / "p.h5")
    assert probabilities.shape == (IMAGES, 10) and calibrated.shape == (IMAGES, 10)
    print(f"{method}: largest probability difference {np.abs(probabilities - expected).max():.2g}")
    assert np.abs(probabilities - expected).max() <= 1e-4
    assert (probabilities.argmax(1) == expected.argmax(1)).mean() >= 0.99  # ties aside, the same answers

    ok("export", "--calibration", calibration, "--head-only", "--out", tmp_path / "head", "--quiet")
    with h5py.File(demo["bank"], "r") as f:
        features, logits = f["features"][...], f["logits"][...]
    head_probabilities, _ = run_onnx(tmp_path / "head" / "model.onnx", {"features": features, "logits": logits})
    assert np.abs(head_probabilities - expected).max() <= 1e-4


@pytest.mark.slow
def test_a_target_prior_and_torchscript_and_float_input(demo, tmp_path):
    balanced = fitted(demo, "disalign")
    adapted = tmp_path / "adapted"
    ok("adapt", demo["bank"], "--calibration", balanced, "--out", adapted, "--no-test", "--quiet")
    from disalign.calib.estimators.methods import load_calibration

    assert load_calibration(adapted).meta_.target_prior is not None
    expected = predicted_probabilities(adapted, demo["bank"], tmp_path / "p.h5")
    assert np.abs(expected - predicted_probabilities(balanced, demo["bank"], tmp_path / "b.h5")).max() > 1e-3  # the prior matters

    ok("export", "--calibration", adapted, "--model", MODEL, "--input-type", "float32", "--out", tmp_path / "f", "--quiet")
    info = json.loads((tmp_path / "f" / "export.json").read_text())
    assert info["target_prior"] is True and info["inputs"][0] == {"name": "images", "dtype": "float32", "shape": [-1, 3, 32, 32]}
    probabilities, _ = run_onnx(tmp_path / "f" / "model.onnx", {"images": demo["images"].astype(np.float32) / 255})
    assert np.abs(probabilities - expected).max() <= 1e-4

    ok("export", "--calibration", adapted, "--model", MODEL, "--format", "torchscript", "--out", tmp_path / "ts", "--quiet")
    from tests.feature_extract.conftest import load_script

    probabilities, _ = load_script(tmp_path / "ts" / "model.ts")(torch.from_numpy(demo["images"]))
    assert np.abs(probabilities.numpy() - expected).max() <= 1e-4


@pytest.mark.slow
def test_a_triton_repository_and_a_recalibration(demo, tmp_path, capsys):
    repo = tmp_path / "repo"
    ok("export", "--calibration", fitted(demo, "disalign"), "--model", MODEL, "--format", "triton", "--out", repo, "--quiet")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in repo.rglob("*") if p.is_file()}

    new = fitted(demo, "logit-adjust")
    assert main(["export", "--calibration", str(new), "--format", "triton", "--head-only", "--out", str(repo)]) == 0
    assert capsys.readouterr().err.startswith(f"note: wrote {repo}/disalign_head/2: head version 2 (logit-adjust, logit-adjust-")
    changed = {p for p in repo.rglob("*") if p.is_file() and before.get(p) != hashlib.sha256(p.read_bytes()).hexdigest()}
    assert changed == {repo / "disalign_head" / "2" / "model.onnx", repo / "disalign" / "export.json"}

    features, logits = run_onnx(repo / "disalign_backbone" / "1" / "model.onnx", {"images": demo["images"]})
    probabilities, _ = run_onnx(repo / "disalign_head" / "2" / "model.onnx", {"features": features, "logits": logits})
    assert np.abs(probabilities - predicted_probabilities(new, demo["bank"], tmp_path / "p.h5")).max() <= 1e-4

    assert main(["export", "--calibration", str(new), "--model", str(MODEL), "--format", "triton", "--out", str(repo)]) == 2
    assert capsys.readouterr().err == (f"error: --out {repo} already holds an exported Triton repository; pass --head-only to publish "
                                       "this calibration as its next head version, or give a new directory.\n")


@pytest.fixture(scope="module")
def synthetic_calibration(lt_banks, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_refusals") / "cal"
    ok("fit", lt_banks["train"], "--method", "joint", "--out", out, "--quiet")
    return out


@pytest.mark.parametrize(("argv", "message"), [
    (["--head-only", "--model", "m.ts", "--card", "c.json"], "--model, --card do not apply with --head-only: the head graph takes features and logits, not images."),
    ([], "--model is required (the frozen model the calibration was fitted for), or pass --head-only to export the calibration alone."),
    (["--head-only", "--name", "x"], "--name only applies to --format triton."),
    (["--head-only", "--format", "triton", "--max-batch", "8"], "--max-batch does not apply to a new head version: the repository keeps its own."),
    (["--head-only", "--format", "torchscript", "--opset", "17"], "--opset only applies to the ONNX formats (onnx, triton)."),
    (["--head-only", "--opset", "9"], "--opset should be between 13 and 20, found 9."),
])
def test_flags_that_do_not_apply_are_refused(argv, message, synthetic_calibration, tmp_path, capsys):
    assert main(["export", "--calibration", str(synthetic_calibration), "--out", str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_outputs_are_refused_before_any_work(synthetic_calibration, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["export", "--calibration", str(synthetic_calibration), "--head-only", "--out", str(tmp_path / "busy")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'busy'} is not empty (x); give a new or empty directory")
    assert main(["export", "--calibration", str(synthetic_calibration), "--head-only", "--format", "triton", "--out", str(tmp_path)]) == 2
    assert "should hold one Triton repository written by disalign export --format triton, found 0" in capsys.readouterr().err


def test_a_calibration_for_another_model_is_refused(synthetic_calibration, tmp_path, capsys):
    assert main(["export", "--calibration", str(synthetic_calibration), "--model", str(MODEL), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("error: the calibration does not record the preprocessing of its banks, so the graph cannot "
                                       "fold it in: pass --card with the model's input size, mean and std.\n")
    argv = ["export", "--calibration", str(synthetic_calibration), "--model", str(MODEL), "--card", str(CARD), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: the calibration has d=32 features but the model has d=64.\n"
    assert not (tmp_path / "o").exists()


def test_the_head_only_export_writes_a_head(synthetic_calibration, lt_banks, tmp_path, capsys):
    assert main(["export", "--calibration", str(synthetic_calibration), "--head-only", "--out", str(tmp_path / "h")]) == 0
    assert capsys.readouterr().err == f"note: wrote {tmp_path / 'h'} (onnx, head graph of joint); see {tmp_path / 'h'}/export.json.\n"
    info = json.loads((tmp_path / "h" / "export.json").read_text())
    assert info["calibration"] == str(synthetic_calibration) and info["calibration_version"].startswith("joint-")
    assert info["calibration_artifact"].startswith("versions/") and "preprocessing" not in info
    with h5py.File(lt_banks["test"], "r") as f:
        features, logits = f["features"][:50].astype(np.float32), f["logits"][:50]
    probabilities, _ = run_onnx(tmp_path / "h" / "model.onnx", {"features": features, "logits": logits})
    expected = METHODS["joint"].load(synthetic_calibration).predict_proba(features, logits)
    assert np.abs(probabilities - expected).max() <= 1e-6
