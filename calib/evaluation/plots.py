"""Figures of an evaluation report (from :func:`disalign.calib.evaluation.evaluate.evaluate_methods` or
:func:`disalign.calib.evaluation.segmentation.evaluate_segmentation`), written as PNG files.

    write_plots("out/plots", report, rho_curve=disalign.meta_.report.get("rho_curve"), chosen_rho=1.75)

- ``per_class_accuracy.png``: per-class test accuracy against the training count (log axis), one marker
  and colour per method. With K <= :data:`NAMED_CLASSES_UP_TO` classes every class is a point and its name
  sits on the top axis; with more classes the classes are binned by training count (mean accuracy per
  bin, the number of classes per bin in a panel below). The many / medium / few (head / body / tail)
  groups are shaded and labelled with their size.
- ``reliability.png``: one reliability diagram per method: accuracy per confidence bin (bars, hatched
  when the bin holds fewer than :data:`FEW_SAMPLES` rows) and the bin's mean confidence (dots) against the
  diagonal, ECE in the title; below each, the rows per bin on a log axis (a bin of one row is visible).
- ``rho_curve.png``: DisAlign's validation mean-class accuracy (left axis) and NLL (right axis) against ρ,
  one pair of lines per head family the fit tried (with / without α, validation share λ), the head it
  kept starred; skipped when the curve has no validation scores.

Figures are drawn on the Agg canvas directly (no pyplot, no global backend or state; fixed margins rather
than constrained layout, which doubles the drawing time). :func:`render_plots` draws every figure to PNG
bytes first; :func:`write_pngs` then writes each to a temporary name in the directory and renames it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from disalign.calib.files import write_atomic

PLOT_FILES = ("per_class_accuracy.png", "reliability.png", "rho_curve.png")  # every name render_plots may write

NAMED_CLASSES_UP_TO = 30  # up to this many classes, every class is drawn and named
COUNT_BINS = 16  # log-spaced training-count bins above that
FEW_SAMPLES = 10  # reliability bins with fewer rows are hatched
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
GROUP_SHADES = ("#fbe3d6", "#ffffff", "#dcebf7")  # few / medium / many (light, so markers stay readable)


def render_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _as_float(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def binned_mean(x: np.ndarray, values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of values (K,) (NaN ignored) per bin of x (K,) between ``edges`` (B+1,) → (means (B,), classes (B,)).

    A bin holds the x in [edges[i], edges[i+1]) (the last bin also its right edge); means are NaN for bins
    without a valid value; ``classes`` counts every x in the bin, valid value or not.
    """
    index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
    classes = np.bincount(index, minlength=edges.size - 1)
    valid = ~np.isnan(values)
    sums = np.bincount(index[valid], weights=values[valid], minlength=edges.size - 1)
    counted = np.bincount(index[valid], minlength=edges.size - 1)
    means = np.full(edges.size - 1, math.nan)
    np.divide(sums, counted, out=means, where=counted > 0)
    return means, classes


def group_spans(report: dict, low: float, high: float) -> list[tuple[int, str, float, float]]:
    """The few / medium / many groups that hold classes as ``(group, label, x_from, x_to)`` on the count
    axis, low → high; ``group`` 0, 1, 2 = few, medium, many (tail, body, head for segmentation)."""
    counts = np.asarray(report["class_counts"], dtype=np.float64)
    many_above, few_below = report.get("many_above"), report.get("few_below")
    if many_above is None or few_below is None:
        return []
    if "head_above" in report:  # segmentation: head / body / tail by training pixel ratio
        names = ("tail", "body", "head")
        tail, head = 100 * report["tail_below"], 100 * report["head_above"]
        bounds = (f"< {tail:g}%", f"{tail:g}–{head:g}%", f"> {head:g}%")
    else:
        names = ("few", "medium", "many")
        bounds = (f"< {few_below:g}", f"{few_below:g}–{many_above:g}", f"> {many_above:g}")
    sizes = (int(np.sum(counts < few_below)), int(np.sum((counts >= few_below) & (counts <= many_above))),
             int(np.sum(counts > many_above)))
    # Counts are integers: the boundaries sit half-way between the last count of one group and the next.
    edges = (low, min(max(few_below - 0.5, low), high), min(max(many_above + 0.5, low), high), high)
    return [(g, f"{names[g]} ({bounds[g]})\n{sizes[g]} class{'es' if sizes[g] > 1 else ''}", edges[g], edges[g + 1]) for g in range(3) if sizes[g]]


def per_class_figure(report: dict) -> Figure:
    """Per-class accuracy (%) against the training count (log axis; a zero count is drawn at 0.5)."""
    counts = np.maximum(np.asarray(report["class_counts"], dtype=np.float64), 0.5)
    k = counts.size
    names = report.get("class_names") or [str(i) for i in range(k)]
    accuracies = {name: 100 * _as_float(values) for name, values in report["per_class_accuracy"].items()}
    count_label = "training pixels" if "head_above" in report else "training count"
    low, high = counts.min() / 1.6, counts.max() * 1.6
    named = k <= NAMED_CLASSES_UP_TO
    fig = Figure(figsize=(10, 5.6))
    if named:
        fig.subplots_adjust(left=0.07, right=0.78, top=0.78, bottom=0.1)
        ax = fig.subplots()
        hist = None
    else:
        fig.subplots_adjust(left=0.07, right=0.78, top=0.9, bottom=0.09, hspace=0.06)
        ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    for i, (group, label, start, stop) in enumerate(group_spans(report, low, high)):
        for axis in (ax, hist) if hist is not None else (ax,):
            axis.axvspan(start, stop, color=GROUP_SHADES[group], zorder=0, linewidth=0)
            if i:
                axis.axvline(start, color="0.45", linestyle="--", linewidth=0.8, zorder=1)
        ax.text(math.sqrt(start * stop), 0.995, label, transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize="small", color="0.25")
    spread = np.log(high / low)
    for m, (method, values) in enumerate(accuracies.items()):
        marker, colour = MARKERS[m % len(MARKERS)], f"C{m % 10}"
        mean = np.nanmean(values) if np.isfinite(values).any() else math.nan
        legend = f"{method} (mean {mean:.1f}%)"
        if named:
            # spread the methods sideways a little so equal accuracies do not hide each other's markers
            offset = np.exp(spread * 0.006 * (m - (len(accuracies) - 1) / 2))
            order = np.argsort(counts, kind="stable")
            ax.plot(counts[order] * offset, values[order], marker=marker, color=colour, linewidth=0.8, alpha=0.9,
                    markersize=6, markeredgecolor="white", markeredgewidth=0.5, label=legend, zorder=3)
        else:
            edges = np.geomspace(counts.min(), counts.max() * (1 + 1e-9), COUNT_BINS + 1)
            means, classes = binned_mean(counts, values, edges)
            centres = np.sqrt(edges[:-1] * edges[1:])
            ax.plot(centres[classes > 0], means[classes > 0], marker=marker, color=colour, linewidth=1.2, markersize=6,
                    markeredgecolor="white", markeredgewidth=0.5, label=legend, zorder=3)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_ylim(-3, 112)  # room above 100 % for the group labels
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", color="0.88", linewidth=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="method (mean-class acc.)",
              title_fontsize="small", frameon=False)
    if named:
        ax.set_xlabel(f"{count_label} (log scale)")
        top = ax.secondary_xaxis("top")
        ticks, labels = _merged_names(counts, names)
        top.set_xticks(ticks, labels, rotation=60, ha="left", fontsize="small", rotation_mode="anchor")
        top.minorticks_off()
        fig.suptitle(f"Per-class accuracy vs {count_label} ({k} classes)", y=0.985)
    else:
        edges = np.geomspace(counts.min(), counts.max() * (1 + 1e-9), COUNT_BINS + 1)
        _, classes = binned_mean(counts, np.zeros(k), edges)
        hist.bar(edges[:-1], classes, width=np.diff(edges), align="edge", color="0.55", edgecolor="white", zorder=2)
        hist.set_ylabel("classes")
        hist.set_xlabel(f"{count_label} (log scale; {COUNT_BINS} bins, accuracy = mean over the bin's classes)")
        ax.set_title(f"Per-class accuracy vs {count_label} ({k} classes, binned)")
    return fig


def _merged_names(counts: np.ndarray, names: list[str]) -> tuple[list[float], list[str]]:
    """One top-axis tick per distinct count, naming every class with that count."""
    by_count: dict[float, list[str]] = {}
    for count, name in sorted(zip(counts.tolist(), names, strict=True)):
        by_count.setdefault(count, []).append(str(name))
    return list(by_count), [", ".join(v) if len(v) <= 3 else f"{', '.join(v[:2])} +{len(v) - 2}" for v in by_count.values()]


def _family_key(point: dict) -> tuple:
    """The family of heads a curve point belongs to: (has α, validation share λ); ρ varies within it."""
    return (point.get("magnitude"), point.get("val_weight"))


def _series_label(key: tuple, many: bool) -> str:
    magnitude, val_weight = key
    parts = [] if magnitude is None or not many else ["with α" if magnitude else "no α"]
    if val_weight and many:
        parts.append(f"λ = {val_weight:g}")
    return f" ({', '.join(parts)})" if parts else ""


def rho_figure(rho_curve: list[dict], chosen_rho: float | None = None, *, chosen: dict | None = None,
               selection: str | None = None) -> Figure | None:
    """Validation mean-class accuracy and NLL against ρ (twin axes); None when the curve has no validation score.

    A fit that tried several head families (with and without the magnitude term α, several validation
    shares λ) has one curve point per (family, ρ): each family is its own pair of lines. ``chosen``: the
    point the fit kept (its report's ``validation``), starred; else ``chosen_rho`` on the first family;
    else the best mean-class accuracy, then lower NLL. ``selection``: what chose it ("nll" or "accuracy").
    """
    points = [p for p in rho_curve if p.get("val_mean_class_accuracy") is not None]
    if not points:
        return None
    families: dict[tuple, list[dict]] = {}
    for point in points:
        families.setdefault(_family_key(point), []).append(point)
    many = len(families) > 1
    fig = Figure(figsize=(7, 4.6))
    fig.subplots_adjust(left=0.1, right=0.88, top=0.9, bottom=0.24)
    ax = fig.subplots()
    ax.set_xlabel("ρ (GRW exponent)")
    ax.set_ylabel("val mean-class accuracy (%)", color="C0")
    ax.tick_params(axis="y", colors="C0")
    has_nll = any(p.get("val_nll") is not None for p in points)
    right = ax.twinx() if has_nll else None
    nll_role = {"nll": " (selects)", "accuracy": " (tie-breaker)"}.get(selection or "accuracy", "")
    handles = []
    for index, (key, family) in enumerate(families.items()):
        family = sorted(family, key=lambda p: p["rho"])
        rho = [p["rho"] for p in family]
        suffix = _series_label(key, many)
        handles += ax.plot(rho, [100 * p["val_mean_class_accuracy"] for p in family], marker="o", color=("C0", "C9", "C4", "C8")[index % 4],
                           linestyle="-" if index == 0 else "-.", label=f"val mean-class accuracy{suffix}")
        if right is not None:
            nll = [math.nan if p.get("val_nll") is None else p["val_nll"] for p in family]
            handles += right.plot(rho, nll, marker="s", linestyle="--" if index == 0 else ":", color=("C3", "C1", "C5", "C6")[index % 4],
                                  markersize=4, label=f"val NLL{nll_role}{suffix}")
    if right is not None:
        right.set_ylabel("val NLL", color="C3")
        right.tick_params(axis="y", colors="C3")
    best = _chosen_point(points, families, chosen, chosen_rho)
    best_nll = best.get("val_nll")
    ax.axvline(best["rho"], color="0.3", linestyle=":", linewidth=1)
    star = ax.plot([best["rho"]], [100 * best["val_mean_class_accuracy"]], marker="*", markersize=16, color="gold",
                   markeredgecolor="0.2", linestyle="none", zorder=5)[0]
    star.set_label(f"chosen ρ = {best['rho']:g}{_series_label(_family_key(best), many)}: {100 * best['val_mean_class_accuracy']:.1f}%"
                   + ("" if best_nll is None else f", NLL {best_nll:.3f}"))
    fig.legend(handles=[*handles, star], fontsize="small", loc="lower center", ncols=2, frameon=False)
    ax.grid(color="0.9", linewidth=0.6)
    ax.set_title("DisAlign: validation mean-class accuracy and NLL vs ρ")
    return fig


def _chosen_point(points: list[dict], families: dict[tuple, list[dict]], chosen: dict | None, chosen_rho: float | None) -> dict:
    if chosen is not None and chosen.get("val_mean_class_accuracy") is not None and "rho" in chosen:
        return chosen
    first = next(iter(families.values()))
    if chosen_rho is not None:
        near = [p for p in first if math.isclose(p["rho"], chosen_rho, abs_tol=1e-9)]
        if near:
            return near[0]
    return max(points, key=lambda p: (p["val_mean_class_accuracy"], -(p.get("val_nll") or 0.0)))


def reliability_figure(reliability: dict[str, dict]) -> Figure:
    """One reliability diagram per method (three per row), each over a histogram of the rows per bin."""
    names = list(reliability)
    cols = max(1, min(3, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    width, height = 3.4 * cols, 3.9 * rows + 0.4
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.2 / width, bottom=0.45 / height, top=1 - (0.6 if cols > 1 else 0.8) / height, wspace=0.35, hspace=0.3)
    outer = fig.add_gridspec(rows, cols)
    for index, name in enumerate(names):
        inner = outer[divmod(index, cols)].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
        ax = fig.add_subplot(inner[0])
        hist = fig.add_subplot(inner[1], sharex=ax)
        bins = reliability[name]
        accuracy, confidence = _as_float(bins["accuracy"]), _as_float(bins["confidence"])
        count = np.asarray(bins.get("count") or [0] * accuracy.size, dtype=np.float64)
        num_bins = accuracy.size
        centres = (np.arange(num_bins) + 0.5) / num_bins
        filled = ~np.isnan(accuracy)
        few = filled & (count < FEW_SAMPLES)
        many = filled & ~few
        ax.bar(centres[many], accuracy[many], width=1.0 / num_bins, color="tab:blue", edgecolor="white")
        ax.bar(centres[few], accuracy[few], width=1.0 / num_bins, color="#a9c8e8", edgecolor="tab:blue", hatch="///",
               linewidth=0.5)
        ax.plot(centres[filled], confidence[filled], "o", color="tab:red", markersize=3)
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ece = bins.get("ece")
        ax.set_title(name if ece is None else f"{name} (ECE {100 * ece:.1f}%)", fontsize="medium")
        ax.set_ylabel("accuracy")
        ax.tick_params(labelbottom=False)
        hist.bar(centres[count > 0], count[count > 0], width=1.0 / num_bins, color="0.5", edgecolor="white")
        hist.set_yscale("log")
        hist.set_ylim(0.5, max(2.0, count.max()) * 3)
        hist.set_xlabel("confidence")
        hist.set_ylabel("rows")
    fig.legend(handles=[Patch(color="tab:blue", label="accuracy of the bin"),
                        Patch(facecolor="#a9c8e8", edgecolor="tab:blue", hatch="///", label=f"… fewer than {FEW_SAMPLES} rows"),
                        Line2D([], [], marker="o", linestyle="none", color="tab:red", markersize=3, label="mean confidence"),
                        Line2D([], [], linestyle="--", color="0.3", linewidth=1, label="perfect calibration")],
               loc="upper center", ncols=4 if cols > 1 else 2, fontsize="small", frameon=False)
    return fig


def render_plots(report: dict, *, rho_curve: list[dict] | None, chosen_rho: float | None = None,
                 fit_report: dict | None = None) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by file name (nothing is written). ``fit_report``: the
    DisAlign calibration's report, whose ``validation`` and ``selection`` say which head it kept and why."""
    figures = {"per_class_accuracy.png": render_png(per_class_figure(report))}
    fit_report = fit_report or {}
    rho = rho_figure(rho_curve, chosen_rho, chosen=fit_report.get("validation"), selection=fit_report.get("selection")) if rho_curve else None
    if rho is not None:
        figures["rho_curve.png"] = render_png(rho)
    if report.get("reliability"):
        figures["reliability.png"] = render_png(reliability_figure(report["reliability"]))
    return figures


def write_pngs(directory: str | os.PathLike, figures: dict[str, bytes]) -> list[Path]:
    """Write rendered figures into ``directory`` (created if missing), each through a temporary name and a rename."""
    written = []
    for name, data in figures.items():
        write_atomic(Path(directory) / name, data)
        written.append(Path(directory) / name)
    return written


def write_plots(directory: str | os.PathLike, report: dict, *, rho_curve: list[dict] | None,
                chosen_rho: float | None = None, fit_report: dict | None = None) -> list[Path]:
    """Draw the report's figures, then write them into ``directory``; returns the PNG paths written."""
    return write_pngs(directory, render_plots(report, rho_curve=rho_curve, chosen_rho=chosen_rho, fit_report=fit_report))
