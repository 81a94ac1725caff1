"""disalign.feature_extract.triton: the model repository's layout, every config.pbtxt parsed against Triton's
own ModelConfig message, the ensemble's chain equal to the fused graph, and a re-calibration that adds a
head version and touches nothing else."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from disalign.calib.data.bank import load_bank
from disalign.calib.errors import ArtifactError
from disalign.calib.estimators.methods import METHODS
from disalign.feature_extract.errors import ExportError
from disalign.feature_extract.export import ExportSource
from disalign.feature_extract.models import load_model
from disalign.feature_extract.preprocess import normalize
from disalign.feature_extract.triton import Enum, add_head_version, export_repository, pbtxt
from tests.feature_extract.test_export import PREP, model_banks


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def run(path: Path, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    model = load_model("tests.feature_extract.factories:tiny_net", input_size=PREP.crop)
    banks = {k: load_bank(v) for k, v in model_banks(model, root).items()}
    est = METHODS["disalign"](epochs=2).fit(banks["train"], banks["val"])
    repo = export_repository(root / "repo", ExportSource(est, model, PREP, provenance={"calibration_version": "disalign-aaaa"}),
                             name="tiny", max_batch=16)
    return model, banks, est, repo


def test_the_repository_layout_and_configs(exported):
    _, _, est, repo = exported
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "tiny", "tiny/1", "tiny/config.pbtxt", "tiny/export.json",
        "tiny_backbone", "tiny_backbone/1", "tiny_backbone/1/model.onnx", "tiny_backbone/config.pbtxt",
        "tiny_head", "tiny_head/1", "tiny_head/1/model.onnx", "tiny_head/config.pbtxt", "tiny_head/labels.txt"]
    backbone, head, ensemble = (parse_config(repo / name / "config.pbtxt") for name in ("tiny_backbone", "tiny_head", "tiny"))
    T = model_config_pb2
    assert (backbone.name, backbone.backend, backbone.max_batch_size) == ("tiny_backbone", "onnxruntime", 16)
    assert [(t.name, t.data_type, list(t.dims)) for t in backbone.input] == [("images", T.TYPE_UINT8, [3, 12, 10])]
    assert [(t.name, list(t.dims)) for t in backbone.output] == [("features", [8]), ("logits", [10])]
    assert backbone.HasField("dynamic_batching") and head.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in head.input] == [("features", [8]), ("logits", [10])]
    assert [(t.name, t.label_filename) for t in head.output] == [("probabilities", "labels.txt"), ("calibrated_logits", "")]
    assert head.version_policy.latest.num_versions == 1
    assert (repo / "tiny_head" / "labels.txt").read_text().splitlines() == list(est.meta_.class_names)
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 16
    steps = ensemble.ensemble_scheduling.step
    assert [(s.model_name, s.model_version) for s in steps] == [("tiny_backbone", -1), ("tiny_head", -1)]
    assert dict(steps[0].output_map) == dict(steps[1].input_map) == {"features": "features", "logits": "logits"}
    assert [t.name for t in ensemble.output] == ["probabilities", "calibrated_logits"]
    info = json.loads((repo / "tiny" / "export.json").read_text())
    assert info["models"] == {"ensemble": "tiny", "backbone": "tiny_backbone", "head": "tiny_head"}
    assert [v["version"] for v in info["head_versions"]] == [1] and info["head_versions"][0]["calibration_version"] == "disalign-aaaa"


def test_the_chain_is_the_calibrated_model(exported):
    model, _, est, repo = exported
    images = torch.randint(0, 256, (6, 3, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    features, logits = run(repo / "tiny_backbone" / "1" / "model.onnx", {"images": images.numpy()})
    probabilities, _ = run(repo / "tiny_head" / "1" / "model.onnx", {"features": features, "logits": logits})
    expected = est.predict_proba(*model.features_and_logits(normalize(images, PREP)))
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=0, atol=1e-5)


def test_a_recalibration_adds_only_a_head_version(exported, tmp_path):
    model, banks, _, repo = exported
    before = digests(repo)
    new = METHODS["logit-adjust"]().fit(banks["train"], banks["val"])
    version = add_head_version(repo, new, {"calibration_version": "logit-adjust-bbbb"})
    assert version == repo / "tiny_head" / "2"
    after = digests(repo)
    assert sorted(set(after) - set(before)) == ["tiny_head/2/model.onnx"]
    assert [k for k in before if before[k] != after[k]] == ["tiny/export.json"]  # the record of head versions, nothing else
    assert not list((repo / "tiny_head").glob(".tmp-*"))
    info = json.loads((repo / "tiny" / "export.json").read_text())
    assert [(v["version"], v["method"]) for v in info["head_versions"]] == [(1, "disalign"), (2, "logit-adjust")]
    features, logits = banks["val"].features.float(), banks["val"].logits
    probabilities, _ = run(version / "model.onnx", {"features": features.numpy(), "logits": logits.numpy()})
    np.testing.assert_allclose(probabilities, new.predict_proba(features, logits).numpy(), rtol=0, atol=1e-5)


def test_a_head_for_another_model_is_refused(exported, tmp_path):
    _, _, _, repo = exported
    other = load_model("tests.feature_extract.factories:tiny_net", input_size=PREP.crop)
    torch.nn.init.zeros_(other._classifier.bias)  # the same architecture with other weights: another fingerprint
    from disalign.feature_extract.models import state_fingerprint

    other.fingerprint = state_fingerprint(other.module)
    banks = {k: load_bank(v) for k, v in model_banks(other, tmp_path).items()}
    est = METHODS["joint"]().fit(banks["train"])
    before = digests(repo)
    with pytest.raises(ArtifactError, match=r"^the calibration was fitted for model sha256:.* but the Triton repository .* is sha256:"):
        add_head_version(repo, est)
    with pytest.raises(ExportError, match=r"should hold one Triton repository written by disalign export --format triton, found 0"):
        add_head_version(tmp_path, est)
    with pytest.raises(ExportError, match=r"^a Triton repository needs the model \(--model\)"):
        export_repository(tmp_path / "r", ExportSource(est))
    with pytest.raises(ExportError, match=r"^--name should be letters"):
        export_repository(tmp_path / "r", ExportSource(est, other, PREP), name="../x")
    assert digests(repo) == before and not (tmp_path / "r").exists()


def test_pbtxt_writes_protobuf_text():
    text = pbtxt({"name": "m\"x", "max_batch_size": 0, "input": [{"name": "a", "data_type": Enum("TYPE_FP32"), "dims": [1, 2]}],
                  "dynamic_batching": {}, "parameters": [{"key": "k", "value": {"string_value": "v"}}]})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == 'm"x' and list(config.input[0].dims) == [1, 2] and config.parameters["k"].string_value == "v"
