"""``disalign export``: the calibrated model as one ONNX or TorchScript graph, or a Triton model repository.

    disalign export --calibration CALIB --model model.ts --out exported/                  # ONNX: images → probabilities, calibrated_logits
    disalign export --calibration CALIB --head-only --out head/                           # (features, logits) → the same
    disalign export --calibration CALIB --model model.ts --format torchscript --out ts/
    disalign export --calibration CALIB --model model.ts --format triton --out repo/      # a Triton model repository
    disalign export --calibration NEW --format triton --head-only --out repo/             # a re-calibration: a new head version

The argparse layer over :mod:`disalign.feature_extract.export` and :mod:`disalign.feature_extract.triton`
(``docs/export.md``). The output is checked before any work (a new or empty directory; for a new head, a
repository this command wrote) and appears whole, after the graphs were checked against the library.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from disalign.calib.errors import InputError
from disalign.cli.common import HelpFormatter, add_quiet_argument, note

FORMATS = ("onnx", "torchscript", "triton")
INPUT_TYPES = ("uint8", "float32")
# (flag, dest) of the flags only some exports read: the model's (not with --head-only) and Triton's
MODEL_FLAGS = (("--model", "model"), ("--weights", "weights"), ("--classifier-layer", "classifier_layer"), ("--card", "card"),
               ("--input-type", "input_type"))
TRITON_FLAGS = (("--name", "name"), ("--max-batch", "max_batch"))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the calibrated model as ONNX, TorchScript or a Triton model repository",
                              description="Export the frozen model, its preprocessing and the calibration as one graph "
                                          "(ONNX or TorchScript), or as a Triton model repository (docs/export.md).",
                              formatter_class=HelpFormatter)
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit' (or 'adapt --out')")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory, new or empty (--format triton --head-only: an exported repository, which gets a new head version)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="what to write")
    p.add_argument("--head-only", action="store_true",
                   help="only the calibration: (features, logits) -> probabilities, calibrated_logits; with --format triton, "
                        "a new head version in an existing repository")
    g = p.add_argument_group("model (not with --head-only)")
    g.add_argument("--model", help="the stage-1 model the calibration was fitted for: TorchScript file, torchvision:<arch> or package.module:function")
    g.add_argument("--weights", type=Path, help="state_dict for torchvision:/factory models (loaded with weights_only=True)")
    g.add_argument("--classifier-layer", help="name of the final linear layer; unset: auto-detected among fc, classifier, head, heads")
    g.add_argument("--card", type=Path, help="model card JSON; must agree with the calibration's preprocessing (needed only if it records none)")
    g.add_argument("--input-type", choices=INPUT_TYPES, help="dtype of the image input: uint8 0..255 (the default) or float32 0..1")
    t = p.add_argument_group("triton")
    t.add_argument("--name", help="model name of the ensemble; the backbone and head are NAME_backbone, NAME_head (default disalign)")
    t.add_argument("--max-batch", type=int, help="Triton's max_batch_size of the three models (default 64)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    add_quiet_argument(p)
    p.set_defaults(func=run_export)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that do not apply to the chosen export, and a missing --model, in one sentence."""
    def given(flags: tuple[tuple[str, str], ...]) -> list[str]:
        return [flag for flag, dest in flags if getattr(args, dest) is not None]

    model = given(MODEL_FLAGS)
    if args.head_only and model:
        raise InputError(f"{', '.join(model)} {'does' if len(model) == 1 else 'do'} not apply with --head-only: "
                         "the head graph takes features and logits, not images.")
    if not args.head_only and args.model is None:
        raise InputError("--model is required (the frozen model the calibration was fitted for), or pass --head-only to export the calibration alone.")
    triton = given(TRITON_FLAGS)
    if args.format != "triton" and triton:
        raise InputError(f"{', '.join(triton)} only {'applies' if len(triton) == 1 else 'apply'} to --format triton.")
    if args.format == "triton" and args.head_only and triton:
        raise InputError(f"{', '.join(triton)} {'does' if len(triton) == 1 else 'do'} not apply to a new head version: "
                         "the repository keeps its own.")
    if args.format == "torchscript" and args.opset is not None:
        raise InputError("--opset only applies to the ONNX formats (onnx, triton).")
    if args.opset is not None and not 13 <= args.opset <= 20:
        raise InputError(f"--opset should be between 13 and 20, found {args.opset}.")


def run_export(args: argparse.Namespace) -> int:
    check_flags(args)
    from disalign.calib.files import check_new_directory

    adding_head = args.format == "triton" and args.head_only
    if not adding_head:
        if args.format == "triton" and any(args.out.glob("*/export.json")):
            raise InputError(f"--out {args.out} already holds an exported Triton repository; pass --head-only to publish this "
                             "calibration as its next head version, or give a new directory.")
        check_new_directory(args.out, "--out")  # before loading anything: nothing in it is ever replaced

    from disalign.calib.artifact.publish import current_version
    from disalign.feature_extract.export import OPSET, ExportSource, export_graph
    from disalign.feature_extract.triton import (
        DEFAULT_MAX_BATCH,
        DEFAULT_NAME,
        add_head_version,
        export_repository,
    )
    from disalign.service.runtime import calibration_version, read_calibration

    calibrator = read_calibration(args.calibration)
    provenance = {"calibration": str(args.calibration), "calibration_version": calibration_version(calibrator),
                  "calibration_artifact": current_version(args.calibration)}
    opset = args.opset or OPSET
    if adding_head:
        version = add_head_version(args.out, calibrator, provenance, opset=opset)
        note(f"wrote {version}: head version {version.name} ({calibrator.method}, {provenance['calibration_version']}); "
             "the backbone and the ensemble are unchanged.", quiet=args.quiet)
        return 0
    source = ExportSource(calibrator, provenance=provenance)
    if not args.head_only:
        from disalign.feature_extract.models import load_model

        preprocessing = export_preprocessing(calibrator.meta_.preprocessing, args.card)
        model = load_model(args.model, str(args.weights) if args.weights else None, classifier_layer=args.classifier_layer,
                           device="cpu", input_size=preprocessing.crop)
        source = ExportSource(calibrator, model, preprocessing, args.input_type or "uint8", {**provenance, "model_spec": args.model})
    if args.format == "triton":
        out = export_repository(args.out, source, name=args.name or DEFAULT_NAME, max_batch=args.max_batch or DEFAULT_MAX_BATCH,
                                opset=opset)
    else:
        out = export_graph(args.out, source, args.format, opset=opset)
    note(f"wrote {out} ({args.format}, {'head' if args.head_only else 'fused'} graph of {calibrator.method}); see {out}/"
         f"{'*/' if args.format == 'triton' else ''}export.json.", quiet=args.quiet)
    return 0


def export_preprocessing(record: dict | None, card: Path | None):
    """The preprocessing to fold in: the calibration's record (its banks'), or a model card, which must then agree."""
    from disalign.feature_extract.preprocess import Preprocessing
    from disalign.service.preprocessing import recorded_preprocessing

    recorded = recorded_preprocessing(record)
    if card is None:
        if recorded is None:
            raise InputError("the calibration does not record the preprocessing of its banks, so the graph cannot fold it in: "
                             "pass --card with the model's input size, mean and std.")
        return recorded
    chosen = Preprocessing.from_card(card)
    if recorded is not None:
        for name, mine, theirs in (("resize", chosen.resize, recorded.resize), ("input.size", chosen.crop, recorded.crop),
                                   ("input.mean", chosen.mean, recorded.mean), ("input.std", chosen.std, recorded.std)):
            same = (mine == theirs if mine is None or theirs is None or isinstance(mine, int)
                    else all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(mine, theirs, strict=True)))
            if not same:
                raise InputError(f"the model card {card} has {name} {list(mine) if isinstance(mine, tuple) else mine} but the "
                                 f"calibration's banks were extracted with {list(theirs) if isinstance(theirs, tuple) else theirs}; "
                                 "export without --card (the calibration's preprocessing is used).")
    return chosen
