"""The ``disalign`` command line: a thin layer over the estimators, the extractor and the server.

    disalign fit TRAIN.h5 [--val VAL.h5] [--rho FLOAT|auto] [--epochs N] [--method disalign|…] --out CALIB_DIR
    disalign eval TEST.h5 --calibration CALIB_DIR [--train TRAIN.h5] [--val VAL.h5]
                  [--methods joint,disalign,logit-adjust,tau-norm,lws,crt,ncm] [--json OUT] [--plots DIR]
    disalign extract …   (feature_extract.cli)
    disalign serve …     (service.cli)

Any :class:`~calib.errors.DisalignError` is printed as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from calib.defaults import FEW_BELOW, MANY_ABOVE
from calib.errors import DisalignError, InputError

ALL_METHODS = ("joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm")


def parse_bytes(text: str) -> int:
    """'512M', '2G', '1.5GiB' or a plain byte count → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, found {text!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def parse_number_or_auto(text: str, *, high: float | None, expected: str) -> float | str:
    """'auto', or a number in [0, high) ([0, ∞) without ``high``)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected} or 'auto', found {text!r}") from None
    if value < 0 or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"expected {expected} or 'auto', found {text!r}")
    return value


def parse_rho(text: str) -> float | str:
    return parse_number_or_auto(text, high=None, expected="a number >= 0")


def parse_val_weight(text: str) -> float | str:
    return parse_number_or_auto(text, high=1.0, expected="a number in [0, 1)")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- fit ------------------------------------------------------------------------------------------
def add_fit_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a calibration on a training bank",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("train", type=Path, help="training bank (HDF5)")
    p.add_argument("--val", type=Path, help="validation bank, used to choose rho / tau")
    p.add_argument("--method", default="disalign", help=f"one of {', '.join(ALL_METHODS)}")
    p.add_argument("--rho", type=parse_rho, default="auto", help="GRW exponent, or 'auto' (grid search on --val)")
    p.add_argument("--epochs", type=int, help="SGD epochs of disalign (10), lws (5) and crt (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cosine", action="store_true", help="gate on L2-normalised features (cosine classifiers)")
    p.add_argument("--no-magnitude", action="store_true", help="ablation: no magnitude term alpha (= --magnitude off)")
    p.add_argument("--magnitude", choices=("auto", "on", "off"), default="auto",
                   help="disalign magnitude term alpha; auto: chosen on --val for classification banks, on otherwise")
    p.add_argument("--no-margin", action="store_true", help="ablation: no margin term beta")
    p.add_argument("--no-grw", action="store_true", help="ablation: plain cross-entropy instead of GRW")
    p.add_argument("--max-memory", type=parse_bytes, help="stream the training bank when its rows exceed this (e.g. 512M)")
    p.add_argument("--head-form", choices=("auto", "residual", "blend"), default="auto",
                   help="disalign head: residual (1+σα)z+σβ, blend σ(αz+β)+(1-σ)z (eq. 5); auto: as the official code of the bank's task")
    p.add_argument("--gate", choices=("auto", "constant", "normal", "bn-relu"), default="auto",
                   help="disalign gate init: constant v=0.1, normal N(0,0.01²), bn-relu sigmoid(ReLU(BN(conv))); auto: by task")
    p.add_argument("--no-gate-standardize", action="store_true", help="train the disalign gate on raw features")
    p.add_argument("--selection", choices=("nll", "accuracy"), default="nll", help="what the validation bank picks rho by")
    p.add_argument("--val-weight", type=parse_val_weight, default=0.0,
                   help="share of the disalign loss carried by validation rows mixed into the fit (cross-fitted), or 'auto'")
    p.add_argument("--out", type=Path, required=True, help="calibration directory to write")
    p.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from calib.disalign import DisAlign
    from calib.methods import method_class

    cls = method_class(args.method)
    if cls is DisAlign:
        estimator = DisAlign(rho=args.rho, epochs=args.epochs or 10, seed=args.seed, cosine=args.cosine,
                             use_magnitude=False if args.no_magnitude else {"auto": "auto", "on": True, "off": False}[args.magnitude],
                             use_margin=not args.no_margin, use_grw=not args.no_grw,
                             head_form=args.head_form, gate=args.gate, gate_standardize=not args.no_gate_standardize,
                             selection=args.selection, val_weight=args.val_weight)
        estimator.fit(args.train, val=args.val, max_memory=args.max_memory)
    else:
        accepted = cls().get_params()
        kwargs = {name: value for name, value in (("epochs", args.epochs), ("seed", args.seed)) if name in accepted and value is not None}
        estimator = cls(**kwargs).fit(args.train, val=args.val)
    estimator.save(args.out)
    report = estimator.meta_.report
    summary = {k: report[k] for k in ("rho", "val_weight", "tau", "validation", "fit_seconds") if k in report}
    print(f"wrote {args.method} calibration to {args.out}: {json.dumps(summary)}")
    return 0


# -- eval -----------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a calibration and the baselines on a test bank",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("test", type=Path, help="test bank (HDF5)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit'")
    p.add_argument("--train", type=Path, help="training bank: needed to fit the baselines")
    p.add_argument("--val", type=Path, help="validation bank: tunes the baselines' tau")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all with --train, else joint + the calibration)")
    p.add_argument("--many-above", type=int, default=MANY_ABOVE, help="'many' classes have more training samples than this")
    p.add_argument("--few-below", type=int, default=FEW_BELOW, help="'few' classes have fewer training samples than this")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from calib.evaluate import evaluate_methods, format_table

    calibration, test, train, val = load_eval_banks(args.calibration, args.test, args.train, args.val)
    estimators, class_counts = eval_estimators(args.methods, calibration, train, val, test, all_with_train=True)
    report = evaluate_methods(test, estimators, class_counts=class_counts, many_above=args.many_above, few_below=args.few_below)
    print(format_table(report))
    write_report(report, calibration, json_path=args.json, plots_dir=args.plots)
    return 0


def load_eval_banks(calibration_dir: Path, test_path: Path, train_path: Path | None, val_path: Path | None):
    """The eval commands' inputs: the calibration and the test/train/val banks, checked against each other."""
    from calib.bank import load_bank
    from calib.estimator import check_banks_agree
    from calib.methods import load_calibration

    calibration = load_calibration(calibration_dir)
    test = load_bank(test_path)
    calibration.check_compatible(num_classes=test.num_classes, feature_dim=test.feature_dim,
                                 model_fingerprint=test.info.model_fingerprint, source=f"test bank {test_path}")
    train = load_bank(train_path) if train_path else None
    val = load_bank(val_path) if val_path else None
    for role, bank in (("train", train), ("val", val)):
        if bank is not None:
            check_banks_agree(test.info, bank.info, role)
    return calibration, test, train, val


def eval_estimators(methods: str | None, calibration, train, val, test, *, all_with_train: bool):
    """The estimators named in ``--methods`` (default: every method when ``all_with_train`` and a training
    bank is given, else joint + the calibration), fitted, and the training class counts → (estimators, counts)."""
    import numpy as np

    from calib.evaluate import fit_baselines

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else (
        list(ALL_METHODS) if all_with_train and train is not None else ["joint", calibration.method])
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"--methods should be a subset of {','.join(ALL_METHODS)}, found {','.join(unknown)}.")
    to_fit = [m for m in names if m not in ("joint", calibration.method)]
    if to_fit and train is None:
        raise InputError(f"--train is needed to fit {', '.join(to_fit)}; pass the training bank or drop them from --methods.")
    # joint learns nothing, so without a training bank it is "fitted" on the test bank's header only.
    fitted = fit_baselines([m for m in names if m != calibration.method], train if train is not None else test, val)
    fitted[calibration.method] = calibration
    counts = calibration.meta_.class_counts if calibration.meta_.class_counts is not None else test.training_class_counts()
    return {name: fitted[name] for name in names}, np.asarray(counts)


def write_report(report: dict, calibration, *, json_path: Path | None, plots_dir: Path | None) -> None:
    """The optional outputs of the eval commands: the JSON report and the PNG plots (each written atomically)."""
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    if plots_dir:
        from calib.plots import write_plots

        rho_curve = calibration.meta_.report.get("rho_curve") if calibration.method == "disalign" else None
        written = write_plots(plots_dir, report, rho_curve=rho_curve)
        print(f"wrote {len(written)} plots to {plots_dir}")


# -- entry point ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disalign", description="Post-hoc distribution alignment of long-tail classifiers.")
    subparsers = parser.add_subparsers(dest="command", required=True,
                                       metavar="{fit,eval,eval-segmentation,eval-detection,extract,serve}")
    add_fit_parser(subparsers)
    add_eval_parser(subparsers)
    from calib.dense_cli import add_parsers as add_dense_eval_parsers

    add_dense_eval_parsers(subparsers)
    from feature_extract.cli import add_parser as add_extract_parser
    from service.cli import add_parser as add_serve_parser

    add_extract_parser(subparsers)
    add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand; a user-facing error becomes one ``error: …`` line and exit status 2."""
    try:
        return int(func(args) or 0)
    except DisalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full …: still one sentence, no traceback
        print(f"error: {exc.strerror or exc} ({exc.filename or 'file'}).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
