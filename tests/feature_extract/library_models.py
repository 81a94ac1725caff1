"""Small timm and Hugging Face models built from configs (random init, seeded) and saved locally, as people
save their own checkpoints: there is no model hub here."""

from __future__ import annotations

from pathlib import Path

import torch

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# timm's convnext_atto for 32x32 inputs: its data config then says resize 32, crop 32 (bicubic, ImageNet mean/std)
TIMM_NAME = "convnext_atto"
TIMM_ARGS = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 32, 32], "crop_pct": 1.0}}


def timm_cli_args(weights: Path) -> list[str]:
    """``--model timm:convnext_atto --weights W --model-arg …`` as a user types them."""
    return ["--model", f"timm:{TIMM_NAME}", "--weights", str(weights), "--model-arg", "num_classes=10",
            "--model-arg", 'pretrained_cfg_overlay={"input_size": [3, 32, 32], "crop_pct": 1.0}']


def save_timm_model(directory: Path) -> Path:
    """convnext_atto (10 classes) with seeded random weights, saved as a safetensors state_dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False, **TIMM_ARGS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{TIMM_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def save_hf_vit(directory: Path, *, processor: bool = True) -> Path:
    """A two-layer ViT for 32x32 images with CIFAR class names, and its ViTImageProcessor (mean = std = 0.5)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, id2label=dict(enumerate(CIFAR_CLASSES)),
                       label2id={name: i for i, name in enumerate(CIFAR_CLASSES)})
    ViTForImageClassification(config).save_pretrained(directory)
    if processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(directory)
    return directory


def save_hf_resnet(directory: Path) -> Path:
    """A tiny HF ResNet (classifier = Sequential(Flatten, Linear)) with ConvNeXt's processor, as microsoft/resnet-50 has."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_labels=3, embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1])
    ResNetForImageClassification(config).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(directory)
    return directory
