"""Evaluate fitted calibrations side by side on a test bank, and fit the baselines by name.

    estimators = {"disalign": load_calibration("calib_dir"), **fit_baselines(["joint", "lws"], train, val)}
    report = evaluate_methods(test, estimators, class_counts=train.training_class_counts(), val=val)
    print(format_table(report))

Only the clean view (``view == 0``) and labelled rows (``label >= 0``) of the test bank are evaluated.
Accuracies are fractions in [0, 1]; many / medium / few are mean class accuracies over the classes with
more than ``many_above``, between, and fewer than ``few_below`` training examples (None for a group with
no evaluated class). The report is plain JSON (floats, lists, None):

    {"methods": {name: {"accuracy", "mean_class_accuracy", "many", "medium", "few", "ece", "nll"}},
     "class_counts": [K ints], "num_rows": int, "many_above": int, "few_below": int,
     "per_class_accuracy": {name: [K floats, None for classes absent from the test bank]},
     "reliability": {name: {"count", "confidence", "accuracy": [num_bins values, None for empty bins], "ece"}},
     "bootstrap": {"resamples", "level", "seed", "seeds", "mean_class_accuracy": {name: [low, high]},
                   "difference_to_best": {name: [low, high]}},             (with bootstrap_resamples > 0)
     "validation": {"num_rows", "mean_class_accuracy": {name: float}, "nll": {name: float}, "best": name,
                    "lowest_nll": name}}  (with val)

Uncertainty: a stratified percentile bootstrap of the test rows (each class's rows resampled within the
class, so every resample keeps the test bank's class sizes; 1,000 resamples) gives a 95 % interval of
each method's mean-class accuracy. Each interval is drawn with a seed of its own, made from the report's
``seed`` (0) and the method's name (:func:`method_seed`), from that method's predictions alone, so a
method's interval is the same whichever other methods are evaluated beside it, in whatever order.
``difference_to_best`` — the interval of (method − best-on-val method) — is a paired comparison, drawn
on resamples shared by exactly those two methods (seeded by both names): a difference whose interval
holds 0 is within the noise of this test bank. The method "best on the
validation bank" has the highest mean-class accuracy on the clean labelled rows of ``val`` (ties: lower
NLL, then the order given); it is the choice a user can make without looking at the test bank.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from disalign.calib.core.metrics import (
    FEW_BELOW,
    MANY_ABOVE,
    classification_report,
    mean_class_accuracy,
    negative_log_likelihood,
    per_class_accuracy,
    reliability_bins,
)
from disalign.calib.core.regime import Regime, training_regime
from disalign.calib.data.bank import Bank, clean_labelled_rows, rows_digest
from disalign.calib.errors import InputError
from disalign.calib.estimators.base import Calibrator, as_bank
from disalign.calib.estimators.methods import BASELINE_NAMES, METHODS

PREDICT_BLOCK_ROWS = 16384
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
COLUMNS = (  # (report key, header, kind)
    ("accuracy", "acc", "percent"),
    ("mean_class_accuracy", "mean-cls", "percent"),
    ("many", "many", "percent"),
    ("medium", "medium", "percent"),
    ("few", "few", "percent"),
    ("ece", "ECE", "percent"),
    ("nll", "NLL", "plain"),
)


def _none_for_nan(values: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def predict_in_blocks(estimator: Calibrator, features: torch.Tensor, logits: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
    """Calibrated logits (N, K) of features (N, d) and logits (N, K), ``block_rows`` (default
    :data:`PREDICT_BLOCK_ROWS`) rows at a time to bound the memory of large test banks."""
    block_rows = block_rows or PREDICT_BLOCK_ROWS
    parts = [estimator.predict_logits(features[s : s + block_rows], logits[s : s + block_rows]) for s in range(0, logits.shape[0], block_rows)]
    return torch.cat(parts) if parts else torch.empty(0, logits.shape[1])


def bootstrap_mean_class_accuracy(correct: torch.Tensor, labels: torch.Tensor, *, resamples: int = BOOTSTRAP_RESAMPLES,
                                  seed: int = 0) -> torch.Tensor:
    """Mean-class accuracy of each method on stratified bootstrap resamples of the rows.

    correct (M, N) bool: whether method m is right on row n; labels (N,) int64 >= 0 → (M, resamples)
    float64. Every resample draws, for each class, as many rows as the class has, uniformly with
    replacement among them; all methods see the same resamples (paired).

    Only how often each row pattern (which methods are right) of a class is drawn matters. A class with
    few distinct patterns for its size draws those counts as one multinomial per resample; otherwise its
    rows are drawn directly and counted (either way O(resamples · min(rows, patterns)) per class).
    """
    rng = np.random.default_rng(seed)
    columns = torch.cat([labels.unsqueeze(0), correct.long()]).numpy()
    patterns, count = np.unique(columns, axis=1, return_counts=True)  # sorted by class first
    classes, first, per_class = np.unique(patterns[0], return_index=True, return_counts=True)
    out = np.zeros((resamples, correct.shape[0]))
    for start, groups in zip(first, per_class, strict=True):
        n, bits = count[start : start + groups], patterns[1:, start : start + groups].T  # (P,), (P, M)
        size = int(n.sum())
        # A multinomial draw costs ~8 direct ones per pattern; as there are at most 2^M patterns, the direct
        # path only runs for classes of at most 8·2^M rows (its (B, size) draws stay small).
        if groups * 8 < size:
            drawn = rng.multinomial(size, n / size, size=resamples)  # (B, P) rows drawn per pattern
        else:
            rows = np.repeat(np.arange(groups), n)  # the class's rows, as patterns
            picks = rows[rng.integers(0, size, (resamples, size))] + groups * np.arange(resamples)[:, None]
            drawn = np.bincount(picks.ravel(), minlength=resamples * groups).reshape(resamples, groups)
        out += drawn @ bits / size  # (B, M) accuracy on the class
    return torch.from_numpy(out / classes.size).T.contiguous()


def method_seed(*names: str, seed: int = 0) -> int:
    """The bootstrap seed of one method (or one pair): ``seed`` and the names, stable across runs and machines."""
    return zlib.crc32("\0".join((str(seed), *names)).encode())


def percentile_interval(samples: torch.Tensor, level: float = BOOTSTRAP_LEVEL) -> list[list[float]]:
    """[low, high] percentile interval of each row of samples (M, B)."""
    tail = (1.0 - level) / 2
    bounds = torch.quantile(samples, torch.tensor([tail, 1.0 - tail], dtype=samples.dtype), dim=1)  # (2, M)
    return bounds.T.tolist()


def validation_scores(val: Bank, estimators: dict[str, Calibrator]) -> dict:
    """Mean-class accuracy and NLL of every estimator on the clean labelled rows of ``val``, and the best one.

    A DisAlign fit that trained on these very rows (``val_weight`` > 0) is scored by its own out-of-fold
    predictions, from its fit report (each row by the head that never saw it): scored in-sample it would win
    on rows it learned. Those methods are listed in ``out_of_fold``."""
    keep = clean_labelled_rows(val.view, val.labels)
    if not bool(keep.any()):
        raise InputError(f"val bank {val.info.path} has no labelled rows in its clean view (view 0).")
    labels = val.labels[keep]
    digest = rows_digest(val.logits[keep], labels)
    scores: dict = {"num_rows": int(labels.numel()), "mean_class_accuracy": {}, "nll": {}, "out_of_fold": []}
    for name, estimator in estimators.items():
        report = estimator.meta_.report
        in_fit = report.get("validation_rows_in_fit", {}).get("digest") == digest  # then report["validation"] is out of fold
        if in_fit and estimator.meta_.target_prior is None:  # the out-of-fold scores are the balanced head's
            scores["mean_class_accuracy"][name] = report["validation"]["val_mean_class_accuracy"]
            scores["nll"][name] = report["validation"]["val_nll"]
            scores["out_of_fold"].append(name)
            continue
        calibrated = predict_in_blocks(estimator, val.features[keep], val.logits[keep]).float()
        scores["mean_class_accuracy"][name] = mean_class_accuracy(calibrated.argmax(1), labels, val.num_classes)
        scores["nll"][name] = negative_log_likelihood(calibrated, labels)
    best_key = {name: (scores["mean_class_accuracy"][name], -scores["nll"][name], -i) for i, name in enumerate(estimators)}
    scores["best"] = max(best_key, key=best_key.__getitem__) if estimators else None
    # The NLL ranks on every row's probability, not on a few hundred argmaxes: on small validation banks it
    # is the steadier of the two (what DisAlign's own selection uses), so the table names both when they differ.
    scores["lowest_nll"] = min(estimators, key=lambda name: scores["nll"][name]) if estimators else None
    return scores


def evaluate_methods(
    test: Bank,
    estimators: dict[str, Calibrator],
    *,
    class_counts: np.ndarray,
    many_above: int = MANY_ABOVE,
    few_below: int = FEW_BELOW,
    num_bins: int = 15,
    val: Bank | None = None,
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
    train: Bank | None = None,
) -> dict:
    """Metrics of every estimator on the clean labelled rows of ``test`` (report layout: module docstring).

    class_counts (K,): the training counts that define the many / medium / few groups. With ``val`` the
    report names the method best on it; ``bootstrap_resamples`` (0: none) sets the intervals' resamples.
    With ``train`` and ``val`` the report names the regime (:mod:`disalign.calib.core.regime`) and says, in
    ``recommendation``, which method to deploy.
    """
    test = as_bank(test, "test")
    counts = np.asarray(class_counts)
    if counts.shape != (test.num_classes,):
        raise InputError(f"class_counts should have shape ({test.num_classes},) like the test bank's logits, found {counts.shape}.")
    if not np.issubdtype(counts.dtype, np.number) or (counts < 0).any():
        raise InputError("class_counts should hold non-negative numbers, found negative or non-numeric values.")
    if few_below > many_above + 1:
        raise InputError(f"few_below should be at most many_above + 1, found few_below={few_below} and many_above={many_above}.")
    if num_bins < 1:
        raise InputError(f"num_bins should be >= 1, found {num_bins}.")
    if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 0:
        raise InputError(f"bootstrap_resamples should be an integer >= 0, found {bootstrap_resamples!r}.")
    keep = clean_labelled_rows(test.view, test.labels)
    if not bool(keep.any()):
        raise InputError(f"test bank {test.info.path} has no labelled rows in its clean view (view 0).")
    features, logits, labels = test.features[keep], test.logits[keep], test.labels[keep]
    counts_t = torch.as_tensor(counts.astype(np.int64))
    report: dict = {
        "methods": {},
        "class_counts": [int(c) for c in counts],
        "num_rows": int(labels.numel()),
        "many_above": many_above,
        "few_below": few_below,
        "per_class_accuracy": {},
        "reliability": {},
    }
    correct = torch.zeros(len(estimators), labels.numel(), dtype=torch.bool)  # (M, N)
    for index, (name, estimator) in enumerate(estimators.items()):
        estimator.check_compatible(num_classes=test.num_classes, feature_dim=test.feature_dim,
                                   model_fingerprint=test.info.model_fingerprint, source=f"test bank {test.info.path}")
        calibrated = predict_in_blocks(estimator, features, logits).float()
        metrics = classification_report(calibrated, labels, counts_t, many_above=many_above, few_below=few_below, num_bins=num_bins)
        report["methods"][name] = metrics
        correct[index] = calibrated.argmax(1) == labels
        report["per_class_accuracy"][name] = _none_for_nan(per_class_accuracy(calibrated.argmax(1), labels, test.num_classes).tolist())
        bins = reliability_bins(torch.softmax(calibrated, dim=1), labels, num_bins)
        report["reliability"][name] = {
            "count": [int(c) for c in bins["count"]],
            "confidence": _none_for_nan(bins["confidence"]),
            "accuracy": _none_for_nan(bins["accuracy"]),
            "ece": metrics["ece"],
        }
    if val is not None:
        report["validation"] = validation_scores(as_bank(val, "val"), estimators)
    if bootstrap_resamples and estimators:
        names = list(estimators)
        intervals = {name: percentile_interval(bootstrap_mean_class_accuracy(
            correct[m : m + 1], labels, resamples=bootstrap_resamples, seed=method_seed(name)))[0] for m, name in enumerate(names)}
        report["bootstrap"] = {"resamples": bootstrap_resamples, "level": BOOTSTRAP_LEVEL, "seed": 0,
                               "seeds": "per method: crc32 of the seed and the method's name (per pair for difference_to_best)",
                               "mean_class_accuracy": intervals}
        best = report.get("validation", {}).get("best")
        if best is not None:
            b = names.index(best)
            differences = {}
            for m, name in enumerate(names):
                pair = bootstrap_mean_class_accuracy(correct[[m, b]], labels, resamples=bootstrap_resamples, seed=method_seed(name, best))
                differences[name] = percentile_interval((pair[0] - pair[1]).unsqueeze(0))[0]
            report["bootstrap"]["difference_to_best"] = differences
    if train is not None and val is not None:
        regime = bank_regime(as_bank(train, "train"), as_bank(val, "val"))
        report["regime"] = {**regime.to_dict(), "sentence": regime.sentence()}
        report["recommendation"] = recommendation(regime, report["validation"])
    return report


def bank_regime(train: Bank, val: Bank) -> Regime:
    """The regime of a training bank against a validation bank, from their stage-1 logits (clean labelled rows)."""
    t, v = clean_labelled_rows(train.view, train.labels), clean_labelled_rows(val.view, val.labels)
    return training_regime(train.logits[t].argmax(1), train.labels[t], val.logits[v].argmax(1), val.labels[v], train.num_classes)


def recommendation(regime: Regime, validation: dict) -> str:
    """One sentence: the method to deploy — the one with the lowest validation NLL — the method with the best
    validation accuracy when that is another, and, where the training bank is memorised, which methods see the bias.

    The NLL, not the accuracy: it scores every row's probability rather than a few hundred argmaxes, and on the
    suite's 200-row validation banks it pointed to a method within 0.6 point of the best on test each time,
    where the best validation accuracy missed by up to 1.8 (docs/results.md). Neither is sure on so few rows,
    so a disagreement is said, not hidden."""
    chosen, most_accurate = validation["lowest_nll"], validation["best"]
    accuracy = validation["mean_class_accuracy"]
    where = f"{chosen} (lowest validation NLL: {validation['nll'][chosen]:.3f} on {validation['num_rows']} rows)"
    if most_accurate != chosen:
        where += (f", or {most_accurate} (best validation mean-class accuracy: {100 * accuracy[most_accurate]:.1f} % against "
                  f"{100 * accuracy[chosen]:.1f} %)")
    if regime.memorised:
        return (f"recommendation: {where}; the training bank is memorised, so only methods that need no training rows or "
                "that trained on held-out ones (DisAlign's default, --val-weight regime) see the bias.")
    return f"recommendation: {where}; the training bank shows the bias, so a method fitted on it can be trusted here."


def fit_baselines(names: list[str], train: Bank, val: Bank | None, *, seed: int = 0,
                  max_steps: int | None = None) -> dict[str, Calibrator]:
    """Fit the named baselines (default hyper-parameters; ``seed`` and ``max_steps`` for the SGD ones,
    LWS and cRT) → {name: estimator}.

    Every name is checked before any fit; the error lists the valid names.
    """
    for name in names:
        if name not in BASELINE_NAMES:
            raise InputError(f"baseline should be one of {', '.join(BASELINE_NAMES)}, found {name!r}.")
    train_bank = as_bank(train, "train")
    val_bank = as_bank(val, "val") if val is not None else None
    fitted: dict[str, Calibrator] = {}
    for name in dict.fromkeys(names):
        cls = METHODS[name]
        estimator = cls(seed=seed, max_steps=max_steps) if "max_steps" in cls._param_names() else cls()
        fitted[name] = estimator.fit(train_bank, val_bank)
    return fitted


def _fixed(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, never ``-0.0`` (a value that rounds to zero is zero)."""
    return f"{round(value, digits) + 0.0:.{digits}f}"


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return _fixed(100 * value, 1) if kind == "percent" else _fixed(value, 3)


def _interval(bounds: list[float] | None) -> str:
    return "-" if bounds is None else f"[{_fixed(100 * bounds[0], 1)}, {_fixed(100 * bounds[1], 1)}]"


def format_table(report: dict) -> str:
    """One aligned text table, a row per method: percentages with one decimal (NLL as is), "-" for None.

    With a bootstrap in the report: the 95 % interval of mean-class accuracy, and of the difference to the
    method best on the validation bank; with validation scores, a last line naming that method.
    """
    header = ["method", *(title for _, title, _ in COLUMNS)]
    rows = [[name, *(_cell(metrics.get(key), kind) for key, _, kind in COLUMNS)] for name, metrics in report["methods"].items()]
    boot, best = report.get("bootstrap"), report.get("validation", {}).get("best")
    if boot:
        level = f"{100 * boot['level']:g}%"
        header.append(f"mean-cls {level} CI")
        for row in rows:
            row.append(_interval(boot["mean_class_accuracy"].get(row[0])))
        if "difference_to_best" in boot:
            header.append(f"vs {best} {level} CI")
            for row in rows:
                row.append(_interval(boot["difference_to_best"].get(row[0])))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    if best is not None:
        val = report["validation"]
        lowest = val.get("lowest_nll")
        lines.append(f"best on the validation bank: {best} (val mean-cls {100 * val['mean_class_accuracy'][best]:.1f} "
                     f"on {val['num_rows']} rows)"
                     + (f"; lowest val NLL: {lowest} ({val['nll'][lowest]:.3f} against {val['nll'][best]:.3f})"
                        if lowest is not None and lowest != best else "")
                     + (f"; {', '.join(val['out_of_fold'])} scored out of fold (trained on these rows)" if val.get("out_of_fold") else ""))
    if "regime" in report:
        lines += [report["regime"]["sentence"], report["recommendation"]]
    return "\n".join(lines)


__all__ = ["bank_regime", "bootstrap_mean_class_accuracy", "evaluate_methods", "fit_baselines", "format_table", "predict_in_blocks",
           "recommendation", "validation_scores"]
