"""calib.plots: every figure is written as a non-empty PNG, atomically, without pyplot state."""

from __future__ import annotations

import sys

import numpy as np

from calib.plots import moving_average, rho_figure, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RHO_CURVE = [
    {"rho": rho, "val_mean_class_accuracy": 0.5 + 0.1 * rho - 0.04 * rho**2, "val_accuracy": 0.6 - 0.02 * rho,
     "val_nll": 1.0, "train_loss": 0.9}
    for rho in (0.0, 0.5, 1.0, 1.5, 2.0)
]


def make_report(num_classes: int, methods=("joint", "disalign"), num_bins: int = 15) -> dict:
    rng = np.random.default_rng(0)
    counts = np.sort((1000 * 0.97 ** np.arange(num_classes)).astype(int))[::-1]
    per_class = {name: [None if i % 17 == 16 else float(v) for i, v in enumerate(rng.uniform(size=num_classes))] for name in methods}
    reliability = {
        name: {"count": [0] + [10] * (num_bins - 1), "confidence": [None] + list(np.linspace(0.1, 0.95, num_bins - 1)),
               "accuracy": [None] + list(np.linspace(0.05, 0.9, num_bins - 1)), "ece": 0.05}
        for name in methods
    }
    methods_report = {name: {"accuracy": 0.5, "mean_class_accuracy": 0.4, "many": 0.6, "medium": 0.4, "few": None, "ece": 0.05, "nll": 1.2}
                      for name in methods}
    return {"methods": methods_report, "class_counts": counts.tolist(), "num_rows": 100, "many_above": 100, "few_below": 20,
            "per_class_accuracy": per_class, "reliability": reliability}


def assert_pngs(paths, names):
    assert [p.name for p in paths] == names
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_all_figures_without_pyplot_state(tmp_path):
    paths = write_plots(tmp_path / "plots", make_report(12), rho_curve=RHO_CURVE)
    assert_pngs(paths, ["per_class_accuracy.png", "rho_curve.png", "reliability.png"])
    if "matplotlib.pyplot" in sys.modules:  # another test may have imported it; it must hold no figure of ours
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_many_classes_and_methods_are_smoothed_and_gridded(tmp_path):
    report = make_report(300, methods=("joint", "lws", "crt", "disalign"))  # a 2 × 3 grid
    paths = write_plots(tmp_path, report, rho_curve=None)
    assert_pngs(paths, ["per_class_accuracy.png", "reliability.png"])


def test_rho_plot_is_skipped_without_a_validation_curve():
    # the ρ curve of a fit without a validation bank has no val_* scores
    assert rho_figure([]) is None and rho_figure([{"rho": 1.0, "train_loss": 0.5}]) is None


def test_rewrite_replaces_files(tmp_path):
    report = make_report(3, methods=("joint",))
    first = write_plots(tmp_path, report, rho_curve=None)
    stale = {p: p.stat().st_mtime_ns for p in first}
    second = write_plots(tmp_path, report, rho_curve=None)
    assert first == second and all(p.stat().st_mtime_ns >= stale[p] for p in second)
    assert_pngs(second, ["per_class_accuracy.png", "reliability.png"])


def test_moving_average_ignores_missing_values():
    values = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan])
    smoothed = moving_average(values, 3)
    assert smoothed[:3].tolist() == [1.0, 2.0, 3.0]
    assert smoothed[3] == 3.0 and np.isnan(smoothed[4]) and np.isnan(smoothed[5])
