"""Two-stage detectors built from constructor arguments: torchvision's by name, or a compact Faster / Mask R-CNN.

A detector is rebuilt from its card (``model`` + ``model_kwargs``) and a state_dict, never unpickled:

    card = {"task": "detection", "model": "disalign.feature_extract.detectors:compact_faster_rcnn",
            "model_kwargs": {"num_classes": 11, "image_size": 128}, "categories": [{"id": 1, "name": "airplane"}, …]}
    model = build_detector(card["model"], card["model_kwargs"])

``model`` is ``torchvision:<arch>`` (any Faster / Mask R-CNN builder of ``torchvision.models.detection``,
built with ``weights=None, weights_backbone=None``) or ``disalign.feature_extract.detectors:compact_faster_rcnn``.
torchvision is an optional extra: it is imported when a detector is built, never at import.

The compact model is what the CIFAR detection mosaics need and a CPU can train: a 6-layer conv backbone
at output stride 8, one feature map, square anchors of 16–64 px, RoIAlign 6x6 and a two-layer MLP box
head whose output (``representation`` wide) is the RoI feature DisAlign calibrates on.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from disalign.feature_extract.errors import ExtractError

TORCHVISION_PREFIX = "torchvision:"
COMPACT = "disalign.feature_extract.detectors:compact_faster_rcnn"


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CompactBackbone(nn.Sequential):
    """(N, 3, H, W) → (N, channels[-1], H/8, W/8)."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 96)):
        c0, c1, c2 = channels
        super().__init__(_conv_bn(3, c0, 2), _conv_bn(c0, c1, 2), _conv_bn(c1, c1), _conv_bn(c1, c2, 2), _conv_bn(c2, c2),
                         _conv_bn(c2, c2, dilation=2))
        self.out_channels = c2


class BasicBlock(nn.Module):
    """CIFAR ResNet block with the shared classifier's parameter names (c1, b1, c2, b2, short)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet32Trunk(nn.Module):
    """The convolutional trunk of the CIFAR ResNet-32: (N, 3, H, W) → (N, 64, H/4, W/4)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        blocks = []
        for cin, cout, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
            blocks += [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(4)]
        self.layers = nn.Sequential(*blocks)
        self.out_channels = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn(self.conv(x))))


def compact_faster_rcnn(
    num_classes: int = 11,
    *,
    channels: tuple[int, int, int] | list[int] = (32, 64, 96),
    representation: int = 256,
    roi_size: int = 6,
    image_size: int = 128,
    anchor_sizes: tuple[int, ...] | list[int] = (16, 24, 32, 48, 64),
    image_mean: tuple[float, float, float] | list[float] = (0.4914, 0.4822, 0.4465),
    image_std: tuple[float, float, float] | list[float] = (0.2023, 0.1994, 0.2010),
    mask_head: bool = False,
    trunk: str = "compact",
) -> nn.Module:
    """A small Faster R-CNN (or Mask R-CNN with ``mask_head``) for ``image_size`` inputs; K+1 = ``num_classes``.

    ``trunk``: "compact" (:class:`CompactBackbone`, stride 8) or "resnet32" (:class:`ResNet32Trunk`, stride 4,
    the trunk of the shared CIFAR classifier, whose state_dict can initialise it).
    """
    if trunk not in ("compact", "resnet32"):
        raise ExtractError(f"trunk should be 'compact' or 'resnet32', found {trunk!r}.")
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = ResNet32Trunk() if trunk == "resnet32" else CompactBackbone(tuple(channels))
    anchors = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=((1.0,),))
    kwargs = dict(
        min_size=image_size, max_size=image_size, image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=300,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=roi_size, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * roi_size**2, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_score_thresh=1e-4, box_detections_per_img=300,
    )
    if mask_head:
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        mask_heads = MaskRCNNHeads(backbone.out_channels, [64, 64], 1)
        return MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
                        mask_head=mask_heads, mask_predictor=MaskRCNNPredictor(64, 64, num_classes), **kwargs)
    return FasterRCNN(backbone, **kwargs)


def build_detector(spec: str, model_kwargs: dict | None = None) -> nn.Module:
    """A freshly initialised detector from ``spec`` (see module docstring) and its constructor arguments."""
    kwargs = dict(model_kwargs or {})
    try:
        from torchvision.models import detection
    except ImportError as exc:
        raise ExtractError("detection models need the optional dependency torchvision; install it with pip install 'disalign[torchvision]'.") from exc
    if spec.startswith(TORCHVISION_PREFIX):
        arch = spec[len(TORCHVISION_PREFIX):]
        choices = sorted(n for n in dir(detection) if n.startswith(("fasterrcnn_", "maskrcnn_")) and callable(getattr(detection, n)))
        if arch not in choices:
            raise ExtractError(f"--model torchvision:{arch} is not a two-stage torchvision detector; choose one of {', '.join(choices)}.")
        return getattr(detection, arch)(weights=None, weights_backbone=None, **kwargs)
    module_name, _, func_name = spec.partition(":")
    if not func_name:
        raise ExtractError(f"--model should be torchvision:<arch> or package.module:function for detection, found {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ExtractError(f"--model {spec}: cannot import {func_name} from {module_name} ({exc}).") from exc
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ExtractError(f"--model {spec}: the card's model_kwargs do not fit the builder ({exc}).") from exc
