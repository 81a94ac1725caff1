"""``disalign extract`` (and ``python -m feature_extract``): argparse at the edge, :func:`extract_bank` inside.

    disalign extract --model M [--weights W] [--card CARD.json] (--root DIR --list LIST.txt | --folder DIR)
                     --out BANK.h5 [--views N] [--batch-size B] [--workers W] [--device cpu|cuda]
                     [--class-counts-from TRAIN.h5] [--overwrite] [--strict]

Nothing heavy is imported until :func:`run` is called.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from calib.cli_common import HelpFormatter, add_quiet_argument
from calib.defaults import DEFAULT_MAX_PIXELS

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
    """Add the extract flags to ``parser`` (shared by the subcommand and ``python -m feature_extract``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="TorchScript file, torchvision:<arch>, or package.module:function")
    g.add_argument("--weights", type=Path, help="state_dict for torchvision:/factory models (loaded with weights_only=True)")
    g.add_argument("--classifier-layer", help="name of the final linear layer; unset: auto-detected among fc, classifier, head, heads")
    g.add_argument("--card", type=Path, help="model card JSON: input.size/mean/std (+ optional resize), classes")
    g = parser.add_argument_group("images")
    g.add_argument("--root", type=Path, help="directory the --list paths are relative to")
    g.add_argument("--list", dest="list_file", type=Path, help="list file, one 'relative/path [label]' per line")
    g.add_argument("--folder", type=Path, help="image-folder tree root/<class>/<image> (instead of --root/--list)")
    g = parser.add_argument_group("preprocessing (override the card; without a card: ImageNet defaults)")
    g.add_argument("--resize", type=int, help="shorter side before the centre crop; unset: the card's, or 256 without a card")
    g.add_argument("--no-resize", action="store_true", help="resize straight to the crop size")
    g.add_argument("--crop", type=_size, help="crop size H or HxW; unset: the card's input.size, or 224 without a card")
    g.add_argument("--mean", type=_floats3, help="R,G,B mean of 0..1 pixels")
    g.add_argument("--std", type=_floats3, help="R,G,B std of 0..1 pixels")
    g.add_argument("--views", type=int, default=1, help="views per image: 0 clean, 1..N-1 seeded augmentations")
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
    g.add_argument("--workers", type=int, default=4, help="DataLoader decoding processes (0: decode in the main process)")
    g.add_argument("--prefetch", type=int, default=4, help="batches in flight per worker")
    g.add_argument("--threads", type=int, help="torch threads of the main process; unset: torch's choice")
    add_quiet_argument(g)
    from feature_extract.dense_cli import add_dense_arguments

    add_dense_arguments(parser)  # --task segmentation|detection and their flags (feature_extract.dense_cli)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``extract`` on the top-level ``disalign`` subparsers; sets ``func=run``."""
    parser = subparsers.add_parser("extract", help=HELP, description=HELP, formatter_class=HelpFormatter)
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m feature_extract`` (the same flags, no subcommand)."""
    parser = argparse.ArgumentParser(prog="python -m feature_extract", description=HELP, formatter_class=HelpFormatter)
    return configure(parser)


def config_from_args(args: argparse.Namespace):
    """argparse Namespace → :class:`ExtractConfig` (the only place that sees the Namespace)."""
    from feature_extract.extract import ExtractConfig
    from feature_extract.preprocess import Preprocessing

    prep = None
    overrides = (args.resize, args.crop, args.mean, args.std)
    if args.no_resize or any(v is not None for v in overrides):
        base = Preprocessing.from_card(args.card) if args.card else Preprocessing.imagenet()
        prep = Preprocessing(
            resize=None if args.no_resize else (args.resize if args.resize is not None else base.resize),
            crop=args.crop or base.crop,
            mean=args.mean or base.mean,
            std=args.std or base.std,
        )
    return ExtractConfig(
        model=args.model,
        out=args.out,
        list_file=args.list_file,
        root=args.root,
        folder=args.folder,
        weights=args.weights,
        card=args.card,
        prep=prep,
        classifier_layer=args.classifier_layer,
        views=args.views,
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
    from feature_extract.distributed import init_distributed
    from feature_extract.extract import extract_bank

    if args.task != "classification":
        from feature_extract.dense_cli import run_dense

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
