"""Model loading: TorchScript (shared model), factories with state_dicts, classifier detection, errors."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.models import find_classifier, load_model

from .conftest import MODEL
from .factories import SequentialHead, TinyNet


def test_torchscript_shared_model_matches_its_own_outputs():
    model = load_model(str(MODEL))
    assert (model.kind, model.feature_dim, model.num_classes) == ("torchscript", 64, 10)
    assert model.fingerprint == "sha256:" + hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert model.classifier_weight.shape == (10, 64) and model.classifier_bias.shape == (10,)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features, logits = model.features_and_logits(x)
    with torch.inference_mode():
        assert torch.allclose(features, model.module.forward_features(x), atol=1e-5, rtol=0)
        assert torch.allclose(logits, model.module(x), atol=1e-5, rtol=0)
    assert torch.allclose(logits, features @ model.classifier_weight.T + model.classifier_bias, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # newer torch; TorchScript is an input format
def test_torchscript_returning_features_and_logits(tmp_path):
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 7)

        def forward(self, x):
            f = x.mean(dim=(2, 3))
            return f, self.proj(f)

    path = tmp_path / "pair.ts"
    torch.jit.script(Pair()).save(str(path))
    model = load_model(str(path), input_size=(16, 16))
    assert (model.feature_dim, model.num_classes, model.classifier_weight) == (3, 7, None)
    x = torch.randn(2, 3, 16, 16)
    features, logits = model.features_and_logits(x)
    assert torch.allclose(features, x.mean(dim=(2, 3))) and logits.shape == (2, 7)


def test_factory_with_weights_captures_the_classifier_input(tmp_path):
    reference = TinyNet()
    with torch.no_grad():
        reference.fc.bias.fill_(0.5)
    weights = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), weights)
    model = load_model("tests.feature_extract.factories:tiny_net", str(weights))
    assert (model.kind, model.feature_dim, model.num_classes) == ("factory", 8, 10)
    assert model.fingerprint == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert torch.equal(model.classifier_bias, torch.full((10,), 0.5))
    x = torch.randn(3, 3, 12, 12)
    features, logits = model.features_and_logits(x)
    with torch.no_grad():
        assert torch.allclose(features, reference.body(x), atol=1e-6) and torch.allclose(logits, reference(x), atol=1e-6)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": reference.state_dict()}, wrapped)
    assert torch.equal(load_model("tests.feature_extract.factories:tiny_net", str(wrapped)).classifier_bias, torch.full((10,), 0.5))


def test_sequential_classifier_takes_its_last_linear():
    model = load_model("tests.feature_extract.factories:sequential_head")
    assert (model.feature_dim, model.num_classes) == (5, 4)
    assert model.fingerprint.startswith("sha256:") and len(model.fingerprint) == 71
    x = torch.randn(2, 3, 8, 8)
    features, _ = model.features_and_logits(x)
    ref = SequentialHead().eval()
    with torch.no_grad():
        assert torch.allclose(features, ref.classifier[:3](ref.body(x)), atol=1e-6)
    assert find_classifier(ref, "classifier.0").out_features == 5


def test_classifier_layer_errors():
    with pytest.raises(ExtractError, match=r"could not find the classifier layer \(looked for fc, classifier, head, heads\); pass --classifier-layer NAME"):
        load_model("tests.feature_extract.factories:no_head")
    with pytest.raises(ExtractError, match=r"--classifier-layer 'nothing' is not a submodule of the model"):
        load_model("tests.feature_extract.factories:tiny_net", classifier_layer="nothing")
    with pytest.raises(ExtractError, match=r"classifier layer 'body.0' should be an nn.Linear or a Sequential ending in one, found Conv2d"):
        load_model("tests.feature_extract.factories:tiny_net", classifier_layer="body.0")
    assert load_model("tests.feature_extract.factories:no_head", classifier_layer="proj").num_classes == 2


def test_model_spec_errors(tmp_path):
    with pytest.raises(ExtractError, match=r"--model should be a TorchScript file, timm:<name>, hf:<dir>, torchvision:<arch> or package.module:function, found 'missing.ts'"):
        load_model("missing.ts")
    with pytest.raises(ExtractError, match=r"module 'no_such_pkg.mod' cannot be imported"):
        load_model("no_such_pkg.mod:build")
    with pytest.raises(ExtractError, match=r"'missing' should be a function in tests.feature_extract.factories"):
        load_model("tests.feature_extract.factories:missing")
    with pytest.raises(ExtractError, match=r"should return a torch.nn.Module, found str"):
        load_model("tests.feature_extract.factories:not_a_module")
    state = tmp_path / "state.pt"
    torch.save(TinyNet().state_dict(), state)
    with pytest.raises(ExtractError, match=r"is not a TorchScript file .*for a state_dict use --model torchvision:<arch> or package.module:function"):
        load_model(str(state))
    with pytest.raises(ExtractError, match=r"--weights is for timm:, torchvision: and package.module:function models"):
        load_model(str(MODEL), str(state))


def test_weights_errors(tmp_path):
    with pytest.raises(ExtractError, match=r"--weights file .*absent.pt does not exist"):
        load_model("tests.feature_extract.factories:tiny_net", str(tmp_path / "absent.pt"))
    other = tmp_path / "other.pt"
    torch.save(SequentialHead().state_dict(), other)
    with pytest.raises(ExtractError, match=r"does not match the model architecture: Error\(s\) in loading state_dict"):
        load_model("tests.feature_extract.factories:tiny_net", str(other))
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": TinyNet()}, pickled)  # a whole pickled module: refused, never unpickled
    with pytest.raises(ExtractError, match=r"is not a tensors-only checkpoint loadable with weights_only=True"):
        load_model("tests.feature_extract.factories:tiny_net", str(pickled))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed: the missing-extra error cannot occur")
def test_torchvision_missing_is_a_clear_error():
    with pytest.raises(ExtractError, match=r"--model torchvision:resnet18 needs the optional dependency torchvision; install it with pip install 'disalign\[torchvision\]'"):
        load_model("torchvision:resnet18")


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="optional extra torchvision is not installed")
def test_torchvision_architecture_by_name(tmp_path):
    model = load_model("torchvision:resnet18")
    assert (model.kind, model.feature_dim, model.num_classes) == ("torchvision", 512, 1000)
    with pytest.raises(ExtractError, match=r"is not a torchvision classification model; choose one of"):
        load_model("torchvision:not_a_net")
