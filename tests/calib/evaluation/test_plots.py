"""disalign.calib.evaluation.plots: each figure shows what it claims (axes, scales, names, groups, counts, the chosen ρ), at
K = 10 and at the ImageNet-LT profile's K = 1000, and is written as a small PNG, atomically, without
pyplot state."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from disalign.calib.evaluation.plots import (
    COUNT_BINS,
    binned_mean,
    group_spans,
    per_class_figure,
    reliability_figure,
    rho_figure,
    write_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("joint", "disalign", "logit-adjust", "tau-norm", "lws", "crt", "ncm")
RHO_CURVE = [  # mean-class accuracy ties at 1.5 and 1.75; NLL is lower at 1.75, which the fit's rule picks
    {"rho": rho, "val_mean_class_accuracy": acc, "val_nll": nll, "train_loss": 0.9}
    for rho, acc, nll in ((0.0, 0.70, 1.05), (1.0, 0.765, 0.71), (1.5, 0.81, 0.64), (1.75, 0.81, 0.62), (3.0, 0.66, 1.48))
]
CIFAR_COUNTS = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_report(counts, names=None, methods=METHODS, num_bins: int = 15) -> dict:
    rng = np.random.default_rng(0)
    k = len(counts)
    per_class = {name: [None if i % 17 == 16 else float(v) for i, v in enumerate(rng.uniform(size=k))] for name in methods}
    count = [0, 1] + [10] * (num_bins - 2)  # an empty bin, a bin of one row, full bins
    reliability = {name: {"count": count, "confidence": [None] + list(np.linspace(0.1, 0.95, num_bins - 1)),
                          "accuracy": [None, 1.0] + list(np.linspace(0.1, 0.9, num_bins - 2)), "ece": 0.05}
                   for name in methods}
    report = {"methods": {name: {} for name in methods}, "class_counts": [int(c) for c in counts], "num_rows": 100,
              "many_above": 100, "few_below": 20, "per_class_accuracy": per_class, "reliability": reliability}
    if names is not None:
        report["class_names"] = names
    return report


@pytest.fixture(scope="module")
def imagenet_lt_counts(shared_dir) -> list[int]:
    return json.loads((shared_dir / "profiles" / "long_tail_profiles.json").read_text())["imagenet_lt_train"]["counts"]


def method_lines(ax):
    """The data lines (group boundaries are unlabelled lines)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def assert_pngs(paths, names, *, max_bytes=200_000, min_width=600):
    assert [p.name for p in paths] == names
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and 10_000 < len(data) < max_bytes, (path.name, len(data))
        with Image.open(path) as image:
            assert image.width >= min_width and image.height >= 400
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_all_figures_at_k10_are_small_pngs_without_pyplot_state(tmp_path):
    paths = write_plots(tmp_path / "plots", make_report(CIFAR_COUNTS, CIFAR_NAMES), rho_curve=RHO_CURVE, chosen_rho=1.75)
    assert_pngs(paths, ["per_class_accuracy.png", "rho_curve.png", "reliability.png"])
    with Image.open(paths[0]) as image:
        assert image.size == (1000, 560)
    if "matplotlib.pyplot" in sys.modules:  # another test may have imported it; it must hold no figure of ours
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_per_class_at_k10_names_every_class_at_its_count_with_a_marker_per_method():
    fig = per_class_figure(make_report(CIFAR_COUNTS, CIFAR_NAMES))
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and ax.get_xscale() == "log"
    lines = method_lines(ax)
    assert len(lines) == len(METHODS) and len({line.get_marker() for line in lines}) == len(METHODS)
    # every class is a point at (about) its training count: the methods are spread by < 10 % sideways
    for line in lines:
        assert np.allclose(np.sort(line.get_xdata()), sorted(CIFAR_COUNTS), rtol=0.1)
    top = ax.child_axes[0]  # the secondary axis with the class names
    names = [t.get_text() for t in top.get_xticklabels()]
    assert names == [n for _, n in sorted(zip(CIFAR_COUNTS, CIFAR_NAMES, strict=True))]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [text.split()[0] for text in legend] == list(METHODS)
    # CIFAR-10-LT: 9 'many' classes (> 100) and one 'medium' (the 100-image truck), no 'few'
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["medium (20–100)\n1 class", "many (> 100)\n9 classes"]


def test_per_class_at_k1000_bins_classes_and_labels_the_groups(imagenet_lt_counts):
    counts = np.asarray(imagenet_lt_counts)
    assert counts.size == 1000
    fig = per_class_figure(make_report(counts))
    ax, hist = fig.axes
    assert ax.get_xscale() == "log" and hist.get_xscale() == "log"
    assert len(method_lines(ax)) == len(METHODS)
    assert all(len(line.get_xdata()) <= COUNT_BINS for line in method_lines(ax))  # one point per non-empty bin
    assert sum(bar.get_height() for bar in hist.containers[0]) == 1000  # every class is in one bin
    few, many = int((counts < 20).sum()), int((counts > 100).sum())
    labels = [t.get_text() for t in ax.texts]
    assert labels == [f"few (< 20)\n{few} classes", f"medium (20–100)\n{1000 - few - many} classes", f"many (> 100)\n{many} classes"]
    assert not ax.child_axes  # no class names at this K


def test_reliability_histogram_shows_a_bin_of_one_row_and_a_legend():
    fig = reliability_figure(make_report(CIFAR_COUNTS)["reliability"])
    assert len(fig.axes) == 2 * len(METHODS)  # a diagram and its histogram per method
    hist = fig.axes[1]
    assert hist.get_yscale() == "log" and hist.get_ylim()[0] < 1  # a one-row bar rises above the axis
    assert sorted(p.get_height() for p in hist.patches)[:2] == [1.0, 10.0]  # the empty bin has no bar
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["accuracy of the bin", "… fewer than 10 rows", "mean confidence", "perfect calibration"]
    diagram = fig.axes[0]
    hatched = [p for p in diagram.patches if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_height() == 1.0  # the one-row bin is marked as such


def test_rho_curve_has_accuracy_and_nll_on_twin_axes_and_marks_the_chosen_rho():
    fig = rho_figure(RHO_CURVE)
    left, right = fig.axes
    accuracy = left.get_lines()[0]
    assert np.allclose(accuracy.get_ydata(), [70.0, 76.5, 81.0, 81.0, 66.0])
    assert np.allclose(right.get_lines()[0].get_ydata(), [p["val_nll"] for p in RHO_CURVE])
    assert left.get_ylabel().startswith("val mean-class accuracy") and right.get_ylabel() == "val NLL"
    star = left.get_lines()[-1]
    assert star.get_xdata()[0] == 1.75  # the tie at 81 % goes to the lower NLL
    assert "chosen ρ = 1.75" in star.get_label()
    assert rho_figure(RHO_CURVE, chosen_rho=1.0).axes[0].get_lines()[-1].get_xdata()[0] == 1.0  # the fit's choice wins


def test_rho_curve_of_two_head_families_draws_each_and_stars_the_head_the_fit_kept():
    """A default classification fit scores every ρ with and without α: two families, not one zigzag line."""
    with_alpha = [{**p, "magnitude": True} for p in RHO_CURVE]
    without = [{**p, "magnitude": False, "val_mean_class_accuracy": p["val_mean_class_accuracy"] - 0.01,
                "val_nll": p["val_nll"] - 0.01} for p in RHO_CURVE]
    kept = without[2]  # ρ = 1.5 without α: what the validation NLL chose
    fig = rho_figure(with_alpha + without, 1.5, chosen=kept, selection="nll")
    left, right = fig.axes
    accuracy_lines = left.get_lines()[:2]
    assert [line.get_label() for line in accuracy_lines] == ["val mean-class accuracy (with α)", "val mean-class accuracy (no α)"]
    assert all(list(line.get_xdata()) == [0.0, 1.0, 1.5, 1.75, 3.0] for line in accuracy_lines)  # each family sorted by ρ alone
    assert np.allclose(accuracy_lines[1].get_ydata(), [69.0, 75.5, 80.0, 80.0, 65.0])
    assert [line.get_label() for line in right.get_lines()] == ["val NLL (selects) (with α)", "val NLL (selects) (no α)"]
    star = left.get_lines()[-1]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (1.5, pytest.approx(80.0))
    assert star.get_label() == "chosen ρ = 1.5 (no α): 80.0%, NLL 0.630"


def test_rho_plot_is_skipped_without_a_validation_curve():
    # the ρ curve of a fit without a validation bank has no val_* scores
    assert rho_figure([]) is None and rho_figure([{"rho": 1.0, "train_loss": 0.5}]) is None


def test_plots_at_k1000_are_small_pngs(tmp_path, imagenet_lt_counts):
    paths = write_plots(tmp_path, make_report(imagenet_lt_counts), rho_curve=RHO_CURVE)
    assert_pngs(paths, ["per_class_accuracy.png", "rho_curve.png", "reliability.png"])


def test_rewrite_replaces_files(tmp_path):
    report = make_report([30, 3, 1], methods=("joint",))
    first = write_plots(tmp_path, report, rho_curve=None)
    stale = {p: p.stat().st_mtime_ns for p in first}
    second = write_plots(tmp_path, report, rho_curve=None)
    assert first == second and all(p.stat().st_mtime_ns >= stale[p] for p in second)
    assert_pngs(second, ["per_class_accuracy.png", "reliability.png"], min_width=340)  # one reliability diagram


def test_binned_mean_ignores_missing_values_and_counts_every_class():
    x = np.array([1.0, 2.0, 3.0, 10.0, 20.0])
    values = np.array([0.2, np.nan, 0.6, 0.5, np.nan])
    means, classes = binned_mean(x, values, np.array([1.0, 5.0, 15.0, 20.0]))
    assert classes.tolist() == [3, 1, 1]  # 20 falls into the last bin, its right edge included
    assert means[0] == pytest.approx(0.4) and means[1] == 0.5 and np.isnan(means[2])


def test_group_spans_put_boundaries_between_integer_counts():
    report = make_report([500, 100, 50, 20, 19, 3])
    spans = group_spans(report, 1.0, 1000.0)
    assert [(g, start, stop) for g, _, start, stop in spans] == [(0, 1.0, 19.5), (1, 19.5, 100.5), (2, 100.5, 1000.0)]
    assert [label.split("\n")[1] for _, label, _, _ in spans] == ["2 classes", "3 classes", "1 class"]
