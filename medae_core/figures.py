"""Figures for reports: anomaly overlays, ROC/PR curves, line plots, image grids.

Uses matplotlib's object API only (``Figure`` + ``FigureCanvasAgg``); pyplot is
never imported, so no global figure state or backend is touched and the module
is safe in servers, threads and test runs. Functions return PNG bytes (to embed
in an HTML report with `to_data_uri`) except `save_overlay`, which writes a file.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 100
MAP_CMAP = "inferno"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _finish(fig: Figure, ax, title: str | None) -> bytes:
    """Title, legend (when anything is labelled) and a light grid; the PNG."""
    if title:
        ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def to_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src=...>`` in an HTML report."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _crosses(a: np.ndarray, level: float) -> bool:
    return bool(np.nanmin(a) < level < np.nanmax(a)) if a.size else False


def save_overlay(
    path: str | Path,
    image: Any,
    amap: Any,
    threshold: float | None = None,
    title: str | None = None,
    gt_mask: Any = None,
) -> Path:
    """Write a PNG (3.6 x 3.2 in, 100 dpi): grayscale image, anomaly-map heatmap
    on top (semi-transparent, zero pixels left clear) with a colorbar, the
    ``threshold`` contour in cyan and the ground-truth contour in lime.

    The parent folder is created if needed. Returns the path written.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32).squeeze())
    am = np.nan_to_num(np.asarray(amap, dtype=np.float32).squeeze())
    if img.ndim != 2 or am.shape != img.shape:
        raise ValueError(f"image {img.shape} and map {am.shape} must be the same 2-D shape")
    fig = _new_figure(3.6, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img, cmap="gray", interpolation="nearest")
    vmax = float(am.max()) if am.max() > 0 else 1.0
    heat = ax.imshow(
        np.ma.masked_less_equal(am, 0.0), cmap=MAP_CMAP, alpha=0.55, vmin=0.0, vmax=vmax, interpolation="nearest"
    )
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    handles = []
    if threshold is not None and _crosses(am, float(threshold)):
        ax.contour(am, levels=[float(threshold)], colors="cyan", linewidths=0.8)
        handles.append(("cyan", f"map >= {threshold:.3g}"))
    if gt_mask is not None:
        gt = np.asarray(gt_mask, dtype=np.float32).squeeze()
        if gt.shape == img.shape and _crosses(gt, 0.5):
            ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
            handles.append(("lime", "ground truth"))
    if handles:
        from matplotlib.lines import Line2D

        ax.legend(
            [Line2D([0], [0], color=c, lw=1) for c, _ in handles],
            [t for _, t in handles],
            loc="lower left", fontsize=6, framealpha=0.6,
        )
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(fig))
    return path


def roc_pr_figure(curves: Mapping[str, tuple[Any, Any]], title: str | None = None) -> bytes:
    """ROC (left) and precision-recall (right) curves, one line per name, with the
    AUROC / AUPRC in the legend. ``curves[name] = (scores, labels)``. A curve
    with only one class present is listed as "undefined" and not drawn."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    fig = _new_figure(8.0, 3.6)
    ax_roc, ax_pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_roc.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
    for name, (scores, labels) in curves.items():
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        y = np.asarray(labels).reshape(-1)
        ok = np.isfinite(s) & ((y == 0) | (y == 1))
        s, y = s[ok], y[ok].astype(int)
        if y.size == 0 or y.min() == y.max():
            ax_roc.plot([], [], label=f"{name} (undefined: one class)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        prec, rec, _ = precision_recall_curve(y, s)
        line = ax_roc.plot(fpr, tpr, lw=1.2, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")[0]
        ax_pr.step(rec, prec, where="post", lw=1.2, color=line.get_color(),
                   label=f"{name} (AUPRC {average_precision_score(y, s):.3f})")
    ax_roc.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02), title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall")
    for ax in (ax_roc, ax_pr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


MARKERS = "osD^vP*X"


def line_figure(
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logy: bool = False,
    integer_x: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> bytes:
    """Line plot (e.g. loss per round, AUROC vs epsilon): one line per name of (x, y) points.

    Each series has its own marker and a small x offset, so that series with
    equal values (three sites spending the same ε) stay visible. ``integer_x``:
    ticks on whole numbers only (rounds). ``hlines``: labelled horizontal
    reference lines (a budget, chance, a baseline).
    """
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(5.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    drawn = [(name, pts) for name, pts in series.items() if any(y is not None for _, y in pts)]
    spread = 0.08 if integer_x and len(drawn) > 1 else 0.0
    for k, (name, pts) in enumerate(drawn):
        pts = [(float(x), float(y)) for x, y in pts if y is not None]
        xs, ys = zip(*pts)
        shift = spread * (k - (len(drawn) - 1) / 2)
        ax.plot([x + shift for x in xs], ys, marker=MARKERS[k % len(MARKERS)], ms=4, lw=1.2, label=str(name))
    for k, (name, level) in enumerate((hlines or {}).items()):
        ax.axhline(level, ls="--", lw=1.0, color=("0.3", "tab:red", "0.6")[k % 3], label=str(name))
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("log")
    return _finish(fig, ax, title)


def score_histogram_figure(
    edges: Sequence[float], healthy: Sequence[int], anomalous: Sequence[int], threshold: float | None = None,
    title: str | None = None,
) -> bytes:
    """Counts of healthy and anomalous image scores over the shared score bins (log x axis), with the threshold."""
    edges = np.array(edges, dtype=np.float64)
    edges[0] = edges[1] / 10 if not np.isfinite(edges[0]) else edges[0]  # open-ended outer bins
    edges[-1] = edges[-2] * 10 if not np.isfinite(edges[-1]) else edges[-1]
    healthy, anomalous = np.asarray(healthy, np.float64), np.asarray(anomalous, np.float64)
    used = np.flatnonzero((healthy + anomalous) > 0)
    fig = _new_figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    if used.size:
        lo, hi = max(used[0] - 2, 0), min(used[-1] + 3, len(healthy))
        centers = np.sqrt(np.clip(edges[lo:hi], 1e-12, None) * np.clip(edges[lo + 1:hi + 1], 1e-12, None))
        widths = edges[lo + 1:hi + 1] - edges[lo:hi]
        ax.bar(centers, healthy[lo:hi], width=widths, alpha=0.6, label=f"healthy ({int(healthy.sum())})",
               color="tab:blue")
        ax.bar(centers, anomalous[lo:hi], width=widths, alpha=0.6, label=f"anomalous ({int(anomalous.sum())})",
               color="tab:red")
        ax.set_xscale("log")
    if threshold is not None:
        ax.axvline(threshold, color="0.2", ls="--", lw=1.0, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image score", ylabel="test images")
    return _finish(fig, ax, title)


def image_grid(
    rows: Sequence[tuple[Any, ...]],
    titles: Sequence[str] | None = None,
    cell_inches: float = 1.4,
) -> bytes:
    """Grid of 2-D images: one row per ``(label, [arrays...])`` or
    ``(label, [arrays...], cmap)``; ``titles`` label the columns.

    Intensity ranges: all rows without a cmap (grayscale: inputs,
    reconstructions, samples) share one range, the min..max over all of them,
    so an input and its reconstruction compare directly; a row with its own
    cmap (an anomaly-map row, say) is scaled to its own min..max.
    Rows may have different lengths; missing cells stay empty.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("image_grid needs at least one row")
    ncols = max(1, max(len(r[1]) for r in rows))
    data = [[np.nan_to_num(np.asarray(a, dtype=np.float32).squeeze()) for a in r[1]] for r in rows]
    cmaps = [r[2] if len(r) > 2 and r[2] else None for r in rows]

    def _range(arrays: list[np.ndarray]) -> tuple[float, float]:
        lo = min((float(a.min()) for a in arrays if a.size), default=0.0)
        hi = max((float(a.max()) for a in arrays if a.size), default=1.0)
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    gray_range = _range([a for arrs, c in zip(data, cmaps) if c is None for a in arrs])
    fig = _new_figure(cell_inches * ncols + 0.6, cell_inches * len(rows))
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, row in enumerate(rows):
        label, arrays = row[0], data[i]
        cmap = colormaps["gray"] if cmaps[i] is None else colormaps[cmaps[i]]
        lo, hi = gray_range if cmaps[i] is None else _range(arrays)
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(arrays):
                ax.imshow(arrays[j], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            if j == 0:
                ax.set_ylabel(str(label), fontsize=8)
            if i == 0 and titles is not None and j < len(titles):
                ax.set_title(str(titles[j]), fontsize=8)
    return _png(fig)
