"""Tiny eager models for the factory-model tests (``tests.feature_extract.factories:<name>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv → global pool → ``fc``: features are the pooled 8 channels."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class SequentialHead(nn.Module):
    """A ``classifier`` Sequential ending in a Linear (as in VGG / EfficientNet)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.2), nn.Linear(5, 4))

    def forward(self, x):
        return self.classifier(self.body(x))


class NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


def tiny_net() -> nn.Module:
    return TinyNet()


def sequential_head() -> nn.Module:
    return SequentialHead()


def no_head() -> nn.Module:
    return NoHead()


def not_a_module():
    return "nope"


class RandomInit(nn.Module):
    """Initialised from torch's global generator, unseeded: different parameters on every call (as any
    torchvision model without weights)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def one_class() -> nn.Module:
    return TinyNet(num_classes=1)


class CustomHead(nn.Module):
    """A head that is neither a Linear nor a Sequential (as timm's NormMlpClassifierHead): norm, then ``fc``."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x))


class CustomHeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = CustomHead(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


class DictOutput(TinyNet):
    """Returns ``{"logits": …}``, as a transformers model's ModelOutput holds its logits."""

    def forward(self, x):
        return {"logits": super().forward(x), "hidden": x}


class TupleOutput(TinyNet):
    def forward(self, x):
        return super().forward(x), x


def tiny_net_of(num_classes: int = 10, *, width: int = 8) -> nn.Module:
    """A factory with keyword arguments (``--model-arg num_classes=4``); ``width`` is accepted and ignored."""
    return TinyNet(num_classes)


def custom_head() -> nn.Module:
    return CustomHeadNet()


def dict_output() -> nn.Module:
    return DictOutput()


def tuple_output() -> nn.Module:
    return TupleOutput()


def timm_convnext_atto(num_classes: int = 10) -> nn.Module:
    """A factory returning a timm model (what users wrote before ``timm:``): timm's classifier and config are used."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=num_classes,
                             pretrained_cfg_overlay={"input_size": (3, 32, 32), "crop_pct": 1.0})
