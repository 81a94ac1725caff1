"""``disalign adapt``: estimate the class prior of an unlabeled bank, and ``eval --target-prior``.

    disalign adapt UNLABELED.h5 --calibration CALIB_DIR [--out CALIB_DIR2] [--json PRIOR.json] [--publish]
                   [--val VAL.h5] [--bootstrap 100] [--concentration 10] [--significance 1e-3] [--tolerance 0.005]
    disalign eval TEST.h5 --calibration CALIB_DIR --target-prior uniform|train|estimate|PRIOR.json

The estimate is maximum a posteriori EM on the calibration's probabilities after the bias-corrected
temperature scaling stored in the artifact (``fit --val`` fits it; ``--val`` here fits it for an
artifact without one), with a percentile bootstrap interval per class and a likelihood-ratio test
against the balanced reference (:mod:`disalign.calib.core.label_shift`). ``--out`` writes a derived calibration
whose predictions are aligned to the estimated prior (only when the test rejects the reference,
unless ``--no-test``); ``--publish`` publishes it as the deployment's prior — a new version in
``CALIB_DIR/prior`` (:mod:`disalign.calib.artifact.priors`) that every server with ``DISALIGN_PRIOR=adaptive``
serves within a watch interval — after the same checks a server's own estimate passes (it must beat the
published prior significantly, and moves it at most ``--max-step`` in L1); ``--json`` writes the estimate in
the prior-file format that ``eval --target-prior`` and the server's ``DISALIGN_PRIOR`` read:

    {"prior": [K numbers >= 0], "classes": [K names], ...}     (or a bare list of K numbers)

Only the clean view (``view == 0``) of the bank is used; its labels, if any, are ignored by the
estimate and only reported (the labelled rows' class frequencies and the L1 error against them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from disalign.calib.defaults import PRIOR_CONCENTRATION, PRIOR_MAX_STEP, PRIOR_SIGNIFICANCE, PRIOR_TOLERANCE
from disalign.calib.errors import InputError
from disalign.cli.common import (
    STDOUT,
    HelpFormatter,
    add_overwrite_argument,
    add_quiet_argument,
    check_writable_file,
    note,
    output_path,
    write_text_atomic,
)

if TYPE_CHECKING:  # torch and the math are imported where used: the parser (--help) stays light
    import torch

    from disalign.calib.core import label_shift

TARGET_PRIOR_CHOICES = ("uniform", "train", "estimate")


# -- shared by adapt, eval and the benchmark ------------------------------------------------------
def probability_calibration(calibrator) -> label_shift.ProbabilityCalibration | None:
    from disalign.calib.core import label_shift

    raw = calibrator.meta_.probability_calibration
    return label_shift.ProbabilityCalibration.from_json(raw) if raw else None


def reference_probabilities(calibrator, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Calibrated balanced probabilities (N, K) float64: softmax(z / T + b) of the calibration's logits z."""
    import torch

    from disalign.calib.core import label_shift
    from disalign.calib.evaluation.evaluate import predict_in_blocks

    z = predict_in_blocks(calibrator, features, logits)
    return torch.softmax(label_shift.calibrated_logits(z, probability_calibration(calibrator)), dim=1)


def aligned_to_prior(calibrator, prior: torch.Tensor | None):
    """A copy of a balanced calibration whose predictions are aligned to ``prior`` (K,) (None: balanced)."""
    if calibrator.meta_.target_prior is not None:
        raise InputError("the calibration is already aligned to a target prior; start from the balanced calibration.")
    derived = copy.copy(calibrator)
    derived.meta_ = dataclasses.replace(calibrator.meta_, target_prior=None if prior is None else [float(v) for v in prior])
    return derived


def training_prior(calibrator) -> torch.Tensor:
    from disalign.calib.core import label_shift

    counts = calibrator.meta_.class_counts
    if counts is None:
        raise InputError("the calibration records no training class counts, so there is no training prior.")
    return label_shift.check_prior([float(c) for c in counts], calibrator.meta_.num_classes, "the training class counts")


# -- adapt ----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("adapt", help="estimate the class prior of an unlabeled bank (label shift)",
                              formatter_class=HelpFormatter)
    p.add_argument("unlabeled", type=Path, help="bank of the deployment's inputs (HDF5); labels are ignored")
    p.add_argument("--calibration", type=Path, required=True, help="balanced calibration directory from 'disalign fit'")
    p.add_argument("--val", type=Path, help="labelled val bank: fits the probability calibration if the artifact has none")
    p.add_argument("--out", type=Path, help="write a calibration aligned to the estimated prior here")
    p.add_argument("--json", type=output_path, help="write the estimate here (the prior-file format; - for stdout)")
    p.add_argument("--no-test", action="store_true", help="align --out to the estimate even when the test keeps the reference")
    add_overwrite_argument(p, "a --json file")
    p.add_argument("--publish", action="store_true",
                   help="publish the estimate as the deployment's prior (CALIB_DIR/prior): every server with DISALIGN_PRIOR=adaptive "
                        "serves it; only if it beats the published prior significantly, and moved at most --max-step")
    p.add_argument("--prior-dir", type=Path, help="with --publish: the servers' DISALIGN_PRIOR_DIR, if they set one")
    p.add_argument("--max-step", type=float, default=PRIOR_MAX_STEP, help="with --publish: largest L1 move of the published prior")
    add_estimate_arguments(p)
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    add_quiet_argument(p)
    p.set_defaults(func=run_adapt)


def add_estimate_arguments(p) -> None:
    p.add_argument("--concentration", type=float, default=PRIOR_CONCENTRATION,
                   help="Dirichlet pseudo-counts of the prior on pi, spread as the reference")
    p.add_argument("--significance", type=float, default=PRIOR_SIGNIFICANCE, help="level of the likelihood-ratio test")
    p.add_argument("--tolerance", type=float, default=PRIOR_TOLERANCE,
                   help="log-likelihood gain per row (nats) the test attributes to miscalibration")


def run_adapt(args: argparse.Namespace) -> int:
    import torch

    from disalign.calib.artifact.publish import check_publish_target
    from disalign.calib.core import label_shift
    from disalign.calib.data.bank import load_bank
    from disalign.calib.estimators.methods import load_calibration

    check_writable_file(args.json, "--json", overwrite=args.overwrite)  # every output checked before any work
    if args.out is not None:
        check_publish_target(args.out, role="--out")
    if args.publish:
        from disalign.calib.artifact import priors

        priors.check_writable(priors.prior_dir(args.calibration, args.prior_dir))
        if not 0 < args.max_step <= 2:
            raise InputError(f"--max-step should be in (0, 2] (an L1 distance between priors), found {args.max_step}.")
    elif args.prior_dir is not None:
        raise InputError("--prior-dir is for --publish.")
    calibrator = load_calibration(args.calibration)
    if calibrator.meta_.target_prior is not None:
        raise InputError(f"{args.calibration} is already aligned to a target prior; adapt the balanced calibration.")
    bank = load_bank(args.unlabeled)
    calibrator.check_compatible(num_classes=bank.num_classes, feature_dim=bank.feature_dim,
                                model_fingerprint=bank.info.model_fingerprint, source=f"bank {args.unlabeled}")
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap should be >= 0, found {args.bootstrap}.")
    if args.val is not None:
        if calibrator.meta_.probability_calibration is None and args.publish:
            raise InputError("--publish estimates with the calibration the servers serve, which has no probability "
                             "calibration: fit one into the artifact (fit --val) rather than here with --val.")
        if calibrator.meta_.probability_calibration is None:
            calibrator.fit_probability_calibration(args.val)
        else:
            note(f"{args.calibration} has a probability calibration already; --val is not used.", quiet=args.quiet)
    if calibrator.meta_.probability_calibration is None:
        note("the calibration has no probability calibration (fit with --val, or pass --val here); using T = 1, b = 0.",
             quiet=args.quiet)
    clean = bank.view == 0
    if not bool(clean.any()):
        raise InputError(f"bank {args.unlabeled} has no rows in its clean view (view 0).")
    probabilities = reference_probabilities(calibrator, bank.features[clean], bank.logits[clean])
    estimate = label_shift.estimate_prior(probabilities, concentration=args.concentration,
                                          significance=args.significance, tolerance=args.tolerance)
    interval = (label_shift.bootstrap_interval(probabilities, estimate, resamples=args.bootstrap, concentration=args.concentration,
                                               seed=args.seed) if args.bootstrap else None)
    labels = bank.labels[clean]
    observed = None
    if bool((labels >= 0).all()):
        observed = torch.bincount(labels, minlength=bank.num_classes).double() / labels.numel()
    # with --json - the estimate goes to stdout and the table to stderr
    print(format_estimate(estimate, calibrator.meta_.class_names, interval, observed), file=sys.stderr if args.json == STDOUT else sys.stdout)
    if args.json:
        write_text_atomic(args.json, json.dumps(estimate_json(estimate, calibrator.meta_.class_names, interval), indent=2) + "\n")
        if args.json != STDOUT:
            note(f"wrote the estimate to {args.json}", quiet=args.quiet)
    if args.publish:
        publish_estimate(args, calibrator, probabilities, out=sys.stderr if args.json == STDOUT else sys.stdout)
    if args.out:
        prior = estimate.prior if args.no_test else (estimate.prior if estimate.adapt else None)
        aligned_to_prior(calibrator, prior).save(args.out)
        what = "the estimated prior" if prior is not None else "the balanced reference (the test kept it)"
        print(f"wrote a calibration aligned to {what} to {args.out}", file=sys.stderr if args.json == STDOUT else sys.stdout)
    return 0


def publish_estimate(args: argparse.Namespace, calibrator, probabilities: torch.Tensor, out) -> None:
    """Publish the next deployment prior from these rows, as a server's estimate is (under the store's lock,
    after :func:`disalign.calib.core.label_shift.next_prior`), or say why the published one stays."""
    import torch

    from disalign.calib.artifact import priors
    from disalign.calib.artifact.format import version_name
    from disalign.calib.core import label_shift
    from disalign.service.prior import update_record

    store = priors.prior_dir(args.calibration, args.prior_dir)
    served = version_name(calibrator.params_, calibrator.meta_)  # what the servers report as calibration_version
    with priors.estimate_lock(store, wait_s=30.0) as held:
        if not held:
            raise InputError(f"a server held the lock of {store} for 30 s; retry.")
        current = priors.read_current(store)
        version = current[1] if current else None
        applies = version is not None and version.calibration_version == served
        if applies and version.frozen:
            raise InputError(f"the prior published in {store} is frozen (POST /admin/prior); unfreeze it to publish another.")
        update = label_shift.next_prior({"adapt": probabilities}, torch.tensor(version.prior, dtype=torch.float64)
                                        if applies and version.prior is not None else None, max_step=args.max_step,
                                        concentration=args.concentration, significance=args.significance, tolerance=args.tolerance)
        if not update.changed:
            print(f"the published prior stays ({update.reason})", file=out)
            return
        new = priors.PriorVersion(
            prior=None if update.prior is None else update.prior.tolist(), classes=list(calibrator.meta_.class_names),
            calibration_version=served, source="adapt", epoch=version.epoch if version else priors.INITIAL_EPOCH, created=priors.now_iso(),
            rows=int(probabilities.shape[0]), rows_by_source={"adapt": int(probabilities.shape[0])},
            test={**update_record(update, args.max_step), "bank": str(args.unlabeled)})
        pointer = priors.publish_version(store, new)
    moved = "balanced" if update.prior is None else f"a prior {label_shift.l1_distance(update.prior, label_shift.uniform_prior(len(new.classes))):.3f} from uniform"
    print(f"published {pointer} in {store}: {moved}" + (f" (a step of at most --max-step {args.max_step:g})" if update.stepped else ""), file=out)


def format_estimate(estimate: label_shift.PriorEstimate, class_names: list[str], interval, observed) -> str:
    """The estimate as a text table (percentages), then the test's decision."""
    from disalign.calib.core import label_shift

    header = ["class", "prior %"] + (["95% interval"] if interval is not None else []) + (["labelled %"] if observed is not None else [])
    rows = []
    for k, name in enumerate(class_names):
        row = [name, f"{100 * float(estimate.prior[k]):.2f}"]
        if interval is not None:
            row.append(f"{100 * float(interval[0][k]):.2f}–{100 * float(interval[1][k]):.2f}")
        if observed is not None:
            row.append(f"{100 * float(observed[k]):.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in [header, *rows]]
    k = len(class_names)
    lines.append(f"rows: {estimate.num_samples}; EM: {estimate.iterations} iterations"
                 + ("" if estimate.converged else " (not converged)"))
    lines.append(f"L1 from uniform: {label_shift.l1_distance(estimate.prior, label_shift.uniform_prior(k)):.3f}"
                 + (f"; L1 from the labelled rows' frequencies: {label_shift.l1_distance(estimate.prior, observed):.3f}" if observed is not None else ""))
    decision = "adapt to the estimate" if estimate.adapt else "keep the balanced reference"
    lines.append(f"likelihood-ratio test against the reference: statistic {estimate.statistic:.1f}, "
                 f"p = {estimate.p_value:.3g} (tolerance {estimate.tolerance:g} nats/row, level {estimate.significance:g}) → {decision}")
    return "\n".join(lines)


def estimate_json(estimate: label_shift.PriorEstimate, class_names: list[str], interval) -> dict:
    """The estimate in the prior-file format, with its test and interval."""
    out = {"prior": estimate.prior.tolist(), "classes": list(class_names), "num_rows": estimate.num_samples,
           "test": {"statistic": estimate.statistic, "p_value": estimate.p_value, "significance": estimate.significance,
                    "tolerance": estimate.tolerance, "adapt": estimate.adapt}}
    if interval is not None:
        out["interval"] = {"level": 0.95, "low": interval[0].tolist(), "high": interval[1].tolist()}
    return out


# -- eval --target-prior --------------------------------------------------------------------------
def add_target_prior_argument(p) -> None:
    p.add_argument("--target-prior", metavar="uniform|train|estimate|FILE",
                   help="also evaluate the calibration aligned to this class prior: uniform (as fitted), the training "
                        "prior, the prior estimated on the test bank itself (with its test), or a prior file")


def with_target_prior(estimators: dict, calibrator, test, choice: str | None) -> dict:
    """``estimators`` plus the calibration aligned to the ``--target-prior`` choice, as ``<method>@<choice>``."""
    from disalign.calib.core import label_shift

    if choice is None:
        return estimators
    if choice == "uniform":
        prior = None
    elif choice == "train":
        prior = training_prior(calibrator)
    elif choice == "estimate":
        clean = test.view == 0
        estimate = label_shift.estimate_prior(reference_probabilities(calibrator, test.features[clean], test.logits[clean]))
        print(format_estimate(estimate, calibrator.meta_.class_names, None, None).splitlines()[-1])
        prior = estimate.prior if estimate.adapt else None
    else:
        prior = label_shift.read_prior_file(choice, calibrator.meta_.class_names)
    name = f"{calibrator.method}@{Path(choice).name if choice not in TARGET_PRIOR_CHOICES else choice}"
    return {**estimators, name: aligned_to_prior(calibrator, prior)}
