"""Figures of an evaluation report (from :func:`calib.evaluate.evaluate_methods`), written as PNG files.

    write_plots("out/plots", report, rho_curve=disalign.meta_.report.get("rho_curve"))

- ``per_class_accuracy.png``: per-class test accuracy of every method against the classes sorted by
  training count (paper Fig. 1 style): training counts on a log axis above, accuracies below (a moving
  average over neighbouring classes when K > 50), many / medium / few boundaries marked.
- ``rho_curve.png``: validation mean-class accuracy (and accuracy) of DisAlign against ρ; skipped when
  there is no curve or it has no validation scores.
- ``reliability.png``: one reliability diagram per method: accuracy per confidence bin (bars) and the
  bin's mean confidence (dots) against the diagonal, ECE in the title.

Figures are drawn on the Agg canvas directly (no pyplot, no global backend or state; fixed margins rather
than constrained layout, which doubles the drawing time) and each file is written to a temporary name in the same directory, then renamed into place.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SMOOTH_ABOVE = 50  # per-class curves are smoothed when there are more classes than this


def _save(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG at a temporary sibling name, then rename it to ``path``."""
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _as_float(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of values (K,) over ``window`` neighbours, ignoring NaN; NaN where none is valid."""
    valid = ~np.isnan(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
    counts = np.convolve(valid.astype(np.float64), kernel, mode="same")
    out = np.full_like(values, math.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def per_class_figure(report: dict) -> Figure:
    """Training counts (log axis; a zero count is drawn at 0.5) above per-class accuracies, classes by count."""
    counts = np.asarray(report["class_counts"], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    rank = np.arange(1, counts.size + 1)
    window = max(1, counts.size // 20) if counts.size > SMOOTH_ABOVE else 1
    fig = Figure(figsize=(8, 6))
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.09, hspace=0.08)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 2))
    top.bar(rank, np.maximum(counts[order], 0.5), width=1.0, color="0.6")
    top.set_yscale("log")
    top.set_ylabel("training count")
    for name, accuracy in report["per_class_accuracy"].items():
        values = _as_float(accuracy)[order]
        if window > 1:
            values = moving_average(values, window)
        bottom.plot(rank, 100 * values, label=name, marker="o" if counts.size <= SMOOTH_ABOVE else None, markersize=3)
    sorted_counts = counts[order]
    boundaries = []  # between the many / medium / few groups (classes are sorted by count, descending)
    if report.get("many_above") is not None:
        boundaries.append(int(np.sum(sorted_counts > report["many_above"])))
    if report.get("few_below") is not None:
        boundaries.append(int(np.sum(sorted_counts >= report["few_below"])))
    for boundary in sorted(set(b for b in boundaries if 0 < b < counts.size)):
        for ax in (top, bottom):
            ax.axvline(boundary + 0.5, color="0.3", linestyle=":", linewidth=1)
    bottom.set_xlabel("class rank by training count" + (f" (moving average over {window} classes)" if window > 1 else ""))
    bottom.set_ylabel("test accuracy (%)")
    bottom.set_ylim(-2, 102)
    if report["per_class_accuracy"]:
        bottom.legend(loc="lower left", fontsize="small")
    fig.suptitle("Per-class accuracy vs training count")
    return fig


def rho_figure(rho_curve: list[dict]) -> Figure | None:
    """Validation accuracies against ρ; None when no point of the curve has a validation score."""
    points = sorted((p for p in rho_curve if p.get("val_mean_class_accuracy") is not None), key=lambda p: p["rho"])
    if not points:
        return None
    rho = np.array([p["rho"] for p in points], dtype=np.float64)
    mca = np.array([p["val_mean_class_accuracy"] for p in points], dtype=np.float64)
    fig = Figure(figsize=(6, 4))
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.13)
    ax = fig.subplots()
    ax.plot(rho, 100 * mca, marker="o", label="val mean-class accuracy")
    if all(p.get("val_accuracy") is not None for p in points):
        ax.plot(rho, [100 * p["val_accuracy"] for p in points], marker="s", linestyle="--", label="val accuracy")
    # The fit's own rule: best mean-class accuracy, ties broken by the lower validation NLL.
    best = max(range(len(points)), key=lambda i: (mca[i], -(points[i].get("val_nll") or 0.0)))
    ax.axvline(rho[best], color="0.3", linestyle=":", linewidth=1, label=f"chosen: ρ = {rho[best]:g}")
    ax.set_xlabel("ρ (GRW exponent)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize="small")
    ax.set_title("DisAlign: validation accuracy vs ρ")
    return fig


def reliability_figure(reliability: dict[str, dict]) -> Figure:
    """One reliability diagram per method, three per row."""
    names = list(reliability)
    cols = max(1, min(3, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(3.3 * cols, 3.3 * rows))
    fig.subplots_adjust(left=0.6 / (3.3 * cols), right=0.97, bottom=0.5 / (3.3 * rows), top=1 - 0.3 / (3.3 * rows),
                        wspace=0.35, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        bins = reliability[name]
        accuracy = _as_float(bins["accuracy"])
        num_bins = accuracy.size
        centres = (np.arange(num_bins) + 0.5) / num_bins
        filled = ~np.isnan(accuracy)
        ax.bar(centres[filled], accuracy[filled], width=1.0 / num_bins, color="tab:blue", edgecolor="white", label="accuracy")
        confidence = _as_float(bins["confidence"])
        ax.plot(centres[filled], confidence[filled], "o", color="tab:red", markersize=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ece = bins.get("ece")
        ax.set_title(name if ece is None else f"{name} (ECE {100 * ece:.1f}%)", fontsize="medium")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    for ax in axes[len(names):]:
        ax.set_axis_off()
    return fig


def write_plots(directory: str | os.PathLike, report: dict, *, rho_curve: list[dict] | None) -> list[Path]:
    """Write the report's figures into ``directory`` (created if missing); returns the PNG paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [_save(per_class_figure(report), directory / "per_class_accuracy.png")]
    rho = rho_figure(rho_curve) if rho_curve else None
    if rho is not None:
        written.append(_save(rho, directory / "rho_curve.png"))
    if report.get("reliability"):
        written.append(_save(reliability_figure(report["reliability"]), directory / "reliability.png"))
    return written
