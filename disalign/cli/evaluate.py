"""``disalign eval``: a calibration and the baselines on a test bank, in one table, with a JSON report and plots.

    disalign eval TEST.h5 --calibration CALIB_DIR [--train TRAIN.h5] [--val VAL.h5]
                  [--methods joint,disalign,logit-adjust,tau-norm,lws,crt,ncm,tde] [--max-steps N] [--json OUT|-] [--plots DIR]

The helpers below (loading the banks against the calibration, fitting the requested baselines, provenance,
writing the report) are shared with the dense evaluations (:mod:`disalign.cli.evaluate_dense`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from disalign.calib.defaults import FEW_BELOW, MANY_ABOVE
from disalign.calib.errors import InputError
from disalign.calib.estimators.methods import METHODS
from disalign.cli.adapt import add_target_prior_argument, with_target_prior
from disalign.cli.common import (
    MAX_STEPS_HELP,
    STDOUT,
    HelpFormatter,
    add_overwrite_argument,
    add_quiet_argument,
    check_writable_dir,
    check_writable_file,
    check_writable_files,
    method_names_help,
    note,
    output_path,
    write_text_atomic,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a calibration and the baselines on a test bank",
                              description="Evaluate a calibration and the baselines on a test bank.", formatter_class=HelpFormatter)
    p.add_argument("test", type=Path, help="test bank (HDF5)")
    p.add_argument("--calibration", type=Path, required=True, help="calibration directory from 'disalign fit'")
    p.add_argument("--train", type=Path, help="training bank: needed to fit the baselines")
    p.add_argument("--val", type=Path, help="validation bank: tunes the baselines' tau")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {method_names_help(',')} (default: all with --train, else joint + the calibration)")
    p.add_argument("--many-above", type=int, default=MANY_ABOVE, help="'many' classes have more training samples than this")
    p.add_argument("--few-below", type=int, default=FEW_BELOW, help="'few' classes have fewer training samples than this")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    add_report_arguments(p, plots=True)
    add_target_prior_argument(p)
    p.set_defaults(func=run_eval)


def add_report_arguments(p: argparse.ArgumentParser, *, plots: bool) -> None:
    """``--json``, ``--plots``, ``--overwrite`` and ``--quiet`` of the eval commands."""
    p.add_argument("--json", type=output_path, metavar="FILE",
                   help="write the report as JSON here; '-' writes it to stdout (the table then goes to stderr)")
    if plots:
        p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into this directory")
    add_overwrite_argument(p, "--json and PNG files" if plots else "a --json file")
    add_quiet_argument(p)


def check_report_outputs(args: argparse.Namespace) -> None:
    """Refuse unusable output paths before any work (nothing is written until the report is complete)."""
    check_writable_file(args.json, "--json", overwrite=args.overwrite)
    plots = getattr(args, "plots", None)
    check_writable_dir(plots, "--plots")
    if plots is not None:
        from disalign.calib.evaluation.plots import PLOT_FILES

        check_writable_files(plots, PLOT_FILES, "--plots", overwrite=args.overwrite)


def print_table(table: str, args: argparse.Namespace) -> None:
    """The result table: on stdout, or on stderr when stdout carries the JSON report."""
    print(table, file=sys.stderr if args.json == STDOUT else sys.stdout)


def run_eval(args: argparse.Namespace) -> int:
    from disalign.calib.evaluation.evaluate import evaluate_methods, format_table

    check_report_outputs(args)
    calibration, test, train, val = load_eval_banks(args.calibration, args.test, args.train, args.val)
    estimators, class_counts = eval_estimators(args.methods, calibration, train, val, test, all_with_train=True,
                                               progress=not args.quiet, max_steps=args.max_steps)
    estimators = with_target_prior(estimators, calibration, test, args.target_prior)
    report = evaluate_methods(test, estimators, class_counts=class_counts, many_above=args.many_above, few_below=args.few_below,
                              val=val, train=train)
    report["class_names"] = list(test.info.class_names)
    report["provenance"] = provenance(args, calibration, {"test": test, "train": train, "val": val})
    print_table(format_table(report) + row_notes(calibration), args)
    write_report(report, calibration, json_path=args.json, plots_dir=args.plots, quiet=args.quiet)
    return 0


def load_eval_banks(calibration_dir: Path, test_path: Path, train_path: Path | None, val_path: Path | None):
    """The eval commands' inputs: the calibration and the test/train/val banks, checked against each other."""
    from disalign.calib.data.bank import load_bank
    from disalign.calib.estimators.base import check_banks_agree
    from disalign.calib.estimators.methods import load_calibration

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
        list(METHODS) if all_with_train and has_train else ["joint", calibration_method])
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise InputError(f"--methods should be a subset of {method_names_help(',')}, found {','.join(unknown)}.")
    to_fit = [m for m in names if m not in ("joint", calibration_method)]
    if to_fit and not has_train:
        raise InputError(f"--train is needed to fit {', '.join(to_fit)}; pass the training bank or drop them from --methods.")
    return names


def eval_estimators(methods: str | None, calibration, train, val, test, *, all_with_train: bool, max_steps: int | None = None, progress: bool = False):
    """The estimators named in ``--methods`` (default: every method when ``all_with_train`` and a training
    bank is given, else joint + the calibration), fitted, and the training class counts → (estimators, counts)."""
    import numpy as np

    from disalign.calib.evaluation.evaluate import fit_baselines
    from disalign.calib.progress import progress_bar

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
    return {row_name(name, calibration): fitted[name] for name in names}, np.asarray(counts)


TARGET_PRIOR_ROW = "{method}@target-prior"


def row_name(name: str, calibration) -> str:
    """The table row (and report key) of a method: a calibration aligned to a target prior (``disalign adapt
    --out``) is not the balanced method of that name, and says so."""
    if name == calibration.method and calibration.meta_.target_prior is not None:
        return TARGET_PRIOR_ROW.format(method=name)
    return name


def row_notes(calibration) -> str:
    """What a labelled row means, printed under the table ('' when nothing needs saying)."""
    if calibration.meta_.target_prior is None:
        return ""
    return (f"\n{TARGET_PRIOR_ROW.format(method=calibration.method)}: aligned to the class prior recorded in the calibration "
            "(disalign adapt --out), not balanced.")


def provenance(args: argparse.Namespace, calibration, banks: dict, files: dict[str, Path] | None = None) -> dict:
    """What reproduces a report: the tool version, the command line, the calibration and the inputs' fingerprints."""
    from disalign.calib import __version__

    meta = calibration.meta_
    inputs = {role: bank_fingerprint(bank.info) for role, bank in banks.items() if bank is not None}
    inputs.update({role: {"path": str(path), **content_of(path)} for role, path in (files or {}).items()})
    return {
        "tool_version": __version__,
        "command": getattr(args, "command_line", None),
        "calibration": {"path": str(args.calibration), "method": meta.method, "artifact_version": meta.artifact_version,
                        "created": meta.created, "model_fingerprint": meta.model_fingerprint,
                        "hyperparameters": meta.hyperparameters},
        "inputs": inputs,
    }


def content_of(path: Path) -> dict:
    """``{"sha256": "sha256:<hex>", "bytes": n}`` of a file (:func:`disalign.calib.files.file_fingerprint`)."""
    from disalign.calib.files import file_fingerprint

    return {"sha256": file_fingerprint(path), "bytes": path.stat().st_size}


def bank_fingerprint(info) -> dict:
    """A bank's identity: its path, content hash and header (rows, model, creation time)."""
    return {"path": info.path, **content_of(Path(info.path)), "rows": info.num_rows,
            "model_fingerprint": info.model_fingerprint, "created": info.created}


def write_report(report: dict, calibration, *, json_path: Path | str | None, plots_dir: Path | None, quiet: bool = False) -> None:
    """The optional outputs of the eval commands, all written at the end: the figures are drawn first (a
    failure there writes nothing), then the JSON report and each PNG are written atomically."""
    figures = {}
    if plots_dir:
        from disalign.calib.evaluation.plots import render_plots

        fit = calibration.meta_.report if calibration.method == "disalign" else {}
        figures = render_plots(report, rho_curve=fit.get("rho_curve"), chosen_rho=fit.get("rho"), fit_report=fit)
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    if plots_dir:
        from disalign.calib.evaluation.plots import write_pngs

        written = write_pngs(plots_dir, figures)
        note(f"wrote {len(written)} plots to {plots_dir}", quiet=quiet)
