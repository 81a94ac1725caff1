"""``disalign extract``: argparse at the edge, :func:`extract_bank` (or the dense tasks' extraction) inside.

    disalign extract --model M [--weights W] [--card CARD.json] (--root DIR --list LIST.txt | --folder DIR)
                     --out BANK.h5 [--views N] [--batch-size B] [--workers W] [--device cpu|cuda]
                     [--class-counts-from TRAIN.h5] [--overwrite] [--strict]
    disalign extract --task segmentation --model fcn.ts --card fcn.json --root DIR --list train.txt --out train.h5 \\
        [--pixels-per-image N] [--balanced] [--class-stats objectInfo150.txt | --class-counts-from TRAIN.h5]
    disalign extract --task detection --model torchvision:fasterrcnn_mobilenet_v3_large_fpn --weights det.pt \\
        --card det.json --root DIR --annotations train.json --out train.h5 [--rois-per-image 512] [--fg-fraction 0.25]

Under torchrun every rank runs ``python -m disalign extract …`` (``torchrun … -m disalign extract …``).

Nothing heavy is imported until :func:`run` is called.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from disalign.calib.defaults import DEFAULT_MAX_PIXELS
from disalign.cli.common import MODEL_ARG_HELP, HelpFormatter, add_quiet_argument, model_arg, model_args_dict

HELP = "extract a feature bank (HDF5) from images and a frozen stage-1 model"


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers like 0.485,0.456,0.406, found {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, found {len(values)} in {text!r}")
    return values  # type: ignore[return-value]


def _size(text: str) -> tuple[int, int]:
    try:
        values = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x224 (H x W), found {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x224 (H x W), found {text!r}")
    return values[0], values[1]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the extract flags to ``parser`` (shared by the subcommand and ``python -m disalign extract``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="TorchScript file, timm:<name>, hf:<dir> (save_pretrained), torchvision:<arch>, or package.module:function")
    g.add_argument("--weights", type=Path,
                   help="state_dict (.pt/.pth, loaded with weights_only=True, or .safetensors) for timm:, torchvision: and factory models")
    g.add_argument("--model-arg", dest="model_args", action="append", type=model_arg, metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    g.add_argument("--classifier-layer",
                   help="name of the final linear layer; unset: timm's get_classifier(), else the first of fc, classifier, head, heads")
    g.add_argument("--card", type=Path,
                   help="model card JSON: input.size/mean/std (+ optional resize, interpolation), classes; unset: the model's own "
                        "preprocessing (timm, hf:) or ImageNet defaults")
    g = parser.add_argument_group("images")
    g.add_argument("--root", type=Path, help="directory the --list paths are relative to")
    g.add_argument("--list", dest="list_file", type=Path, help="list file, one 'relative/path [label]' per line")
    g.add_argument("--folder", type=Path, help="image-folder tree root/<class>/<image> (instead of --root/--list)")
    g = parser.add_argument_group("preprocessing (override the card or the model's own config; without either: ImageNet defaults)")
    g.add_argument("--resize", type=int, help="shorter side before the centre crop; unset: the card's, or 256 without a card")
    g.add_argument("--no-resize", action="store_true", help="resize straight to the crop size")
    g.add_argument("--crop", type=_size, help="crop size H or HxW; unset: the card's input.size, or 224 without a card")
    g.add_argument("--mean", type=_floats3, help="R,G,B mean of 0..1 pixels")
    g.add_argument("--std", type=_floats3, help="R,G,B std of 0..1 pixels")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic"), help="resampling filter of the resize; unset: the card's or the model's, else bilinear")
    g.add_argument("--views", type=int, default=1, help="views per image: 0 clean, 1..N-1 seeded augmentations")
    g.add_argument("--augment", choices=("standard", "official"), default="standard",
                   help="views 1..N-1: standard (pad 4 + crop + flip up to 64 px, else random resized crop + flip) or official "
                        "(the official DisAlign stage 2: random resized crop, flip, colour jitter 0.4; docs/extract.md)")
    g.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    g.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (no DCT downscale)")
    g.add_argument("--decode", choices=("pil", "torchvision"), default="pil",
                   help="pil: Pillow in the workers; torchvision: JPEGs decoded on the device (nvJPEG on CUDA), --views 1 only")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip images with more pixels than this (the default of serve too)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="bank to write (HDF5)")
    g.add_argument("--feature-dtype", choices=("float16", "float32"), default="float16", help="dtype of the stored features")
    g.add_argument("--class-counts-from", type=Path,
                   help="training bank (or model card JSON with class_counts) to copy per-class training counts from; "
                        "unset: counted from this list's labels")
    g.add_argument("--overwrite", action="store_true", help="replace an existing complete bank")
    g.add_argument("--strict", action="store_true", help="abort on the first image that cannot be decoded")
    g.add_argument("--assemble", choices=("concat", "virtual"), default="concat",
                   help="under torchrun: one concatenated bank, or virtual datasets over per-rank shards")
    g = parser.add_argument_group("execution")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    g.add_argument("--chunk-size", type=int, default=4096, help="list rows per resumable part")
    g.add_argument("--workers", type=int,
                   help="DataLoader decoding processes (0: decode in the main process); default: the cores available to this "
                        "process, shared by the ranks of a node under torchrun")
    g.add_argument("--prefetch", type=int, default=4, help="batches in flight per worker")
    g.add_argument("--threads", type=int, help="torch threads of the main process; unset: torch's choice")
    add_quiet_argument(g)
    add_dense_arguments(parser)  # --task segmentation|detection and their flags
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``extract`` on the top-level ``disalign`` subparsers; sets ``func=run``."""
    parser = subparsers.add_parser("extract", help=HELP, description=HELP, formatter_class=HelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """argparse Namespace → :class:`ExtractConfig` (the only place that sees the Namespace)."""
    from disalign.feature_extract.extract import ExtractConfig
    from disalign.feature_extract.preprocess import PreprocessingOverrides

    overrides = PreprocessingOverrides(resize=args.resize, no_resize=args.no_resize, crop=args.crop, mean=args.mean, std=args.std,
                                       interpolation=args.interpolation)
    return ExtractConfig(
        model=args.model,
        out=args.out,
        list_file=args.list_file,
        root=args.root,
        folder=args.folder,
        weights=args.weights,
        model_args=model_args_dict(args.model_args),
        card=args.card,
        prep_overrides=overrides,
        classifier_layer=args.classifier_layer,
        views=args.views,
        augment=args.augment,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        workers=args.workers,
        prefetch=args.prefetch,
        device=args.device,
        threads=args.threads,
        feature_dtype=args.feature_dtype,
        class_counts_from=args.class_counts_from,
        overwrite=args.overwrite,
        strict=args.strict,
        max_pixels=args.max_pixels,
        draft=not args.no_draft,
        assemble=args.assemble,
        decode=args.decode,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Run the extraction described by ``args``; DisalignError propagates to the caller's ``error:`` line."""
    from disalign.feature_extract.distributed import init_distributed
    from disalign.feature_extract.extract import extract_bank

    if args.task != "classification":
        return run_dense(args)
    cfg = config_from_args(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    dist, device = init_distributed(cfg.device)
    try:
        from dataclasses import replace

        result = extract_bank(replace(cfg, device=device), dist=dist)
    finally:
        dist.close()
    if dist.is_main and not args.quiet:
        print(f"wrote {result.path}")
    return 0


# -- the dense tasks: --task segmentation|detection ------------------------------------------------
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
    if args.model_args or args.interpolation:
        from disalign.calib.errors import InputError

        raise InputError(f"--model-arg and --interpolation are for --task classification, not --task {args.task}.")
    prep = None
    if args.crop is not None or args.mean is not None or args.std is not None:
        from disalign.feature_extract.preprocess import Preprocessing

        base = Preprocessing.from_card(args.card) if args.card else Preprocessing.imagenet()
        prep = Preprocessing(resize=None, crop=args.crop or base.crop, mean=args.mean or base.mean, std=args.std or base.std)
    if args.task == "segmentation":
        from disalign.feature_extract.errors import ExtractError
        from disalign.feature_extract.segmentation import SegmentationExtractConfig, extract_segmentation_bank

        if args.list_file is None or args.root is None:
            raise ExtractError("--task segmentation needs --root DIR and --list LIST.txt of 'image mask' pairs.")
        path = extract_segmentation_bank(SegmentationExtractConfig(
            model=args.model, root=args.root, list_file=args.list_file, out=args.out, weights=args.weights, card=args.card,
            prep=prep, pixels_per_image=args.pixels_per_image, balanced=args.balanced, class_stats=args.class_stats,
            class_counts_from=args.class_counts_from, seed=args.seed, batch_size=min(args.batch_size, 64), device=args.device,
            feature_dtype=args.feature_dtype, overwrite=args.overwrite, progress=not args.quiet))
    else:
        from disalign.feature_extract.detection import DetectionExtractConfig, extract_detection_bank
        from disalign.feature_extract.errors import ExtractError

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
