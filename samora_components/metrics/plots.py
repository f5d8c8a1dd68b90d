"""Figures for evaluation: per-class Dice/HD95 bars and image overlays with truth/prediction contours.

Everything draws with matplotlib's Agg backend (no display needed) and writes PNG files atomically
(:func:`samora_components.utils.atomic_path`), so a reader never sees half a file.

Slices are 2-D arrays (X, Y) cut from (X, Y, Z) RAS volumes; they are drawn in the radiological
convention: X (towards the patient's right in RAS arrays) increases to the viewer's left, Y
(anterior) upwards. Each class keeps one colour (by its position in the class list); truth contours are solid
and prediction contours dashed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from samora_components.utils import atomic_path  # noqa: E402

__all__ = ["bar_chart", "overlay", "overlay_grid", "choose_slices", "spread_slices", "label_montage", "save_figure", "line_plot"]

_UNITS = {"transunet": "voxels", "spacing": "mm"}
_ANNOTATE_MAX = 30  # bars labelled with their value up to this many classes


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` as PNG to ``path`` atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# bar chart


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value)


def _bars(ax, names: list[str], values: list[float], mean: float, colour: str, ylabel: str, fmt: str) -> None:
    """One bar panel with value labels and a dashed mean line."""
    x = np.arange(len(names))
    heights = [v if _finite(v) else 0.0 for v in values]
    ax.bar(x, heights, color=colour, edgecolor="black", linewidth=0.5)
    for xi, value in zip(x, values if len(values) <= _ANNOTATE_MAX else []):
        text = format(value, fmt) if _finite(value) else "n/a"
        ax.annotate(
            text, (xi, heights[xi]), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points"
        )
    if _finite(mean):
        ax.axhline(mean, color="black", linestyle="--", linewidth=1)
    ax.set_title(f"{ylabel}: mean {format(mean, fmt) if _finite(mean) else 'n/a'} (dashed line)", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_xticks(x)
    rotation = 45 if len(names) > 6 else 0
    ax.set_xticklabels(names, rotation=rotation, ha="right" if rotation else "center", fontsize=8 if len(names) <= 40 else 6)
    ax.grid(axis="y", alpha=0.3)


def bar_chart(summary: dict, path: str | os.PathLike) -> None:
    """Per-class Dice (0..1, top panel) and HD95 (bottom panel) bars with mean lines, from a
    :func:`samora_components.metrics.cases.summarise` dict; written as PNG to ``path``."""
    names = list(summary["classes"])
    dice = [float(summary["classes"][n]["dice"]) for n in names]
    distance = [float(summary["classes"][n]["hd95"]) for n in names]
    protocol = summary.get("protocol", "")
    unit = _UNITS.get(protocol, "")
    width = min(max(6.0, 0.55 * len(names) + 2.0), 24.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
    _bars(top, names, dice, float(summary["mean"]["dice"]), "tab:blue", "Dice", ".3f")
    top.set_ylim(0, 1.12)
    hd_label = f"HD95 ({unit})" if unit else "HD95"
    _bars(bottom, names, distance, float(summary["mean"]["hd95"]), "tab:orange", hd_label, ".2f")
    finite = [d for d in distance if _finite(d)]
    bottom.set_ylim(0, (max(finite) * 1.15) if finite and max(finite) > 0 else 1.0)
    cases = summary.get("cases", 0)
    fig.suptitle(f"{protocol} protocol, {cases} case{'s' if cases != 1 else ''}")
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# overlays


def _colour(index: int) -> tuple:
    """Distinct colour for the class at ``index`` in the class list (cycles through tab10/tab20)."""
    palette = plt.get_cmap("tab10" if index < 10 else "tab20")
    return palette(index % palette.N)


def _class_list(class_names: Mapping[int, str] | None, *maps: np.ndarray | None) -> dict[int, str]:
    """Class id -> name: the given mapping, or ``class_<id>`` for every id > 0 found in ``maps``."""
    if class_names:
        return {int(k): str(v) for k, v in sorted(class_names.items())}
    found: set[int] = set()
    for array in maps:
        if array is not None:
            found.update(int(v) for v in np.unique(array) if v > 0)
    return {c: f"class_{c}" for c in sorted(found)}


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Intensity window for display: 1st..99th percentile (or min..max when flat)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return float(low), float(high) if high > low else float(low) + 1.0


def _contours(ax, labels: np.ndarray, classes: dict[int, str], linestyle: str) -> set[int]:
    """Draw the outline of every class present in ``labels`` (X, Y); return the ids drawn."""
    drawn = set()
    for index, class_id in enumerate(classes):
        mask = labels == class_id
        if not mask.any():
            continue
        padded = np.pad(mask.T.astype(np.float32), 1)  # closed outlines at the slice border
        ys, xs = np.arange(-1, mask.shape[1] + 1), np.arange(-1, mask.shape[0] + 1)
        ax.contour(xs, ys, padded, levels=[0.5], colors=[_colour(index)], linewidths=1.2, linestyles=linestyle)
        drawn.add(class_id)
    return drawn


def _draw_slice(ax, image2d: np.ndarray, label2d: np.ndarray | None, pred2d: np.ndarray | None,
                classes: dict[int, str], title: str) -> set[int]:
    """Grayscale slice (X, Y) with truth (solid) and prediction (dashed) outlines on ``ax``."""
    image = np.asarray(image2d, dtype=np.float32)
    low, high = _display_range(image)
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=low, vmax=high, interpolation="nearest")
    ax.invert_xaxis()  # radiological view of RAS arrays: patient's right on the viewer's left
    drawn: set[int] = set()
    if label2d is not None:
        drawn |= _contours(ax, np.asarray(label2d), classes, "solid")
    if pred2d is not None:
        drawn |= _contours(ax, np.asarray(pred2d), classes, "dashed")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return drawn


def _legend(fig: Figure, classes: dict[int, str], drawn: set[int], has_truth: bool, has_pred: bool) -> None:
    """Figure legend: class colours for the classes drawn, then line styles for truth/prediction."""
    handles = [Line2D([], [], color=_colour(i), linewidth=2, label=name)
               for i, (c, name) in enumerate(classes.items()) if c in drawn]
    if has_truth:
        handles.append(Line2D([], [], color="gray", linestyle="solid", label="truth"))
    if has_pred:
        handles.append(Line2D([], [], color="gray", linestyle="dashed", label="prediction"))
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def overlay_grid(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    preds: Sequence[np.ndarray | None],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> None:
    """Several slices side by side, each a grayscale image (X, Y) with truth and prediction outlines.

    ``labels``/``preds`` entries may be None (no truth, e.g. inference only). Written as PNG to ``path``.
    """
    if not images:
        raise ValueError("overlay_grid needs at least one slice")
    classes = _class_list(class_names, *labels, *preds)
    count = len(images)
    titles = list(titles) if titles else [""] * count
    fig, axes = plt.subplots(1, count, figsize=(3.6 * count, 3.9), squeeze=False)
    drawn: set[int] = set()
    for ax, image, label, pred, sub in zip(axes[0], images, labels, preds, titles):
        drawn |= _draw_slice(ax, image, label, pred, classes, sub)
    has_truth = any(x is not None for x in labels)
    has_pred = any(x is not None for x in preds)
    _legend(fig, classes, drawn, has_truth, has_pred)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def overlay(
    image2d: np.ndarray,
    label2d: np.ndarray | None,
    pred2d: np.ndarray | None,
    path: str | os.PathLike,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> None:
    """One grayscale slice (X, Y) with truth (solid) and prediction (dashed) class outlines and a
    legend; ``label2d`` may be None. Written as PNG to ``path``."""
    overlay_grid([image2d], [label2d], [pred2d], path, titles=[title], class_names=class_names)


def choose_slices(volume: np.ndarray, n: int = 3) -> list[int]:
    """The ``n`` axial indices z of a label volume (X, Y, Z) with the most foreground voxels (> 0).

    Ties (and slices without foreground, when fewer than ``n`` have some) go to the slice nearer the
    middle. Returns distinct indices in increasing order (fewer when the volume has fewer slices).
    """
    array = np.asarray(volume)
    if array.ndim < 3:
        array = array.reshape(array.shape + (1,) * (3 - array.ndim))
    counts = np.count_nonzero(array > 0, axis=tuple(i for i in range(array.ndim) if i != 2))
    depth = counts.shape[0]
    middle = (depth - 1) / 2.0
    order = sorted(range(depth), key=lambda z: (-int(counts[z]), abs(z - middle), z))
    return sorted(order[: max(0, int(n))])


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | os.PathLike, xlabel: str = "",
              ylabel: str = "", title: str = "") -> None:
    """One or more curves over ``x`` (e.g. a loss per epoch), written as PNG to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        ax.plot(list(x)[: len(values)], list(values), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def spread_slices(labels: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` distinct indices along ``axis`` of a label volume, spread evenly over the labelled extent
    (at 1/(n+1), 2/(n+1), ... of the indices holding foreground), so that a montage shows different
    levels of the anatomy; the middle of the volume when nothing is labelled."""
    array = np.asarray(labels)
    counts = np.count_nonzero(array > 0, axis=tuple(i for i in range(array.ndim) if i != axis))
    labelled = np.flatnonzero(counts)
    if n <= 0:
        return []
    if labelled.size == 0:
        return [array.shape[axis] // 2]
    picks = [int(labelled[round((i + 1) * (labelled.size - 1) / (n + 1))]) for i in range(n)]
    return sorted(set(picks))


def _filled(labels2d: np.ndarray, classes: dict[int, str], alpha: float) -> tuple[set[int], np.ndarray]:
    """An RGBA layer (H, W, 4) painting each class of ``labels2d`` (H, W) in its colour, and the ids painted."""
    rgba = np.zeros(labels2d.shape + (4,), np.float32)
    drawn = set()
    for index, class_id in enumerate(classes):
        mask = labels2d == class_id
        if class_id > 0 and mask.any():  # background stays unpainted
            rgba[mask] = (*_colour(index)[:3], alpha)
            drawn.add(class_id)
    return drawn, rgba


def label_montage(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    path: str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    window: tuple[float, float] | None = None,
    axial: int = 3,
    coronal: int = 2,
    title: str = "",
    alpha: float = 0.45,
) -> list[tuple[str, int]]:
    """A montage to check a segmentation at a glance: ``axial`` axial and ``coronal`` coronal slices of
    a RAS volume ``image`` (X, Y, Z) with the label map ``labels`` (X, Y, Z) painted over it.

    Slices are spread over the labelled extent (:func:`spread_slices`);
    coronal slices keep the true voxel aspect (``spacing``: mm along X, Y, Z). ``window``: the grey
    range (e.g. a CT soft-tissue window in HU); default the 1st-99th percentile. Returns the slices
    drawn as ``("axial" | "coronal", index)``; the PNG goes to ``path`` (written atomically).
    """
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or image.shape != labels.shape:
        raise ValueError(f"label_montage needs an image and labels of one 3-D shape, got {image.shape} and {labels.shape}")
    classes = _class_list(class_names, labels)  # colours by position in this list, as in the legend
    low, high = window if window is not None else _display_range(image)
    sx, sy, sz = (float(v) for v in spacing)
    views = [("axial", z) for z in spread_slices(labels, 2, axial)]
    views += [("coronal", y) for y in spread_slices(labels, 1, coronal)]
    fig, axes = plt.subplots(1, len(views), figsize=(3.4 * len(views), 3.8), squeeze=False)
    drawn: set[int] = set()
    for ax, (view, k) in zip(axes[0], views):
        if view == "axial":  # rows: anterior up; columns: patient's right on the viewer's left
            grey, lab, aspect = image[:, :, k].T, labels[:, :, k].T, sy / sx
        else:  # rows: superior up
            grey, lab, aspect = image[:, k, :].T, labels[:, k, :].T, sz / sx
        ax.imshow(grey, cmap="gray", origin="lower", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
        shown, rgba = _filled(lab, classes, alpha)
        ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
        drawn |= shown
        ax.invert_xaxis()
        ax.set_title(f"{view} {k}", fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([], [], color=_colour(i), linewidth=6, label=name)
               for i, (c, name) in enumerate(classes.items()) if c in drawn]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    else:
        fig.text(0.5, 0.02, "no label in this volume", ha="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return views
