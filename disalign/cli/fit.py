"""``disalign fit``: fit a calibration (DisAlign or a baseline) on a training bank and publish it.

    disalign fit TRAIN.h5 [--val VAL.h5] [--method disalign|joint|logit-adjust|…] [--rho FLOAT|auto] [--epochs N]
                 [--magnitude auto|on|off] [--max-memory 512M] --out CALIB_DIR [--json SUMMARY.json|-]

A thin layer over the estimators (:mod:`disalign.calib.estimators`): flags become hyper-parameters of the
method's ``__init__`` (a flag the method does not have is refused), ``fit`` runs, ``save`` publishes. It
ends with a short human summary (what the validation bank chose, its scores, the time); ``--json`` writes
the same as JSON (``-``: to stdout, the summary then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from disalign.calib.errors import InputError
from disalign.cli.common import (
    MAX_STEPS_HELP,
    STDOUT,
    HelpFormatter,
    add_overwrite_argument,
    add_quiet_argument,
    check_writable_file,
    method_names_help,
    output_path,
    parse_bytes,
    write_text_atomic,
)


def parse_number_or_auto(text: str, *, high: float | None, expected: str, words: tuple[str, ...] = ("auto",)) -> float | str:
    """One of ``words`` ('auto'), or a number in [0, high) ([0, ∞) without ``high``)."""
    if text in words:
        return text
    *others, last = [expected, *map(repr, words)]
    alternatives = f"{', '.join(others)} or {last}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {alternatives}, found {text!r}") from None
    if value < 0 or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"expected {alternatives}, found {text!r}")
    return value


def parse_rho(text: str) -> float | str:
    return parse_number_or_auto(text, high=None, expected="a number >= 0")


def parse_val_weight(text: str) -> float | str:
    return parse_number_or_auto(text, high=1.0, expected="a number in [0, 1)", words=("regime", "auto"))


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
    ("--count-smoothing", "count_smoothing", "count_smoothing"),
)
# store_true flags that switch a hyper-parameter which is on by default off
SWITCH_OFF_FLAGS = ("--no-magnitude", "--no-margin", "--no-grw", "--no-gate-standardize")
BOOLEAN_FLAGS = (*SWITCH_OFF_FLAGS, "--cosine")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a calibration on a training bank", description="Fit a calibration on a training bank.",
                              formatter_class=HelpFormatter)
    p.add_argument("train", type=Path, help="training bank (HDF5)")
    p.add_argument("--val", type=Path, help="validation bank, used to choose rho / tau")
    p.add_argument("--method", default="disalign", help=f"one of {method_names_help(', ')}")
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
    p.add_argument("--selection", choices=("auto", "nll", "temperature-nll", "accuracy"),
                   help="disalign: what the validation bank picks rho and alpha by; auto (the default): temperature-nll where the "
                        "training bank is memorised, nll elsewhere")
    p.add_argument("--val-weight", type=parse_val_weight,
                   help="disalign: share of the loss carried by validation rows mixed into the fit (cross-fitted); 'auto': "
                        "chosen from 0, 0.1, 0.3 by cross-fitting; 'regime' (the default): 0 where the training bank shows the "
                        "bias, chosen from 0, 0.1, 0.3, 0.5 where it is memorised")
    p.add_argument("--count-smoothing", type=float,
                   help="disalign: added to every training class count before the GRW weights (lets classes with no rows have a finite weight; default 0)")
    p.add_argument("--max-memory", type=parse_bytes, help="disalign: stream the training bank when its rows exceed this (e.g. 512M)")
    p.add_argument("--out", type=Path, required=True,
                   help="calibration directory: new, empty or holding a calibration (a new version is published in it)")
    p.add_argument("--max-steps", type=int, help=MAX_STEPS_HELP)
    p.add_argument("--json", type=output_path, metavar="FILE",
                   help="write the fit summary (choices, validation scores, time) as JSON here; '-' writes it to stdout")
    add_overwrite_argument(p, "a --json file")
    add_quiet_argument(p)
    p.set_defaults(func=run_fit)


def fit_hyperparameters(args: argparse.Namespace, cls) -> dict:
    """The hyper-parameters the user set on the command line; a flag the method does not have is refused."""
    accepted = cls().get_params()
    given = {flag: (name, getattr(args, dest)) for flag, dest, name in HYPERPARAMETER_FLAGS
             if getattr(args, dest) is not None  # 0 and --magnitude off are values, not "unset"
             and not (flag in BOOLEAN_FLAGS and getattr(args, dest) is False)}
    refused = [flag for flag, (name, _) in given.items() if name not in accepted]
    if args.max_memory is not None and not cls.streams_training_bank:  # it would be ignored: say so
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
    from disalign.calib.artifact.publish import check_publish_target
    from disalign.calib.estimators.methods import method_class

    start = time.perf_counter()
    cls = method_class(args.method)
    check_publish_target(args.out, role="--out")  # before the fit, and nothing but a calibration is ever replaced
    check_writable_file(args.json, "--json", overwrite=args.overwrite)
    estimator = cls(**fit_hyperparameters(args, cls))
    estimator.fit(args.train, val=args.val, max_memory=args.max_memory, progress=not args.quiet)
    estimator.save(args.out)
    report = estimator.meta_.report
    hyperparameters = estimator.get_params()
    if hyperparameters.get("rho") == "auto" and hyperparameters.get("use_grw") and args.val is None:
        # said once the fit succeeded, so that a bad input still gives exactly one error line
        print(f"warning: --rho auto chooses rho on a validation bank and no --val was given: used rho = {float(report['rho'])}.",
              file=sys.stderr)
    summary = {"method": args.method, "out": str(args.out),
               **{k: report[k] for k in SUMMARY_FIELDS if k in report}, "seconds": time.perf_counter() - start}
    print(format_summary(summary, hyperparameters, has_val=args.val is not None),
          file=sys.stderr if args.json == STDOUT else sys.stdout)
    if args.json:
        write_text_atomic(args.json, json.dumps(summary, indent=2) + "\n")
    return 0


SUMMARY_FIELDS = ("rho", "magnitude", "val_weight", "tau", "temperature", "validation", "regime", "fit_seconds")
VALIDATION_SCORES = (("val_mean_class_accuracy", "mean-class accuracy", True), ("val_accuracy", "accuracy", True),
                     ("val_nll", "NLL", False))


def format_summary(summary: dict, hyperparameters: dict, *, has_val: bool) -> str:
    """The fit summary for a person: where it went, what was chosen (and whether --val chose it), the
    validation scores, the time. Numbers rounded; the JSON of --json keeps them exact."""
    chosen_by_val = " (chosen on --val)"
    lines = [f"wrote {summary['method']} calibration to {summary['out']} in {summary['seconds']:.1f} s"
             + (f" (fit {summary['fit_seconds']:.1f} s)" if "fit_seconds" in summary else "")]
    choices = []
    if "rho" in summary and summary["rho"] is not None:
        auto = hyperparameters.get("rho") == "auto" and has_val
        choices.append(f"rho = {summary['rho']:g}" + (chosen_by_val if auto else ""))
    if "magnitude" in summary:
        auto = hyperparameters.get("use_magnitude") == "auto" and has_val
        choices.append(f"magnitude alpha {'on' if summary['magnitude'] else 'off'}" + (chosen_by_val if auto else ""))
    if "val_weight" in summary:
        choices.append(f"val weight = {summary['val_weight']:g}")
    if summary.get("tau") is not None:
        choices.append(f"tau = {summary['tau']:.3g}" + (chosen_by_val if has_val else ""))
    if summary.get("temperature") is not None:
        choices.append(f"temperature = {summary['temperature']:.3g}")
    if choices:
        lines.append("  " + ", ".join(choices))
    validation = summary.get("validation") or {}
    scores = [f"{label} {100 * validation[key]:.2f} %" if percent else f"{label} {validation[key]:.3f}"
              for key, label, percent in VALIDATION_SCORES if isinstance(validation.get(key), int | float)]
    if scores:
        lines.append("  validation: " + ", ".join(scores))
    elif not has_val:
        lines.append("  no --val: nothing was chosen or scored on a validation bank")
    regime = summary.get("regime")
    if regime:
        lines += [regime["sentence"], regime["recommendation"]]
    return "\n".join(lines)
