"""A memorised stand-in for the suite: the shared IR50 model fine-tuned on its own training list until it memorises it.

    .venv/bin/python bench/make_memorised.py [--work DIR] [--epochs 6] [--lr 0.02]
    .venv/bin/python bench/suite.py --extra-model DIR/models/memorised-ir50.ts

The shared suite only approaches the memorised regime (the IR50 model is at 93.4 % training top-1); a model
kept out of the shared data at 98.7 % is where the old default lost to logit adjustment. This script makes
one of that kind from what is shared: ``cifar10lt-ir50-resnet32`` fine-tuned on ``cifar10lt-ir50/train.txt``
(clean images, no augmentation, SGD lr 0.02, momentum 0.9, no weight decay, batch 128, seed 0), 6 epochs
on 2 CPU cores in about 6 minutes, to 99.7 % training top-1. It writes ``memorised-ir50.ts`` (TorchScript
with ``forward_features`` and ``fc``, as the shared models) and its card ``memorised-ir50.json`` (the IR50
card with its name, file and training accuracy changed) under ``WORK/models/``. The CIFAR JPEGs are those
bench/suite.py unpacked into WORK (or ``$DISALIGN_CIFAR_DIR``). It prints the training accuracy per epoch
and never asserts: a benchmark tool, not a test. Nothing it writes goes into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from suite import default_work_dir  # noqa: E402  (bench/ is not a package)

SOURCE = "cifar10lt-ir50-resnet32"
NAME = "memorised-ir50"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="bench/suite.py's work dir (default: its default)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    work = (args.work or default_work_dir()).resolve()
    shared = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO.parent / "shared")).resolve()
    cifar = Path(os.environ.get("DISALIGN_CIFAR_DIR", work / "cifar10-jpeg"))
    if not (cifar / "train").is_dir():
        print(f"error: the CIFAR-10 JPEGs are not in {cifar}; run bench/suite.py once (it unpacks them) or set DISALIGN_CIFAR_DIR.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    card = json.loads((shared / "models" / f"{SOURCE}.json").read_text())
    mean = torch.tensor(card["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["input"]["std"]).view(1, 3, 1, 1)
    split = card["train_split"].split(" ")[0]
    rows = [line.split() for line in (shared / split).read_text().splitlines() if line.strip()]
    images = np.stack([np.asarray(Image.open(cifar / path).convert("RGB")) for path, _ in rows])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y = torch.tensor([int(label) for _, label in rows])
    model = torch.jit.load(str(shared / "models" / f"{SOURCE}.ts"))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        start, correct = time.perf_counter(), 0
        for batch in torch.randperm(len(y), generator=generator).split(128):
            out = model(x[batch])
            loss = torch.nn.functional.cross_entropy(out, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((out.argmax(1) == y[batch]).sum())
        print(f"epoch {epoch + 1}: running training top-1 {100 * correct / len(y):.1f} % in {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        top1 = float(torch.cat([model(b).argmax(1) for b in x.split(512)]).eq(y).double().mean())
    out_dir = work / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.jit.save(model, str(out_dir / f"{NAME}.ts.tmp"))
    os.replace(out_dir / f"{NAME}.ts.tmp", out_dir / f"{NAME}.ts")
    card.update(name=NAME, torchscript={**card.get("torchscript", {}), "file": f"{NAME}.ts"},
                stage1=f"{card.get('stage1', '')}; then fine-tuned {args.epochs} epochs on its training list without augmentation "
                       f"(bench/make_memorised.py) to memorise it",
                train_top1=top1)
    (out_dir / f"{NAME}.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"training top-1 (clean images, eval mode) {100 * top1:.1f} %; wrote {out_dir / NAME}.ts and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
