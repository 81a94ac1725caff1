"""Throughput of feature extraction: the full pipeline (JPEG files → bank on disk) against the model bound.

Both are measured in the same run with the same model object, batch size, input shape, device, dtype
and thread count; the model bound is the forward pass alone on random tensors already on the device,
timed before and after the pipeline (the ratio uses the mean, which evens out drift on a shared
machine). Prints both rates and their ratio. Not a test.

CPU, the shared CIFAR-10-LT ResNet-32 and the shared CIFAR JPEGs (unpacked to a temp dir, or
``$DISALIGN_CIFAR_DIR``)::

    .venv/bin/python bench/extract_throughput.py --limit 8192 --workers 0 --threads 2

GPU, synthetic 256 px JPEGs and torchvision ResNet-50 with random weights (bf16 autocast, channels-last)::

    python bench/extract_throughput.py --synthetic-jpegs 50000 --repeat 4 --jpeg-size 256 \\
        --model torchvision:resnet50 --device cuda --batch-size 256 --workers 14 [--decode torchvision]

The pipeline rate counts decode + forward + parts + the final bank (``loop + assemble`` seconds of
:class:`disalign.feature_extract.extract.ExtractResult`); model loading and list parsing are reported separately.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from disalign.feature_extract.extract import ExtractConfig, extract_bank  # noqa: E402
from disalign.feature_extract.models import load_model  # noqa: E402
from disalign.feature_extract.preprocess import Preprocessing  # noqa: E402

SHARED = Path(os.environ.get("DISALIGN_SHARED_DIR", REPO / ".." / "shared")).resolve()
CIFAR_MODEL = SHARED / "models" / "cifar10lt-ir50-resnet32.ts"
CIFAR_CARD = SHARED / "models" / "cifar10lt-ir50-resnet32.json"


def _synthetic_jpeg(job: tuple[Path, int, int, int]) -> None:
    """A natural-looking image (smooth colour field + grain) so the JPEG costs what a photo costs to decode."""
    path, size, quality, seed = job
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size // 32 + 2, size // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


def make_synthetic(root: Path, count: int, size: int, quality: int, repeat: int) -> Path:
    """``count`` JPEGs of ``size`` x ``size`` under root/img/NNNN/, and an unlabelled list naming each ``repeat`` times."""
    jobs = []
    for i in range(count):
        path = root / "img" / f"{i // 1000:04d}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((path, size, quality, i))
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(_synthetic_jpeg, jobs, chunksize=256)
    listing = root / "list.txt"
    listing.write_text("".join(f"{p.relative_to(root).as_posix()}\n" for p, *_ in jobs) * repeat)
    print(f"made {count} synthetic {size}x{size} JPEGs (quality {quality}) in {time.perf_counter() - start:.1f} s", flush=True)
    return listing


def cifar_inputs(tmp: Path, limit: int | None) -> tuple[Path, Path]:
    given = os.environ.get("DISALIGN_CIFAR_DIR")
    root = Path(given) if given and (Path(given) / "train").is_dir() else tmp / "cifar10"
    if root == tmp / "cifar10":
        root.mkdir()
        subprocess.run(["tar", "xzf", str(SHARED / "data" / "cifar10-jpeg.tar.gz"), "-C", str(root)], check=True)
    lines = (SHARED / "data" / "cifar10lt-ir50" / "train.txt").read_text().splitlines()
    listing = tmp / "list.txt"
    listing.write_text("\n".join(lines[:limit] if limit else lines) + "\n")
    return root, listing


def model_bound(model, prep: Preprocessing, batch_size: int, device: torch.device, seconds: float) -> float:
    """Images/s of ``features_and_logits`` alone on a random normalised batch already on the device."""
    x = torch.randn(batch_size, 3, *prep.crop, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(5):  # warm-up: cudnn autotuning / TorchScript profiling runs
        model.features_and_logits(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        model.features_and_logits(x)
        iters += 1
        if iters % 5 == 0:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    return iters * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(CIFAR_MODEL), help="as for disalign extract (default: the shared CIFAR ResNet-32)")
    p.add_argument("--weights", help="state_dict for torchvision:/factory models (default: random weights)")
    p.add_argument("--card", help="model card (default: the shared card with the shared model, else ImageNet preprocessing)")
    p.add_argument("--root", type=Path, help="image root for --list (default: the shared CIFAR JPEGs)")
    p.add_argument("--list", dest="list_file", type=Path, help="list file (default: the CIFAR-10-LT training list)")
    p.add_argument("--limit", type=int, help="only the first N rows of the list")
    p.add_argument("--synthetic-jpegs", type=int, help="generate N synthetic JPEGs in a temp dir and use them")
    p.add_argument("--jpeg-size", type=int, default=256, help="side of the synthetic JPEGs")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--repeat", type=int, default=1, help="list each synthetic JPEG this many times (a longer run, fewer files)")
    p.add_argument("--synthetic-dir", type=Path, help="keep the synthetic JPEGs here and reuse them in later runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--threads", type=int, help="torch threads of the main process (both measurements)")
    p.add_argument("--decode", choices=("pil", "torchvision"), default="pil")
    p.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--model-seconds", type=float, default=10.0, help="how long to time the model bound")
    p.add_argument("--tmp", type=Path, help="scratch directory (default: a new temp dir, deleted afterwards)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as extract_bank sets it: the bound and the pipeline get the same kernels
    tmp = Path(tempfile.mkdtemp(prefix="extract-bench-", dir=args.tmp))
    try:
        if args.synthetic_jpegs:
            root = args.synthetic_dir or tmp / "synthetic"
            stamp = root / f"made-{args.synthetic_jpegs}x{args.jpeg_size}q{args.jpeg_quality}"
            if stamp.exists():  # reuse the JPEGs of an earlier run with the same --synthetic-dir
                listing = root / "list.txt"
                listing.write_text("".join(f"img/{i // 1000:04d}/{i:07d}.jpg\n" for i in range(args.synthetic_jpegs)) * args.repeat)
            else:
                root.mkdir(parents=True, exist_ok=True)
                listing = make_synthetic(root, args.synthetic_jpegs, args.jpeg_size, args.jpeg_quality, args.repeat)
                stamp.touch()
        elif args.list_file:
            root, listing = args.root, args.list_file
        else:
            root, listing = cifar_inputs(tmp, args.limit)
        card = args.card or (str(CIFAR_CARD) if Path(args.model).resolve() == CIFAR_MODEL else None)
        prep = Preprocessing.from_card(card) if card else Preprocessing.imagenet()
        device = torch.device(args.device)

        start = time.perf_counter()
        model = load_model(args.model, args.weights, device=args.device, input_size=prep.crop)
        load_seconds = time.perf_counter() - start
        bound = model_bound(model, prep, args.batch_size, device, args.model_seconds)
        print(f"model bound : {bound:9.1f} images/s  ({args.model}, batch {args.batch_size}, 3x{prep.crop[0]}x{prep.crop[1]}, "
              f"{args.device}{', bf16 autocast, channels-last' if device.type == 'cuda' else ', fp32'}, "
              f"{torch.get_num_threads()} threads; model load {load_seconds:.1f} s)", flush=True)

        cfg = ExtractConfig(model=args.model, weights=Path(args.weights) if args.weights else None, card=Path(card) if card else None,
                            root=root, list_file=listing, out=tmp / "bank.h5", batch_size=args.batch_size, chunk_size=args.chunk_size,
                            workers=args.workers, prefetch=args.prefetch, device=args.device, threads=args.threads,
                            feature_dtype=args.feature_dtype, decode=args.decode, quiet=True)
        result = extract_bank(cfg, model=model)
        busy = result.loop_seconds + result.assemble_seconds
        rate = result.images / busy
        size_mb = result.path.stat().st_size / 2**20
        after = model_bound(model, prep, args.batch_size, device, args.model_seconds)
        print(f"model bound : {after:9.1f} images/s  (measured again after the pipeline; the ratio uses the mean, {(bound + after) / 2:.1f})")
        bound = (bound + after) / 2
        print(f"pipeline    : {rate:9.1f} images/s  ({result.images} images, decode {args.decode} with {args.workers} workers, "
              f"loop {result.loop_seconds:.1f} s + bank {result.assemble_seconds:.2f} s; {size_mb:.0f} MiB bank; "
              f"whole call {result.seconds:.1f} s)")
        print(f"ratio       : {rate / bound:9.3f}  (pipeline / model bound)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
