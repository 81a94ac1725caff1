"""``disalign extract --task segmentation|detection``: the dense tasks' flags and their dispatch.

    disalign extract --task segmentation --model fcn.ts --card fcn.json --root DIR --list train.txt --out train.h5 \\
        [--pixels-per-image N] [--balanced] [--class-stats objectInfo150.txt | --class-counts-from TRAIN.h5]
    disalign extract --task detection --model torchvision:fasterrcnn_mobilenet_v3_large_fpn --weights det.pt \\
        --card det.json --root DIR --annotations train.json --out train.h5 [--rois-per-image 512] [--fg-fraction 0.25]

:func:`add_dense_arguments` adds ``--task`` and these flags to the ``extract`` parser of
:mod:`feature_extract.cli`; :func:`run_dense` runs a segmentation or detection extraction from its
Namespace (the only place that sees it). ``python -m feature_extract.dense_cli`` takes the same flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

TASKS = ("classification", "segmentation", "detection")


def add_dense_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="classification", help="what the rows of the bank are: images, pixels or RoIs")
    g = parser.add_argument_group("segmentation (--task segmentation)")
    g.add_argument("--pixels-per-image", type=int, help="labelled feature-map pixels sampled per image (default: every pixel, the dense test layout)")
    g.add_argument("--balanced", action="store_true", help="sample pixels uniformly over the classes present in each image")
    g.add_argument("--class-stats", type=Path, help="ADE20K objectInfo150-style table: class frequencies from its Ratio column")
    g = parser.add_argument_group("detection (--task detection)")
    g.add_argument("--annotations", type=Path, help="COCO / LVIS JSON of the images (file_name relative to --root)")
    g.add_argument("--rois-per-image", type=int, default=512, help="RoIs sampled per image (Fast R-CNN sampling)")
    g.add_argument("--fg-fraction", type=float, default=0.25, help="largest fraction of foreground RoIs per image")


def run_dense(args: argparse.Namespace) -> int:
    """Run the segmentation or detection extraction described by ``args``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    prep = None
    if args.crop is not None or args.mean is not None or args.std is not None:
        from feature_extract.preprocess import Preprocessing

        base = Preprocessing.from_card(args.card) if args.card else Preprocessing.imagenet()
        prep = Preprocessing(resize=None, crop=args.crop or base.crop, mean=args.mean or base.mean, std=args.std or base.std)
    if args.task == "segmentation":
        from feature_extract.errors import ExtractError
        from feature_extract.segmentation import SegmentationExtractConfig, extract_segmentation_bank

        if args.list_file is None or args.root is None:
            raise ExtractError("--task segmentation needs --root DIR and --list LIST.txt of 'image mask' pairs.")
        path = extract_segmentation_bank(SegmentationExtractConfig(
            model=args.model, root=args.root, list_file=args.list_file, out=args.out, weights=args.weights, card=args.card,
            prep=prep, pixels_per_image=args.pixels_per_image, balanced=args.balanced, class_stats=args.class_stats,
            class_counts_from=args.class_counts_from, seed=args.seed, batch_size=min(args.batch_size, 64), device=args.device,
            feature_dtype=args.feature_dtype, overwrite=args.overwrite, progress=not args.quiet))
    else:
        from feature_extract.detection import DetectionExtractConfig, extract_detection_bank
        from feature_extract.errors import ExtractError

        if args.annotations is None or args.root is None:
            raise ExtractError("--task detection needs --root DIR and --annotations COCO.json.")
        path = extract_detection_bank(DetectionExtractConfig(
            model=args.model, weights=args.weights, card=args.card, root=args.root, annotations=args.annotations, out=args.out,
            rois_per_image=args.rois_per_image, fg_fraction=args.fg_fraction, class_counts_from=args.class_counts_from,
            seed=args.seed, batch_size=min(args.batch_size, 16), device=args.device, feature_dtype=args.feature_dtype,
            overwrite=args.overwrite, progress=not args.quiet))
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from calib.cli_common import run_command
    from feature_extract.cli import configure

    parser = configure(argparse.ArgumentParser(prog="python -m feature_extract.dense_cli", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_command(run_dense, args)


if __name__ == "__main__":
    sys.exit(main())
