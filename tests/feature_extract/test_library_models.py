"""timm:<name>, hf:<dir>, factories with keyword arguments, torchvision num_classes: the classifier from the
library's own API, the preprocessing from the model's config, ModelOutput, and one sentence with the fix for
every failure."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from disalign.feature_extract.errors import ExtractError
from disalign.feature_extract.extract import ExtractConfig, resolve_preprocessing
from disalign.feature_extract.hf_models import hf_preprocessing
from disalign.feature_extract.models import load_model
from disalign.feature_extract.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    PreprocessingOverrides,
)
from disalign.feature_extract.timm_models import timm_preprocessing

from .library_models import CIFAR_CLASSES, TIMM_ARGS, TIMM_NAME, save_hf_resnet, save_hf_vit, save_timm_model

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="optional extra timm is not installed")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="optional extra hf is not installed")
CIFAR_TIMM = Preprocessing(resize=32, crop=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
HALF = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    return save_timm_model(tmp_path_factory.mktemp("timm"))


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory) -> Path:
    return save_hf_vit(tmp_path_factory.mktemp("hf") / "vit")


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# -- timm -------------------------------------------------------------------------------------------------
@needs_timm
def test_timm_features_are_the_pre_logits_and_the_preprocessing_its_data_config(timm_weights):
    model = load_model(f"timm:{TIMM_NAME}", str(timm_weights), model_args=TIMM_ARGS)
    assert (model.kind, model.feature_dim, model.num_classes) == ("timm", 320, 10)
    assert model.fingerprint == "sha256:" + hashlib.sha256(timm_weights.read_bytes()).hexdigest()
    assert model.preprocessing == CIFAR_TIMM and model.preprocessing_source == "timm's data config of timm:convnext_atto"
    x = images()
    features, logits = model.features_and_logits(x)
    net = model.module
    with torch.inference_mode():
        assert torch.allclose(features, net.forward_head(net.forward_features(x), pre_logits=True), atol=1e-6)
        assert torch.allclose(logits, net(x), atol=1e-6)
    assert torch.equal(model.classifier_weight, net.get_classifier().weight)


@needs_timm
def test_timm_default_data_config_is_its_eval_transform():
    import timm
    from torchvision import transforms

    model = load_model("timm:resnet18", model_args={"num_classes": 4})
    # pretrained_cfg: input 224, crop_pct 0.95, bicubic → the shorter side to ⌊224 / 0.95⌋ = 235, centre crop 224
    assert model.preprocessing == Preprocessing(resize=235, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")
    assert (model.feature_dim, model.num_classes) == (512, 4)
    steps = timm.data.create_transform(**timm.data.resolve_model_data_config(model.module)).transforms  # timm's own eval transform
    resize, crop = (next(t for t in steps if isinstance(t, kind)) for kind in (transforms.Resize, transforms.CenterCrop))
    assert (resize.size, resize.interpolation.value, tuple(crop.size)) == (235, "bicubic", (224, 224))


def test_timm_data_configs_without_an_equivalent_are_refused():
    base = {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert timm_preprocessing(base, "timm:x").resize == 256
    assert timm_preprocessing({**base, "crop_mode": "squash", "crop_pct": 1.0}, "timm:x").resize is None
    for change, what in (({"interpolation": "lanczos"}, r"resizes with 'lanczos' interpolation, which extract does not offer"),
                         ({"crop_mode": "border"}, r"\(crop_mode border, crop_pct 0\.875, input_size 224x224\) has no equivalent"),
                         ({"input_size": (3, 224, 256)}, r"input_size 224x256\) has no equivalent")):
        with pytest.raises(ExtractError, match=rf"^--model timm:x: timm's data config .*{what}.*pass a --card with the input preprocessing"):
            timm_preprocessing({**base, **change}, "timm:x")


@needs_timm
def test_timm_weights_of_another_class_count_say_which(timm_weights):
    with pytest.raises(ExtractError, match=rf"^--weights {timm_weights} has 10 classes \(head.fc.weight\) but the model was built with "
                                           r"1000; pass --model-arg num_classes=10 \(or the factory's own argument\)\.$"):
        load_model(f"timm:{TIMM_NAME}", str(timm_weights))


@needs_timm
def test_timm_errors_say_what_to_do():
    with pytest.raises(ExtractError, match=r"^--model timm:convnext_atoo is not a timm architecture; did you mean convnext_atto"):
        load_model("timm:convnext_atoo")
    with pytest.raises(ExtractError, match=r"^--model timm:resnet18: timm.create_model refused the --model-arg values \['num_clases'\]"):
        load_model("timm:resnet18", model_args={"num_clases": 3})
    with pytest.raises(ExtractError, match=r"^--model timm:resnet18: its classifier get_classifier\(\) \('fc'\) is a Identity, not an nn.Linear"):
        load_model("timm:resnet18", model_args={"num_classes": 0})


@needs_timm
def test_a_factory_returning_a_timm_model_gets_timms_classifier_and_config():
    """The issue's case: a hand-written factory of convnext_atto failed with 'found NormMlpClassifierHead'."""
    model = load_model("tests.feature_extract.factories:timm_convnext_atto", model_args={"num_classes": 5})
    assert (model.kind, model.num_classes, model.feature_dim) == ("factory", 5, 320)
    assert model.preprocessing == CIFAR_TIMM
    forced = load_model("tests.feature_extract.factories:timm_convnext_atto", classifier_layer="head.fc")
    assert forced.num_classes == 10


# -- Hugging Face -------------------------------------------------------------------------------------------
@needs_hf
def test_hf_vit_logits_of_its_output_and_features_of_its_classifier(hf_vit):
    model = load_model(f"hf:{hf_vit}")
    assert (model.kind, model.feature_dim, model.num_classes) == ("hf", 32, 10)
    assert model.class_names == CIFAR_CLASSES
    assert model.preprocessing == Preprocessing(resize=None, crop=(32, 32), mean=HALF, std=HALF, interpolation="bilinear")
    x = images()
    features, logits = model.features_and_logits(x)
    with torch.inference_mode():
        out = model.module(x)  # an ImageClassifierOutput: what `disalign extract` crashed on
        assert torch.allclose(logits, out.logits, atol=1e-6)
        assert torch.allclose(features, model.module.vit(x).last_hidden_state[:, 0], atol=1e-6)  # the [CLS] token
    assert model.fingerprint == load_model(f"hf:{hf_vit}").fingerprint  # of the saved state: the same on every load


@needs_hf
def test_hf_resnet_with_convnext_processor(tmp_path):
    model = load_model(f"hf:{save_hf_resnet(tmp_path / 'resnet')}")
    assert (model.feature_dim, model.num_classes, model.class_names) == (16, 3, None)  # LABEL_0 … are no names
    assert model.preprocessing == Preprocessing(resize=256, crop=(224, 224), mean=HALF, std=HALF, interpolation="bicubic")
    x = images(2, 64)
    features, logits = model.features_and_logits(x)
    with torch.inference_mode():
        pooled = model.module.resnet(x).pooler_output.flatten(1)  # the input of Sequential(Flatten, Linear)
        assert torch.allclose(features, pooled, atol=1e-6) and torch.allclose(logits, model.module(x).logits, atol=1e-6)


@needs_hf
def test_hf_image_processors_map_to_the_same_arithmetic():
    from transformers import BitImageProcessor, ViTImageProcessor

    bit = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3)
    assert hf_preprocessing(bit, "hf:x") == Preprocessing(resize=256, crop=(224, 224), mean=(0.48145466, 0.4578275, 0.40821073),
                                                          std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic")
    raw = ViTImageProcessor(size={"height": 16, "width": 16}, do_rescale=False, image_mean=[127.5] * 3, image_std=[127.5] * 3)
    assert hf_preprocessing(raw, "hf:x") == Preprocessing(resize=None, crop=(16, 16), mean=HALF, std=HALF)  # (v − 127.5)/127.5
    with pytest.raises(ExtractError, match=r"^--model hf:x: its ViTImageProcessor resizes with resampling filter 0; extract resizes bilinear or bicubic"):
        hf_preprocessing(ViTImageProcessor(resample=0), "hf:x")
    with pytest.raises(ExtractError, match=r"^--model hf:x: its ViTImageProcessor does not resize images"):
        hf_preprocessing(ViTImageProcessor(do_resize=False), "hf:x")


@needs_hf
def test_hf_errors_say_what_to_do(tmp_path, hf_vit):
    with pytest.raises(ExtractError, match=r"^--model hf:.*nowhere is neither a directory written by save_pretrained nor a model in "
                                           r"the local Hugging Face cache .*; pass the directory the model was saved to\.$"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(ExtractError, match=r"reads its weights from its directory; --weights is for timm:"):
        load_model(f"hf:{hf_vit}", str(tmp_path / "w.pt"))
    bare = load_model(f"hf:{save_hf_vit(tmp_path / 'bare', processor=False)}")
    assert bare.preprocessing is None
    assert bare.preprocessing_error.endswith("save it beside the model (processor.save_pretrained(dir)) or pass a --card with the input preprocessing.")


# -- the preprocessing of an extraction: card, model config, overrides ------------------------------------------
def write_card(path: Path, **fields) -> Path:
    path.write_text(json.dumps({"input": {"size": [32, 32], "mean": list(HALF), "std": list(HALF), **fields}}))
    return path


@needs_hf
def test_resolve_preprocessing_card_model_config_overrides(tmp_path, hf_vit):
    model = load_model(f"hf:{hf_vit}")
    cfg = ExtractConfig(model=f"hf:{hf_vit}", out=tmp_path / "b.h5", folder=tmp_path)
    own = model.preprocessing
    assert resolve_preprocessing(cfg, {}, model) == (own, f"the image processor of hf:{hf_vit}")
    agreeing = write_card(tmp_path / "same.json")
    assert resolve_preprocessing(replace(cfg, card=agreeing), json.loads(agreeing.read_text()), model)[0] == own
    classes_only = tmp_path / "classes.json"
    classes_only.write_text(json.dumps({"classes": CIFAR_CLASSES}))  # a card without 'input': the model's own is used
    assert resolve_preprocessing(replace(cfg, card=classes_only), {"classes": CIFAR_CLASSES}, model)[0] == own
    other = write_card(tmp_path / "other.json", interpolation="bicubic")
    with pytest.raises(ExtractError, match=rf"^the model card {other} has interpolation bicubic but the image processor of hf:.* has "
                                           r"bilinear; drop the card's 'input' \(the model's own preprocessing is used\) or override"):
        resolve_preprocessing(replace(cfg, card=other), json.loads(other.read_text()), model)
    overridden = replace(cfg, prep_overrides=PreprocessingOverrides(crop=(24, 24), interpolation="bicubic"))
    prep, source = resolve_preprocessing(overridden, {}, model)
    assert (prep.crop, prep.interpolation, prep.mean) == ((24, 24), "bicubic", HALF) and source.endswith("with the command line's overrides")
    bare = load_model(f"hf:{save_hf_vit(tmp_path / 'bare', processor=False)}")
    with pytest.raises(ExtractError, match=r"has no saved image processor"):
        resolve_preprocessing(cfg, {}, bare)


# -- factories, torchvision, outputs ------------------------------------------------------------------------
def test_factory_keyword_arguments():
    model = load_model("tests.feature_extract.factories:tiny_net_of", model_args={"num_classes": 4, "width": 3})
    assert model.num_classes == 4
    with pytest.raises(ExtractError, match=r"^--model tests.feature_extract.factories:tiny_net_of does not take the --model-arg values "
                                           r"\['depth'\] \(got an unexpected keyword argument 'depth'\); its parameters: num_classes, width\.$"):
        load_model("tests.feature_extract.factories:tiny_net_of", model_args={"depth": 3})
    with pytest.raises(ExtractError, match=r"--model-arg is for the models a library builds .* but --model .* is a file"):
        load_model(str(Path(__file__).parent / "factories.py"), model_args={"num_classes": 3})


def test_a_factory_in_the_working_directory_is_importable(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text("from torch import nn\n\ndef build(k=3):\n    return nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, k)))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    model = load_model("my_models:build", model_args={"k": 5}, classifier_layer="1")
    assert (model.feature_dim, model.num_classes) == (12, 5)
    with pytest.raises(ExtractError, match=rf"^--model absent_models:build: module 'absent_models' cannot be imported \(No module named "
                                           rf"'absent_models'\); it is looked for on the Python path and in the working directory {tmp_path}: "
                                           r"run from the directory that holds it or set PYTHONPATH\.$"):
        load_model("absent_models:build")


def test_a_head_that_is_not_a_linear_names_the_layer_to_pass():
    with pytest.raises(ExtractError, match=r"^classifier layer 'head' should be an nn.Linear or a Sequential ending in one, found "
                                           r"CustomHead; pass --classifier-layer head.fc \(its last linear layer\)\.$"):
        load_model("tests.feature_extract.factories:custom_head")
    model = load_model("tests.feature_extract.factories:custom_head", classifier_layer="head.fc")
    features, logits = model.features_and_logits(images(2, 8))
    assert features.shape == (2, 6) and logits.shape == (2, 3)


def test_model_outputs_with_logits_and_without():
    model = load_model("tests.feature_extract.factories:dict_output")
    _, logits = model.features_and_logits(images(2, 8))
    assert logits.shape == (2, 10)
    tupled = load_model("tests.feature_extract.factories:tuple_output")
    with pytest.raises(ExtractError, match=r"^the model's forward returned a tuple, expected the logits: a tensor \(N, K\) or an output "
                                           r"with a 'logits' field; wrap the model in a factory that returns the logits\.$"):
        tupled.features_and_logits(images(2, 8))


def test_a_classifier_that_does_not_give_the_logits_is_caught():
    model = load_model("tests.feature_extract.factories:sequential_head", classifier_layer="classifier.0")
    with pytest.raises(ExtractError, match=r"^the model output has shape \(2, 4\) but its classifier layer has 5 outputs; pass "
                                           r"--classifier-layer NAME of the layer that gives the logits\.$"):
        model.features_and_logits(images(2, 8))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="optional extra torchvision is not installed")
def test_torchvision_without_a_checkpoint_sets_num_classes():
    model = load_model("torchvision:resnet18", model_args={"num_classes": 10})
    assert (model.feature_dim, model.num_classes) == (512, 10)
    with pytest.raises(ExtractError, match=r"^--model torchvision:resnet18: get_model refused the --model-arg values \['depth'\]"):
        load_model("torchvision:resnet18", model_args={"depth": 3})


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    from .factories import TinyNet

    reference = TinyNet(num_classes=4)
    save_file(reference.state_dict(), str(tmp_path / "tiny.safetensors"))
    model = load_model("tests.feature_extract.factories:tiny_net_of", str(tmp_path / "tiny.safetensors"), model_args={"num_classes": 4})
    assert torch.equal(model.classifier_weight, reference.fc.weight.detach())
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExtractError, match=r"^--weights .*bad.safetensors is not a readable safetensors file"):
        load_model("tests.feature_extract.factories:tiny_net", str(tmp_path / "bad.safetensors"))
