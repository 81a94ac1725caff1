"""The ``calib`` subcommands of ``disalign``: a thin layer over the estimators.

    disalign fit TRAIN.h5 [--val VAL.h5] [--rho FLOAT|auto] [--epochs N] [--method disalign|…] --out CALIB_DIR
    disalign eval TEST.h5 --calibration CALIB_DIR [--train TRAIN.h5] [--val VAL.h5]
                  [--methods joint,disalign,logit-adjust,tau-norm,lws,crt,ncm,tde] [--max-steps N] [--json OUT|-] [--plots DIR]
    disalign predict BANK.h5 --calibration CALIB_DIR --out PRED.csv|.jsonl|.h5      (calib.predict_cli)
    disalign adapt UNLABELED.h5 --calibration CALIB_DIR [--out CALIB_DIR2] …             (calib.adapt_cli)
    disalign eval-segmentation … / eval-detection …                                   (calib.dense_cli)

:func:`add_parsers` registers them on the ``disalign`` parser that :mod:`disalign.cli` composes with
``extract`` and ``serve``; ``python -m calib.cli`` runs the calib subcommands alone. Any
:class:`~calib.errors.DisalignError` is printed as one ``error: …`` line with exit status 2
(:func:`calib.cli_common.run_command`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

from calib.adapt_cli import add_adapt_parser, add_target_prior_argument, with_target_prior
from calib.cli_common import (
    STDOUT,
    HelpFormatter,
    add_quiet_argument,
    check_writable_dir,
    check_writable_file,
    note,
    output_path,
    parse_bytes,
    run_command,
    write_text_atomic,
)
from calib.defaults import FEW_BELOW, MANY_ABOVE
from calib.errors import InputError

ALL_METHODS = ("joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm", "tde")
MAX_STEPS_HELP = "cap on the SGD steps of lws and crt (default: the full classifier-balancing recipe; epochs are shortened alike)"


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


def parse_magnitude(text: str) -> bool | str:
    """--magnitude auto|on|off → the estimator's use_magnitude ('auto', True, False)."""
    values = {"auto": "auto", "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, found {text!r}")
    return values[text]


# -- fit ------------------------------------------------------------------------------------------
# Flags that set an estimator hyper-parameter: (flag, dest, hyper-parameter). A flag the user gave is
# passed to the method's __init__, or refused when the method has no such hyper-parameter.
HYPERPARAMETER_FLAGS = (
    ("--rho", "rho", "rho"),
    ("--epochs", "epochs", "epochs"),
    ("--seed", "seed", "seed"),
    ("--cosine", "cosine", "cosine"),
    ("--magnitude", "magnitude", "use_magnitude"),
    ("--no-magnitude", "no_magnitude", "use_magnitude"),
    ("--no-margin", "no_margin", "use_margin"),
    ("--no-grw", "no_grw", "use_grw"),
    ("--max-steps", "max_steps", "max_steps"),
    ("--head-form", "head_form", "head_form"),
    ("--gate", "gate", "gate"),
    ("--no-gate-standardize", "no_gate_standardize", "gate_standardize"),
    ("--selection", "selection", "selection"),
    ("--val-weight", "val_weight", "val_weight"),
)
# store_true flags that switch a hyper-parameter which is on by default off
SWITCH_OFF_FLAGS = ("--no-magnitude", "--no-margin", "--no-grw", "--no-gate-standardize")
BOOLEAN_FLAGS = (*SWITCH_OFF_FLAGS, "--cosine")


def add_fit_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a calibration on a training bank", description="Fit a calibration on a training bank.",
                              formatter_class=HelpFormatter)
    p.add_argument("train", type=Path, help="training bank (HDF5)")
    p.add_argument("--val", type=Path, help="validation bank, used to choose rho / tau")
    p.add_argument("--method", default="disalign", help=f"one of {', '.join(ALL_METHODS)}")
    p.add_argument("--rho", type=parse_rho, help="disalign: GRW exponent, or 'auto' (grid search on --val; the default)")
    p.add_argument("--epochs", type=int, help="SGD epochs of disalign (default 10), lws (5) and crt (10)")
    p.add_argument("--seed", type=int, help="seed of the SGD methods (disalign, lws, crt; default 0)")
    p.add_argument("--cosine", action="store_true", help="disalign: gate on L2-normalised features (cosine classifiers)")
    p.add_argument("--magnitude", type=parse_magnitude, metavar="{auto,on,off}",
                   help="disalign magnitude term alpha; auto (the default): chosen on --val for classification banks, on otherwise")
    p.add_argument("--no-magnitude", action="store_true", help="disalign ablation: no magnitude term alpha (= --magnitude off)")
    p.add_argument("--no-margin", action="store_true", help="disalign ablation: no margin term beta")
    p.add_argument("--no-grw", action="store_true", help="disalign ablation: plain cross-entropy instead of GRW")
    p.add_argument("--head-form", choices=("auto", "residual", "blend"),
                   help="disalign head: residual (1+σα)z+σβ, blend σ(αz+β)+(1-σ)z (eq. 5); auto (the default): as the official code of the bank's task")
    p.add_argument("--gate", choices=("auto", "constant", "normal", "bn-relu"),
                   help="disalign gate init: constant v=0.1, normal N(0,0.01²), bn-relu sigmoid(ReLU(BN(conv))); auto (the default): by task")
    p.add_argument("--no-gate-standardize", action="store_true", help="disalign: train the gate on raw features")
    p.add_argument("--selection", choices=("nll", "accuracy"), help="disalign: what the validation bank picks rho by (default nll)")
    p.add_argument("--val-weight", type=parse_val_weight,
                   help="disalign: share of the loss carried by validation rows mixed into the fit (cross-fitted), or 'auto' (default 0)")
    p.add_argument("--max-memory", type=parse_bytes, help="disalign: stream the training bank when its rows exceed this (e.g. 512M)")
    p.add_argument("--out", type=Path, required=True,
                   help="calibration directory: new, empty or holding a calibration (a new version is published in it)")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    add_quiet_argument(p)
    p.set_defaults(func=run_fit)


def fit_hyperparameters(args: argparse.Namespace, cls) -> dict:
    """The hyper-parameters the user set on the command line; a flag the method does not have is refused."""
    accepted = cls().get_params()
    given = {flag: (name, getattr(args, dest)) for flag, dest, name in HYPERPARAMETER_FLAGS
             if getattr(args, dest) is not None  # 0 and --magnitude off are values, not "unset"
             and not (flag in BOOLEAN_FLAGS and getattr(args, dest) is False)}
    refused = [flag for flag, (name, _) in given.items() if name not in accepted]
    if args.max_memory is not None and cls.method != "disalign":
        refused.append("--max-memory")
    if refused:
        allowed = [flag for flag, _, name in HYPERPARAMETER_FLAGS if name in accepted]
        raise InputError(f"{', '.join(refused)} {'does' if len(refused) == 1 else 'do'} not apply to --method {cls.method}; "
                         f"its settings are {', '.join(allowed) or 'none'} (and --val).")
    if args.no_grw and args.rho is not None:
        raise InputError("--rho does not apply with --no-grw: plain cross-entropy has no GRW exponent.")
    if "--magnitude" in given and "--no-magnitude" in given:
        raise InputError("--no-magnitude and --magnitude set the same thing; give one of them.")
    return {name: (False if flag in SWITCH_OFF_FLAGS else value) for flag, (name, value) in given.items()}


def run_fit(args: argparse.Namespace) -> int:
    from calib.disalign import DEFAULT_RHO, DisAlign
    from calib.methods import method_class
    from calib.publish import check_publish_target

    cls = method_class(args.method)
    check_publish_target(args.out, role="--out")  # before the fit, and nothing but a calibration is ever replaced
    estimator = cls(**fit_hyperparameters(args, cls))
    if isinstance(estimator, DisAlign):  # its own progress bar (heads, epochs, loss) and the streamed fit
        estimator.fit(args.train, val=args.val, max_memory=args.max_memory, progress=not args.quiet)
    else:
        estimator.fit(args.train, val=args.val)
    estimator.save(args.out)
    if isinstance(estimator, DisAlign) and estimator.rho == "auto" and estimator.use_grw and args.val is None:
        # said once the fit succeeded, so that a bad input still gives exactly one error line
        print(f"warning: --rho auto chooses rho on a validation bank and no --val was given: used rho = {float(DEFAULT_RHO)}.",
              file=sys.stderr)
    report = estimator.meta_.report
    summary = {k: report[k] for k in ("rho", "magnitude", "val_weight", "tau", "temperature", "validation", "fit_seconds") if k in report}
    print(f"wrote {args.method} calibration to {args.out}: {json.dumps(summary)}")
    return 0


# -- eval -----------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a calibration and the baselines on a test bank",
                              description="Evaluate a calibration and the baselines on a test bank.", formatter_class=HelpFormatter)
    p.add_argument("test", type=Path, help="test bank (HDF5)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit'")
    p.add_argument("--train", type=Path, help="training bank: needed to fit the baselines")
    p.add_argument("--val", type=Path, help="validation bank: tunes the baselines' tau")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all with --train, else joint + the calibration)")
    p.add_argument("--many-above", type=int, default=MANY_ABOVE, help="'many' classes have more training samples than this")
    p.add_argument("--few-below", type=int, default=FEW_BELOW, help="'few' classes have fewer training samples than this")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    add_report_arguments(p, plots=True)
    add_target_prior_argument(p)
    p.set_defaults(func=run_eval)


def add_report_arguments(p: argparse.ArgumentParser, *, plots: bool) -> None:
    """``--json``, ``--plots`` and ``--quiet`` of the eval commands."""
    p.add_argument("--json", type=output_path, metavar="FILE",
                   help="write the report as JSON here; '-' writes it to stdout (the table then goes to stderr)")
    if plots:
        p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into this directory")
    add_quiet_argument(p)


def check_report_outputs(args: argparse.Namespace) -> None:
    """Refuse unusable output paths before any work (nothing is written until the report is complete)."""
    check_writable_file(args.json, "--json")
    check_writable_dir(getattr(args, "plots", None), "--plots")


def print_table(table: str, args: argparse.Namespace) -> None:
    """The result table: on stdout, or on stderr when stdout carries the JSON report."""
    print(table, file=sys.stderr if args.json == STDOUT else sys.stdout)


def run_eval(args: argparse.Namespace) -> int:
    from calib.evaluate import evaluate_methods, format_table

    check_report_outputs(args)
    calibration, test, train, val = load_eval_banks(args.calibration, args.test, args.train, args.val)
    estimators, class_counts = eval_estimators(args.methods, calibration, train, val, test, all_with_train=True,
                                               progress=not args.quiet, max_steps=args.max_steps)
    estimators = with_target_prior(estimators, calibration, test, args.target_prior)
    report = evaluate_methods(test, estimators, class_counts=class_counts, many_above=args.many_above, few_below=args.few_below, val=val)
    report["class_names"] = list(test.info.class_names)
    report["provenance"] = provenance(args, calibration, {"test": test, "train": train, "val": val})
    print_table(format_table(report), args)
    write_report(report, calibration, json_path=args.json, plots_dir=args.plots, quiet=args.quiet)
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


def method_names(methods: str | None, calibration_method: str, *, has_train: bool, all_with_train: bool = True) -> list[str]:
    """The methods of ``--methods`` (default: every method when ``all_with_train`` and a training bank is
    given, else joint + the calibration), checked: known names, and a training bank for the baselines."""
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else (
        list(ALL_METHODS) if all_with_train and has_train else ["joint", calibration_method])
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        raise InputError(f"--methods should be a subset of {','.join(ALL_METHODS)}, found {','.join(unknown)}.")
    to_fit = [m for m in names if m not in ("joint", calibration_method)]
    if to_fit and not has_train:
        raise InputError(f"--train is needed to fit {', '.join(to_fit)}; pass the training bank or drop them from --methods.")
    return names


def eval_estimators(methods: str | None, calibration, train, val, test, *, all_with_train: bool, max_steps: int | None = None, progress: bool = False):
    """The estimators named in ``--methods`` (default: every method when ``all_with_train`` and a training
    bank is given, else joint + the calibration), fitted, and the training class counts → (estimators, counts)."""
    import numpy as np

    from calib.evaluate import fit_baselines
    from calib.progress import progress_bar

    names = method_names(methods, calibration.method, has_train=train is not None, all_with_train=all_with_train)
    # joint learns nothing, so without a training bank it is "fitted" on the test bank's header only.
    fitted = {}
    baselines = list(dict.fromkeys(m for m in names if m != calibration.method))
    with progress_bar(total=len(baselines), enabled=progress, desc="fitting", unit="method") as bar:
        for name in baselines:
            bar.set_description(f"fitting {name}")
            fitted.update(fit_baselines([name], train if train is not None else test, val, max_steps=max_steps))
            bar.update()
    fitted[calibration.method] = calibration
    counts = calibration.meta_.class_counts if calibration.meta_.class_counts is not None else test.training_class_counts()
    return {name: fitted[name] for name in names}, np.asarray(counts)


def provenance(args: argparse.Namespace, calibration, banks: dict, files: dict[str, Path] | None = None) -> dict:
    """What reproduces a report: the tool version, the command line, the calibration and the inputs' fingerprints."""
    from calib import __version__

    meta = calibration.meta_
    inputs = {role: bank_fingerprint(bank.info) for role, bank in banks.items() if bank is not None}
    inputs.update({role: {"path": str(path), **file_fingerprint(path)} for role, path in (files or {}).items()})
    return {
        "tool_version": __version__,
        "command": getattr(args, "command_line", None),
        "calibration": {"path": str(args.calibration), "method": meta.method, "artifact_version": meta.artifact_version,
                        "created": meta.created, "model_fingerprint": meta.model_fingerprint,
                        "hyperparameters": meta.hyperparameters},
        "inputs": inputs,
    }


def bank_fingerprint(info) -> dict:
    """A bank's identity: its path, content hash and header (rows, model, creation time)."""
    return {"path": info.path, **file_fingerprint(Path(info.path)), "rows": info.num_rows,
            "model_fingerprint": info.model_fingerprint, "created": info.created}


def file_fingerprint(path: Path) -> dict:
    """``{"sha256": "sha256:<hex>", "bytes": n}`` of a file's contents (read in 1 MiB blocks)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"sha256": f"sha256:{digest.hexdigest()}", "bytes": size}


def write_report(report: dict, calibration, *, json_path: Path | str | None, plots_dir: Path | None, quiet: bool = False) -> None:
    """The optional outputs of the eval commands, all written at the end: the figures are drawn first (a
    failure there writes nothing), then the JSON report and each PNG are written atomically."""
    figures = {}
    if plots_dir:
        from calib.plots import render_plots

        fit = calibration.meta_.report if calibration.method == "disalign" else {}
        figures = render_plots(report, rho_curve=fit.get("rho_curve"), chosen_rho=fit.get("rho"), fit_report=fit)
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    if plots_dir:
        from calib.plots import write_pngs

        written = write_pngs(plots_dir, figures)
        note(f"wrote {len(written)} plots to {plots_dir}", quiet=quiet)


# -- entry point ----------------------------------------------------------------------------------
def add_parsers(subparsers) -> None:
    """Register the calib subcommands: fit, eval, predict, eval-segmentation, eval-detection."""
    from calib.dense_cli import add_parsers as add_dense_eval_parsers
    from calib.predict_cli import add_predict_parser

    add_fit_parser(subparsers)
    add_eval_parser(subparsers)
    add_adapt_parser(subparsers)
    add_predict_parser(subparsers)
    add_dense_eval_parsers(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m calib.cli``: the calib subcommands only (``disalign`` adds extract and serve)."""
    from calib import __version__

    parser = argparse.ArgumentParser(prog="python -m calib.cli", description="The calib subcommands of disalign.")
    parser.add_argument("--version", action="version", version=f"disalign {__version__}")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["disalign", *argv])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
