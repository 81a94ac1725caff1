"""disalign.feature_extract.export: the head, backbone and fused graphs, run by onnxruntime and TorchScript,
equal the library's own path; what cannot be exported is refused in one sentence, and nothing half-written
is ever left behind.

(The fused graph of the real demo model on real CIFAR JPEGs against ``disalign predict``, for every
method: tests/cli/test_export.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from disalign.calib.data.bank import load_bank, write_bank
from disalign.calib.errors import ArtifactError, InputError
from disalign.calib.estimators.methods import METHODS
from disalign.feature_extract.errors import ExportError
from disalign.feature_extract.export import ExportSource, export_graph
from disalign.feature_extract.models import load_model
from disalign.feature_extract.preprocess import Preprocessing, normalize
from tests.feature_extract.conftest import load_script

QUICK = {"disalign": {"epochs": 2}, "lws": {"epochs": 1, "max_steps": 20}, "crt": {"epochs": 1, "max_steps": 20}}
PREP = Preprocessing(resize=None, crop=(12, 10), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


class ScaledLogits(nn.Module):
    """Logits that are more than the classifier layer: fc(x) · 2 (no export can separate features from that)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.body(x)) * 2.0


def scaled_logits() -> nn.Module:
    return ScaledLogits()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_banks(model, directory: Path, seed: int = 0, prep: Preprocessing = PREP) -> dict[str, Path]:
    """Train / val banks of ``model`` on random images (long-tailed labels), recording ``prep`` and its fingerprint."""
    generator = torch.Generator().manual_seed(seed)
    k = model.num_classes
    paths = {}
    for split, per_class in (("train", [60 // (i + 1) + 4 for i in range(k)]), ("val", [12] * k)):
        images = torch.randint(0, 256, (sum(per_class), 3, *prep.crop), dtype=torch.uint8, generator=generator)
        features, logits = model.features_and_logits(normalize(images, prep))
        labels = np.repeat(np.arange(k), per_class)
        paths[split] = write_bank(directory / f"{split}.h5", features.numpy(), logits.numpy(), labels, feature_dtype="float32",
                                  model_fingerprint=model.fingerprint, preprocessing=prep.to_dict(), class_counts=np.bincount(labels),
                                  classifier_weight=model.classifier_weight, classifier_bias=model.classifier_bias)
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The factory TinyNet (K=10, d=8), loaded as the extractor loads it, and banks of it."""
    model = load_model("tests.feature_extract.factories:tiny_net", input_size=PREP.crop)
    paths = model_banks(model, tmp_path_factory.mktemp("tiny_banks"))
    return model, load_bank(paths["train"]), load_bank(paths["val"])


def fit(name: str, train, val):
    return METHODS[name](**QUICK.get(name, {})).fit(train, val)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_head_graph_is_predict_proba(name, tiny, tmp_path):
    _, train, val = tiny
    est = fit(name, train, val)
    out = export_graph(tmp_path / "head", ExportSource(est))
    info = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert [t["name"] for t in info["inputs"]] == ["features", "logits"]  # a logits-only method still takes both
    assert info["graph"] == "head" and info["method"] == name and info["probe_max_probability_error"] <= 1e-4
    features, logits = val.features.float(), val.logits
    for rows in (slice(0, 1), slice(0, 37), slice(None)):  # dynamic batch
        p, z = session(out / "model.onnx").run(None, {"features": features[rows].numpy(), "logits": logits[rows].numpy()})
        np.testing.assert_allclose(p, est.predict_proba(features[rows], logits[rows]).numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(z, est.predict_logits(features[rows], logits[rows]).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("fmt", "input_type"), [("onnx", "uint8"), ("onnx", "float32"), ("torchscript", "uint8")])
def test_the_fused_graph_is_model_then_calibration(fmt, input_type, tiny, tmp_path):
    model, train, val = tiny
    est = fit("disalign", train, val)
    out = export_graph(tmp_path / "fused", ExportSource(est, model, PREP, input_type, {"model_spec": "tiny"}), fmt)
    info = json.loads((out / "export.json").read_text())
    assert info["inputs"] == [{"name": "images", "dtype": input_type, "shape": [-1, 3, 12, 10]}]
    assert [t["name"] for t in info["outputs"]] == ["probabilities", "calibrated_logits"]
    assert info["preprocessing"]["input_type"] == input_type and info["preprocessing"]["mean"] == list(PREP.mean)
    assert info["model_spec"] == "tiny" and info["class_names"] == list(est.meta_.class_names)
    images = torch.randint(0, 256, (9, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    expected = est.predict_proba(*model.features_and_logits(normalize(images, PREP)))
    given = images if input_type == "uint8" else images.float() / 255
    if fmt == "onnx":
        probabilities, _ = session(out / "model.onnx").run(None, {"images": given.numpy()})
    else:
        probabilities, _ = (t.numpy() for t in load_script(out / "model.ts")(given))
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=0, atol=1e-5)


def test_the_onnx_file_describes_itself(tiny, tmp_path):
    import onnx

    model, train, val = tiny
    est = fit("logit-adjust", train, val)
    out = export_graph(tmp_path / "e", ExportSource(est, model, PREP, provenance={"calibration_version": "logit-adjust-0123"}))
    graph = onnx.load(str(out / "model.onnx"))
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["calibration_version"] == "logit-adjust-0123" and props["method"] == "logit-adjust"
    assert json.loads(props["class_names"]) == list(est.meta_.class_names)
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim][:1] == ["N"]


def test_a_torchscript_model_with_forward_features(tmp_path):
    """The demo's kind of model: forward_features + fc, scripted (not traced) into the graph."""
    ts = Path(__file__).resolve().parents[2] / "examples" / "cifar10lt" / "cifar10lt-ir50-resnet32.ts"
    model = load_model(str(ts), input_size=(32, 32))
    prep = Preprocessing(resize=None, crop=(32, 32), mean=(0.49, 0.48, 0.45), std=(0.2, 0.2, 0.2))
    paths = model_banks(model, tmp_path, seed=1, prep=prep)
    est = fit("tde", load_bank(paths["train"]), load_bank(paths["val"]))
    out = export_graph(tmp_path / "ts", ExportSource(est, model, prep), "torchscript")
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    probabilities, calibrated = load_script(out / "model.ts")(images)
    torch.testing.assert_close(probabilities, est.predict_proba(*model.features_and_logits(normalize(images, prep))), rtol=0, atol=1e-5)


def test_refusals_leave_nothing_behind(tiny, tmp_path):
    model, train, val = tiny
    est = fit("joint", train, val)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"^--out .*busy is not empty \(keep.txt\); give a new or empty directory"):
        export_graph(busy, ExportSource(est))
    assert (busy / "keep.txt").read_text() == "mine"

    other = load_model("tests.feature_extract.factories:sequential_head", input_size=PREP.crop)
    with pytest.raises(ArtifactError, match=r"^the calibration has K=10 classes but the model has K=4\.$"):
        export_graph(tmp_path / "wrong", ExportSource(est, other, PREP))

    scaled = load_model("tests.feature_extract.test_export:scaled_logits", input_size=PREP.crop)
    est = fit("joint", *(load_bank(p) for p in model_banks(scaled, tmp_path / "scaled").values()))
    with pytest.raises(ExportError, match=r"^the exported onnx fused graph differs from the library by .* in .* on a probe batch of 3 "
                                          r"\(allowed .*\); .*its logits are more than its classifier layer"):
        export_graph(tmp_path / "scaled" / "out", ExportSource(est, scaled, PREP))
    assert sorted(p.name for p in (tmp_path / "scaled").iterdir()) == ["train.h5", "val.h5"]  # no out, no staging directory

    with pytest.raises(ExportError, match=r"^format should be one of onnx, torchscript here, found 'triton'"):
        export_graph(tmp_path / "t", ExportSource(est), "triton")
    with pytest.raises(ExportError, match=r"^input type should be one of uint8, float32, found 'int16'\.$"):
        export_graph(tmp_path / "t", ExportSource(est, scaled, PREP, "int16"))
