#!/usr/bin/env python
"""Train the compact stage-1 FCN of the segmentation benchmark and export it as TorchScript + card.

The benchmark (CIFAR-10 JPEGs tiled into long-tailed 64x64 scenes, pixel-exact masks) is made first;
the committed ``fcn.ts`` was trained on the train splits of seeds 0-3 (8,000 scenes) on one H100:

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar
    for s in 0 1 2 3; do python ../shared/tools/cifar_mosaic.py seg --cifar /tmp/cifar --out /tmp/seg$s --seed $s; done
    python examples/segmentation/train_fcn.py --data /tmp/seg0 /tmp/seg1 /tmp/seg2 /tmp/seg3 \
        --out examples/segmentation/fcn.ts --backbone resnet32 --init ../shared/models/cifar10lt-ir50-resnet32.state_dict.pt \
        --scale-jitter --epochs 20 --lr 0.02 --weight-decay 5e-4 --device cuda --threads 8 --time-limit 1.25
    # 16 epochs ran (4 s each) before the time limit; the learning rate decays by time under --time-limit.
    # On 2 CPU cores an epoch of 8,000 scenes takes several minutes; drop --time-limit and use fewer epochs.

The model is an output-stride-8 FCN: a trunk at 1/4 resolution (the CIFAR ResNet-32 of the shared
CIFAR-10-LT classifier, as real segmentation models start from a classification backbone, or a compact
conv trunk trained from scratch), a stride-2 conv, a dilated conv and an image-pooling context branch as
in DeepLabv3's ASPP. Trained with ordinary cross-entropy (ignore 255) on the long-tailed scenes, it is
biased towards the frequent classes as a real stage-1 model is. (Trained from scratch on 2,000 scenes the
compact FCN memorises them — training loss 0.02, val mIoU 15 % — which leaves stage 2 nothing to learn
from the training bank.) The TorchScript module exposes what ``disalign extract --task segmentation`` needs:

    forward_features(x)  (N, 3, H, W) normalised → (N, d, H/8, W/8) pixel features (post-ReLU)
    classifier           1x1 conv d → K: logits = classifier(forward_features(x))
    forward(x)           logits upsampled to (H, W), bilinear, align_corners=False

The card (``<out>.json``) holds the input size, mean/std, class names, the output stride and upsampling,
the training recipe and the validation mIoU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from disalign.calib.core.dense_metrics import IGNORE_INDEX, confusion_matrix, per_class_iou
from disalign.feature_extract.detectors import ResNet32Trunk

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)  # as the shared CIFAR-10-LT classifier


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CompactTrunk(nn.Sequential):
    """A plain conv trunk trained from scratch: (N, 3, H, W) → (N, 96, H/4, W/4)."""

    def __init__(self):
        super().__init__(conv_bn(3, 32, 2), conv_bn(32, 48), conv_bn(48, 96, 2), conv_bn(96, 96))
        self.out_channels = 96


class CompactFCN(nn.Module):
    """Output stride 8: trunk (stride 4) → stride-2 conv, dilated conv, image pooling → d = ``width`` pixel features."""

    def __init__(self, num_classes: int = 10, width: int = 128, backbone: str = "compact"):
        super().__init__()
        self.trunk = ResNet32Trunk() if backbone == "resnet32" else CompactTrunk()
        c = self.trunk.out_channels
        self.stage4 = nn.Sequential(conv_bn(c, width, 2), conv_bn(width, width), conv_bn(width, width, dilation=2))
        self.pool_proj = nn.Sequential(nn.Conv2d(width, width // 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(width + width // 2, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.trunk(x))  # (N, d, h, w)
        pooled = self.pool_proj(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, x.shape[2], x.shape[3])  # (N, d/2, h, w)
        return self.fuse(torch.cat([x, pooled], dim=1))  # (N, d, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.forward_features(x))  # (N, K, h, w)
        return F.interpolate(logits, size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)


def scale_jitter(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random square crop (40-100 % of the side) per batch, resized back: bilinear images, nearest masks."""
    size = x.shape[-1]
    side = int(torch.randint(int(0.625 * size), size + 1, (), generator=generator))
    top, left = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
    x = F.interpolate(x[..., top:top + side, left:left + side].float(), size=(size, size), mode="bilinear", align_corners=False)
    y = F.interpolate(y[:, None, top:top + side, left:left + side].float(), size=(size, size), mode="nearest")[:, 0].long()
    return x, y


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (N, 3, 64, 64) uint8 and masks (N, 64, 64) uint8 of ``<root>/<split>.txt``."""
    images, masks = [], []
    for line in (root / f"{split}.txt").read_text().split("\n"):
        if line.strip():
            image, mask = line.split()
            images.append(np.asarray(Image.open(root / image).convert("RGB")))
            masks.append(np.asarray(Image.open(root / mask)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(masks))


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> tuple[float, list[float]]:
    model.eval()
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.int64)
    for start in range(0, len(images), 100):
        x = normalise(images[start:start + 100].to(device))
        conf += confusion_matrix(model(x).argmax(1).cpu(), masks[start:start + 100], len(CLASSES))
    iou = per_class_iou(conf)
    return float(iou.nanmean()), [round(v, 4) for v in iou.tolist()]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="cifar_mosaic.py seg output(s): the train splits are joined, val.txt comes from the first")
    p.add_argument("--out", type=Path, required=True, help="TorchScript file to write; the card goes next to it as .json")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--width", type=int, default=128, help="feature channels d")
    p.add_argument("--backbone", choices=("compact", "resnet32"), default="compact", help="trunk of the FCN")
    p.add_argument("--init", type=Path, help="state_dict of the shared CIFAR ResNet-32 classifier to start the resnet32 trunk from")
    p.add_argument("--scale-jitter", action="store_true", help="random square crop + resize per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--time-limit", type=float, help="minutes: the learning rate decays by elapsed time when that is ahead of the steps, and training stops at the limit")
    p.add_argument("--max-images", type=int, help="train on the first N scenes only (smoke tests)")
    return p


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    splits = [load_split(root, "train") for root in args.data]
    train_x, train_y = torch.cat([x for x, _ in splits])[:args.max_images], torch.cat([y for _, y in splits])[:args.max_images]
    val_x, val_y = load_split(args.data[0], "val")
    model = CompactFCN(len(CLASSES), args.width, args.backbone)
    if args.init is not None:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        model.trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(train_x) / args.batch_size)
    began = time.perf_counter()

    def progress(step: int) -> float:  # fraction of the run done: by steps, or by time under --time-limit
        by_time = (time.perf_counter() - began) / (60 * args.time_limit) if args.time_limit else 0.0
        return min(1.0, max(step / steps, by_time))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(1 - progress(s), 1e-3) ** 0.9)  # poly
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = train_x[idx].to(device), train_y[idx].to(device).long()
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(device)  # horizontal flip of half the batch
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            if args.scale_jitter:
                x, y = scale_jitter(x, y, generator)
            loss = F.cross_entropy(model(normalise(x)), y, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        miou, _ = evaluate(model, val_x, val_y, device)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(train_x):.4f}, val mIoU {100 * miou:.1f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if progress(0) >= 1.0:
            print(f"time limit reached after epoch {epoch + 1} (the schedule decayed by time)", flush=True)
            break
    miou, per_class = evaluate(model, val_x, val_y, device)
    model = model.cpu().eval()
    scripted = torch.jit.script(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(args.out))
    card = {
        "task": "segmentation",
        "architecture": f"CompactFCN(width={args.width}, backbone={args.backbone}), output stride 8",
        "init": str(args.init.name) if args.init else None,
        "input": {"size": [64, 64], "mean": list(MEAN), "std": list(STD)},
        "classes": CLASSES,
        "output_stride": 8,
        "upsample": {"mode": "bilinear", "align_corners": False},
        "ignore_index": IGNORE_INDEX,
        "training": {"data": f"cifar_mosaic.py seg --imbalance 50: {len(train_x)} train scenes from {len(args.data)} seed(s)", "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
                     "loss": "cross-entropy, ignore 255",
                     "augmentation": "horizontal flip" + (", scale jitter" if args.scale_jitter else "")},
        "epochs_run": epoch + 1,
        "val_mIoU": round(miou, 4),
        "val_per_class_iou": per_class,
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and its card; val mIoU {100 * miou:.1f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
