#!/usr/bin/env python
"""Train the compact stage-1 Faster R-CNN of the detection benchmark; write its state_dict and card.

The benchmark (CIFAR-10 objects pasted on 128x128 backgrounds, long-tailed instance counts, COCO JSON
with LVIS-style r/c/f frequency groups) is made first; the committed ``detector.pt`` was trained on the
train splits of seeds 0-3 (8,000 scenes) on one H100:

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar
    for s in 0 1 2 3; do python ../shared/tools/cifar_mosaic.py det --cifar /tmp/cifar --out /tmp/det$s --seed $s; done
    python examples/detection/train_detector.py --data /tmp/det0 /tmp/det1 /tmp/det2 /tmp/det3 \
        --out examples/detection/detector.pt --trunk resnet32 --init ../shared/models/cifar10lt-ir50-resnet32.state_dict.pt \
        --epochs 8 --device cuda --threads 8 --half --time-limit 3
    # 5 epochs ran (45 s each) before the time limit; the learning rate decays by time under --time-limit.
    # Needs torchvision (pip install 'disalign[torchvision]'); on 2 CPU cores one epoch takes over an hour.

The detector is :func:`disalign.feature_extract.detectors.compact_faster_rcnn` (the shared CIFAR-10-LT ResNet-32
trunk at stride 4, square anchors of 16-64 px, RoIAlign 6x6, a 256-wide two-layer box head) trained with
torchvision's own losses (RPN + Fast R-CNN heads: 512 RoIs per image, 25 % foreground, plain softmax
cross-entropy), so its box classifier is biased towards the frequent categories like any stage-1
detector. The card (``<out>.json``) carries the builder and its arguments, the categories with their
frequency groups and counts, and the recipe; the weights are a plain state_dict (float16 with ``--half``,
to keep the committed fixture small; they load into the float32 model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disalign.feature_extract.detectors import COMPACT, build_detector


def load_split(root: Path, split: str) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], dict]:
    """Images (3, H, W) uint8 and targets (boxes x1 y1 x2 y2, labels 1..K) of ``<root>/<split>.json``."""
    coco = json.loads((root / f"{split}.json").read_text())
    index = {c["id"]: i + 1 for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    by_image: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images, targets = [], []
    for img in coco["images"]:
        images.append(torch.from_numpy(np.array(Image.open(root / img["file_name"]).convert("RGB"))).permute(2, 0, 1).contiguous())
        anns = by_image[img["id"]]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([index[a["category_id"]] for a in anns], dtype=torch.int64)})
    return images, targets, coco


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="cifar_mosaic.py det output(s) (train.json, train/images); joined")
    p.add_argument("--out", type=Path, required=True, help="state_dict file to write; the card goes next to it as .json")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=200)
    p.add_argument("--representation", type=int, default=256, help="width of the box head output (the RoI feature d)")
    p.add_argument("--trunk", choices=("compact", "resnet32"), default="compact", help="backbone of the detector")
    p.add_argument("--init", type=Path, help="state_dict of the shared CIFAR ResNet-32 classifier to start the resnet32 trunk from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--time-limit", type=float, help="minutes: the learning rate decays by elapsed time when that is ahead of the steps, and training stops at the limit")
    p.add_argument("--max-images", type=int, help="train on the first N scenes only (smoke tests)")
    return p


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    splits = [load_split(root, "train") for root in args.data]
    images = [x for split in splits for x in split[0]][:args.max_images]
    targets = [t for split in splits for t in split[1]][:args.max_images]
    coco = splits[0][2]
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    model_kwargs = {"num_classes": len(categories) + 1, "representation": args.representation, "image_size": int(images[0].shape[-1]),
                    "trunk": args.trunk}
    model = build_detector(COMPACT, model_kwargs)
    if args.init is not None:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        model.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = args.epochs * math.ceil(len(images) / args.batch_size)

    began = time.perf_counter()

    def progress(step: int) -> float:  # fraction of the run done: by steps, or by time under --time-limit
        by_time = (time.perf_counter() - began) / (60 * args.time_limit) if args.time_limit else 0.0
        return min(1.0, max(step / steps, by_time))

    def schedule(step: int) -> float:  # linear warm-up, then cosine to 0
        warm = min(1.0, (step + 1) / args.warmup_iters)
        return warm * 0.5 * (1 + math.cos(math.pi * progress(step)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        start, sums = time.perf_counter(), {}
        order = torch.randperm(len(images), generator=generator).tolist()
        for i in range(0, len(order), args.batch_size):
            batch_x, batch_t = [], []
            for j in order[i:i + args.batch_size]:
                x, t = images[j].to(device).float() / 255, {k: v.to(device) for k, v in targets[j].items()}
                if torch.rand((), generator=generator) < 0.5:  # horizontal flip
                    w = x.shape[-1]
                    x = x.flip(-1)
                    t = {"boxes": torch.stack([w - t["boxes"][:, 2], t["boxes"][:, 1], w - t["boxes"][:, 0], t["boxes"][:, 3]], 1),
                         "labels": t["labels"]}
                batch_x.append(x)
                batch_t.append(t)
            losses = model(batch_x, batch_t)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(batch_x)
        print(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v / len(images):.4f}" for k, v in sums.items())
              + f", {time.perf_counter() - start:.0f} s", flush=True)
        if progress(0) >= 1.0:
            print(f"time limit reached after epoch {epoch + 1} (the schedule decayed by time)", flush=True)
            break
    state = {k: (v.half() if args.half and v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    card = {
        "task": "detection",
        "model": COMPACT,
        "model_kwargs": model_kwargs,
        "background_index": 0,
        "categories": [{k: c[k] for k in ("id", "name", "frequency", "image_count", "instance_count") if k in c} for c in categories],
        "training": {"data": f"cifar_mosaic.py det --imbalance 50: {len(images)} train scenes from {len(args.data)} seed(s)", "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
                     "epochs_run": epoch + 1, "init": args.init.name if args.init else None, "augmentation": "horizontal flip", "dtype": "float16" if args.half else "float32", "device": device.type,
                     "torch": torch.__version__},
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB) and its card")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
