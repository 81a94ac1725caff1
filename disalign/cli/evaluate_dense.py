"""Evaluation subcommands of the dense tasks, to be registered on the ``disalign`` parser:

    disalign eval-segmentation TEST.h5 --calibration CALIB --root DIR --list test.txt
        [--train TRAIN.h5 [--val VAL.h5]] [--methods joint,disalign,…] [--groups auto|ade20k|ratio]
        [--head-above 0.01] [--tail-below 0.001] [--max-steps N] [--json OUT|-] [--plots DIR] [--quiet]
    disalign eval-detection --model torchvision:fasterrcnn_… --weights W.pt --calibration CALIB
        --annotations test.json --root DIR [--train TRAIN.h5 [--val VAL.h5]] [--methods joint,disalign,…]
        [--max-steps N] [--json OUT|-] [--quiet]

With ``--train`` (the training RoI / pixel bank) every method runs by default — the baselines are fitted
on it (τ / α / T on ``--val``) — so the table has a row per method; without it, joint and the calibration.

``add_parsers(subparsers)`` adds both to the parser tree of :mod:`disalign.cli`. Each is a thin layer: argparse here, the work in
:mod:`disalign.calib.evaluation.segmentation` and :mod:`disalign.calib.evaluation.detection`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from disalign.calib.defaults import GROUPINGS, HEAD_ABOVE, TAIL_BELOW
from disalign.calib.errors import InputError
from disalign.cli.common import MAX_STEPS_HELP, HelpFormatter, method_names_help, write_text_atomic
from disalign.cli.evaluate import (
    add_report_arguments,
    check_report_outputs,
    eval_estimators,
    load_eval_banks,
    method_names,
    print_table,
    provenance,
    write_report,
)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel ratio in [0, 1] like 0.01, found {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a pixel ratio in [0, 1] like 0.01, found {text!r}")
    return value


# -- segmentation ---------------------------------------------------------------------------------
def add_segmentation_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-segmentation", help="mIoU / mAcc of calibrated pixel logits at full resolution",
                              description="mIoU / mAcc of calibrated pixel logits at full resolution.", formatter_class=HelpFormatter)
    p.add_argument("test", type=Path, help="dense test pixel bank (extract --task segmentation without --pixels-per-image)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit'")
    p.add_argument("--root", type=Path, required=True, help="directory the list's mask paths are relative to")
    p.add_argument("--list", dest="list_file", type=Path, required=True, help="the 'image mask' list the test bank was extracted from")
    p.add_argument("--train", type=Path, help="training pixel bank: needed to fit baselines other than joint")
    p.add_argument("--val", type=Path, help="validation pixel bank for the baselines' tau")
    p.add_argument("--methods", help=f"comma-separated subset of {method_names_help(',')} (default: all with --train, else joint + the calibration)")
    p.add_argument("--groups", choices=GROUPINGS, default="auto",
                   help="head/body/tail: ADE20K's official class slices 0-19/20-74/75-149, training pixel ratio thresholds, "
                        "or auto (the slices when the class statistics are ADE20K's)")
    p.add_argument("--head-above", type=_ratio, default=HEAD_ABOVE, help="head classes have a training pixel ratio above this")
    p.add_argument("--tail-below", type=_ratio, default=TAIL_BELOW, help="tail classes have a training pixel ratio below this")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    add_report_arguments(p, plots=True)
    p.set_defaults(func=run_segmentation)
    return p


def run_segmentation(args: argparse.Namespace) -> int:
    from disalign.calib.data.annotations import read_mask, read_pairs
    from disalign.calib.evaluation.segmentation import evaluate_segmentation, format_segmentation_table

    check_report_outputs(args)
    calibration, test, train, val = load_eval_banks(args.calibration, args.test, args.train, args.val)
    pairs = read_pairs(args.list_file)
    images = test.info.preprocessing.get("images")
    if images is not None and images != len(pairs):
        raise InputError(f"--list {args.list_file} has {len(pairs)} image/mask pairs but the test bank was extracted from {images}.")
    estimators, counts = eval_estimators(args.methods, calibration, train, val, test, all_with_train=True,
                                         max_steps=args.max_steps, progress=not args.quiet)
    report = evaluate_segmentation(test, estimators, lambda i: read_mask(args.root / pairs[i][1], test.num_classes),
                                   class_counts=counts, head_above=args.head_above, tail_below=args.tail_below,
                                   groups=args.groups, progress=not args.quiet)
    report["class_names"] = list(test.info.class_names)
    report["provenance"] = provenance(args, calibration, {"test": test, "train": train, "val": val}, {"list": args.list_file})
    print_table(format_segmentation_table(report) + f"\ngroups ({report['grouping']}): "
                + "; ".join(f"{g}: {len(c)} classes" for g, c in report["groups"].items()), args)
    write_report(report, calibration, json_path=args.json, plots_dir=args.plots, quiet=args.quiet)
    return 0


# -- detection ------------------------------------------------------------------------------------
def add_detection_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-detection", help="COCO AP / AP_r,c,f of the detector with its calibrated box classifier",
                              description="COCO AP / AP_r,c,f of the detector with its calibrated box classifier.",
                              formatter_class=HelpFormatter)
    p.add_argument("--model", help="detector builder (default: the card's 'model')")
    p.add_argument("--weights", type=Path, required=True, help="the detector's state_dict")
    p.add_argument("--card", type=Path, help="detector card JSON (model, model_kwargs)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory fitted on the detector's RoI bank")
    p.add_argument("--annotations", type=Path, required=True, help="COCO / LVIS JSON of the test images (categories with 'frequency')")
    p.add_argument("--root", type=Path, required=True, help="directory the images' file_name are relative to")
    p.add_argument("--train", type=Path, help="training RoI bank: needed to fit the baselines")
    p.add_argument("--val", type=Path, help="validation RoI bank: tunes the baselines' tau / alpha / temperature")
    p.add_argument("--methods", help=f"comma-separated subset of {method_names_help(',')} (default: all with --train, else joint + the calibration)")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    p.add_argument("--score-threshold", type=float, default=1e-4, help="detections below this score are dropped")
    p.add_argument("--detections-per-image", type=int, default=300, help="kept per image after NMS (LVIS: 300)")
    p.add_argument("--device", default="cpu", help="torch device of the detector")
    p.add_argument("--batch-size", type=int, default=8, help="test images per detector forward pass")
    add_report_arguments(p, plots=False)
    p.set_defaults(func=run_detection)
    return p


def detection_heads(methods: str | None, calibration, train_path: Path | None, val_path: Path | None,
                    max_steps: int | None) -> dict:
    """The box-classifier heads named in ``--methods`` → {name: calibrator, None for joint (the stage-1 head)};
    the baselines fitted on the training RoI bank (default: every method with a training bank)."""
    from disalign.calib.data.bank import load_bank
    from disalign.calib.estimators.base import check_banks_agree
    from disalign.calib.evaluation.evaluate import fit_baselines

    train = load_bank(train_path) if train_path else None
    val = load_bank(val_path) if val_path else None
    names = method_names(methods, calibration.method, has_train=train is not None)
    to_fit = [m for m in names if m not in ("joint", calibration.method)]
    if train is not None:
        calibration.check_compatible(num_classes=train.num_classes, feature_dim=train.feature_dim,
                                     model_fingerprint=train.info.model_fingerprint, source=f"train bank {train_path}")
        if val is not None:
            check_banks_agree(train.info, val.info, "val")
    fitted = fit_baselines(to_fit, train, val, max_steps=max_steps) if to_fit else {}
    fitted.update({"joint": None, calibration.method: calibration})
    return {name: fitted[name] for name in names}


def run_detection(args: argparse.Namespace) -> int:
    from disalign.calib.data.annotations import read_coco, sorted_categories
    from disalign.calib.estimators.methods import load_calibration
    from disalign.calib.evaluation.detection import detection_ap, format_detection_table, is_lvis
    from disalign.feature_extract.detection import detect, load_detector

    check_report_outputs(args)
    calibration = load_calibration(args.calibration)
    coco = read_coco(args.annotations)
    detector = load_detector(args.model, args.weights, card=args.card, categories=sorted_categories(coco), device=args.device)
    heads = detection_heads(args.methods, calibration, args.train, args.val, args.max_steps)
    report: dict = {"methods": {}, "annotations": str(args.annotations), "protocol": "lvis" if is_lvis(coco) else "coco",
                    "score_threshold": args.score_threshold, "detections_per_image": args.detections_per_image,
                    "frequency": {g: [c["id"] for c in coco["categories"] if c.get("frequency") == g] for g in ("r", "c", "f")}}
    iou_types = ["bbox", "segm"] if detector.has_masks and any("segmentation" in a for a in coco["annotations"]) else ["bbox"]
    results = detect(detector, coco, args.root, heads, batch_size=args.batch_size, score_threshold=args.score_threshold,
                     detections_per_image=args.detections_per_image, progress=not args.quiet)  # backbone and RPN once, the RoI heads per method
    for name in heads:
        report["methods"][name] = {t: detection_ap(coco, results[name], iou_type=t, max_detections=args.detections_per_image)
                                   for t in iou_types}
    report["provenance"] = provenance(args, calibration, {}, {"annotations": args.annotations, "weights": args.weights})
    print_table(format_detection_table(report)
                + f"\nAP protocol: {report['protocol']} ({'lvis LVISEval' if report['protocol'] == 'lvis' else 'pycocotools COCOeval'})", args)
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def add_parsers(subparsers) -> None:
    """Register every dense evaluation subcommand."""
    add_segmentation_parser(subparsers)
    add_detection_parser(subparsers)
