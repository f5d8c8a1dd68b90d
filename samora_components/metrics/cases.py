"""Per-case Dice and HD95 for label maps, under two evaluation protocols.

The two binary metrics, :func:`dc` and :func:`hd95`, return the same numbers as
``medpy.metric.binary.dc`` and ``medpy.metric.binary.hd95`` (connectivity 1):

* surface of a mask = mask XOR its erosion by the cross-shaped structuring element
  (``generate_binary_structure(ndim, 1)``, one iteration, voxels outside the array count as 0);
* directed surface distances = the Euclidean distance transform of the complement of the other
  mask's surface (``sampling=spacing``), read at this mask's surface voxels;
* HD95 = 95th percentile (linear interpolation) of both directed distance sets together.

They are faster on large volumes because both masks are first cropped to their joint bounding box,
padded by one voxel of zeros. Nothing outside that box belongs to either mask, so the erosion sees
the same neighbourhoods (a mask touching the array border meets zeros in the padding, as in the
erosion's default ``border_value=0``) and every surface voxel lies inside the box, so the distance
transform gives the same nearest-surface distances.

Protocols (:func:`case_metrics`):

``transunet``
    TransUNet / SAMed / H-SAM ``calculate_metric_percase``: HD95 in voxels (spacing ignored);
    prediction and truth present -> (dice, hd95); prediction only -> (1, 0); no prediction -> (0, 0).
``spacing``
    HD95 in mm with the volume's voxel spacing; both empty -> (nan, nan); exactly one empty ->
    (0, nan); both present -> (dice, hd95).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, find_objects, generate_binary_structure

__all__ = [
    "PROTOCOLS",
    "dc",
    "hd95",
    "surface_distances",
    "case_metrics",
    "as_label_map",
    "empty_result",
    "summarise",
    "check_protocol",
]

PROTOCOLS = ("transunet", "spacing")

Box = tuple[slice, ...]


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` if it is one of :data:`PROTOCOLS`, else raise ``ValueError``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of: {', '.join(PROTOCOLS)}")
    return protocol


# --------------------------------------------------------------------------------------------------
# binary metrics


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Any array -> boolean array of rank >= 1 (non-zero is foreground)."""
    return np.atleast_1d(np.asarray(mask).astype(bool, copy=False))


def dc(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two masks of the same shape (any rank).

    Two empty masks give 1.0, as in medpy.
    """
    a, b = _as_bool(pred), _as_bool(gt)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(a & b) / float(total)


def _normalise_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray | None:
    """None, a number or one value per axis -> None or a float64 array of length ``ndim``."""
    if spacing is None:
        return None
    values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.shape != (ndim,):
        raise ValueError(f"spacing {tuple(values.tolist())} does not match an array of rank {ndim}")
    return np.ascontiguousarray(values)


def _joint_box(a: np.ndarray, b: np.ndarray) -> Box:
    """Bounding box (one slice per axis) of the voxels set in ``a`` or ``b``; both must not be empty."""
    either = a | b
    return find_objects(either.view(np.uint8))[0]


def _padded_crop(mask: np.ndarray, box: Box) -> np.ndarray:
    """``mask[box]`` surrounded by one voxel of False on every side: shape = box shape + 2."""
    shape = tuple(s.stop - s.start + 2 for s in box)
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(1, n - 1) for n in shape)] = mask[box]
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one face-neighbour outside the mask (mask XOR erosion)."""
    structure = generate_binary_structure(mask.ndim, 1)
    return mask ^ binary_erosion(mask, structure=structure, iterations=1)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, sampling: np.ndarray | None) -> np.ndarray:
    """Distance from each voxel of ``from_surface`` to the nearest voxel of ``to_surface`` (1-D array)."""
    distance = distance_transform_edt(~to_surface, sampling=sampling)
    return distance[from_surface]


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred -> gt, gt -> pred) of two non-empty masks of the same shape.

    Raises:
        RuntimeError: when either mask is empty (as medpy does).
    """
    a, b = _as_bool(pred), _as_bool(gt)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} and {b.shape}")
    if not a.any():
        raise RuntimeError("the prediction mask contains no foreground voxel")
    if not b.any():
        raise RuntimeError("the reference mask contains no foreground voxel")
    sampling = _normalise_spacing(spacing, a.ndim)
    box = _joint_box(a, b)
    surface_a = _surface(_padded_crop(a, box))
    surface_b = _surface(_padded_crop(b, box))
    return _directed_distances(surface_a, surface_b, sampling), _directed_distances(surface_b, surface_a, sampling)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] | None = None) -> float:
    """95th percentile of the symmetric surface distance of two non-empty masks (any rank).

    ``spacing``: None (1 per axis), a number, or one value per axis; the result is in its unit.
    """
    forward, backward = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate((forward, backward)), 95))


# --------------------------------------------------------------------------------------------------
# per-case metrics of label maps


def as_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    """Label array -> integer array (rank >= 1); float maps must hold whole numbers (``name`` prefixes errors)."""
    array = np.atleast_1d(np.asarray(labels))
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: label voxels of type {array.dtype} are not numbers")
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise ValueError(f"{name}: label map holds non-integer values (is it an image or probabilities?)")
    return rounded.astype(np.int64)


def _union_box(first: Box | None, second: Box | None) -> Box | None:
    """Smallest box holding both boxes (either may be None)."""
    if first is None or second is None:
        return first if second is None else second
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(first, second))


def empty_result(protocol: str) -> tuple[float, float]:
    """(dice, hd95) of a class absent from both prediction and truth under ``protocol``."""
    return (0.0, 0.0) if check_protocol(protocol) == "transunet" else (math.nan, math.nan)


def _transunet_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """TransUNet ``calculate_metric_percase`` on two masks (HD95 in voxels)."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if has_pred and has_gt:
        return dc(pred, gt), hd95(pred, gt)
    if has_pred:
        return 1.0, 0.0
    return 0.0, 0.0


def _spacing_pair(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Spacing-aware protocol on two masks (HD95 in the unit of ``spacing``)."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if has_pred and has_gt:
        return dc(pred, gt), hd95(pred, gt, spacing)
    if has_pred or has_gt:
        return 0.0, math.nan
    return math.nan, math.nan


def case_metrics(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    class_ids: Iterable[int],
    protocol: str = "transunet",
    spacing: float | Sequence[float] | None = None,
) -> dict[int, tuple[float, float]]:
    """(dice, hd95) per class id for a predicted and a true label map of the same shape (any rank).

    Args:
        pred_labels, gt_labels: integer label maps (X, Y, Z) or any rank; 0 is background.
        class_ids: ids >= 1 to score.
        protocol: ``"transunet"`` (HD95 in voxels, ``spacing`` ignored) or ``"spacing"`` (HD95 in mm).
        spacing: voxel size per axis (or one number); required by the ``spacing`` protocol.

    Each class is scored inside the bounding box of its voxels in either map, found for all classes in
    one pass, so scoring many classes costs little more than reading the maps.
    """
    check_protocol(protocol)
    ids = [int(c) for c in class_ids]
    if any(c < 1 for c in ids):
        raise ValueError(f"class ids must be >= 1 (0 is background), got {ids}")
    pred_map, gt_map = as_label_map(pred_labels, "prediction"), as_label_map(gt_labels, "label")
    if pred_map.shape != gt_map.shape:
        raise ValueError(f"prediction shape {pred_map.shape} differs from label shape {gt_map.shape}")
    if protocol == "spacing":
        if spacing is None:
            raise ValueError("the spacing protocol needs the voxel spacing")
        spacing = tuple(_normalise_spacing(spacing, gt_map.ndim).tolist())
    top = max(ids, default=0)
    pred_boxes = find_objects(pred_map, max_label=top) if top else []
    gt_boxes = find_objects(gt_map, max_label=top) if top else []
    results: dict[int, tuple[float, float]] = {}
    for c in ids:
        box = _union_box(pred_boxes[c - 1], gt_boxes[c - 1])
        if box is None:
            results[c] = empty_result(protocol)
            continue
        pred_mask, gt_mask = pred_map[box] == c, gt_map[box] == c
        if protocol == "transunet":
            results[c] = _transunet_pair(pred_mask, gt_mask)
        else:
            results[c] = _spacing_pair(pred_mask, gt_mask, spacing)
    return results


# --------------------------------------------------------------------------------------------------
# summaries


def _mean(values: Sequence[float], nan_aware: bool) -> float:
    """Mean of ``values`` as a Python float; nan-aware means skip NaN (all NaN or none -> nan)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan
    if not nan_aware:
        return float(np.mean(array))
    if np.isnan(array).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(array))


def summarise(
    per_case: Mapping[str, Mapping[int, tuple[float, float]]],
    class_names: Mapping[int, str],
    protocol: str,
) -> dict:
    """Per-class and overall means of per-case results.

    Args:
        per_case: case name -> class id -> (dice, hd95), as from :func:`case_metrics`.
        class_names: class id -> name, in the order wanted in the summary.
        protocol: ``transunet`` (plain means over cases) or ``spacing`` (NaN-aware means over cases).

    Returns:
        ``{"protocol", "cases", "classes": {name: {"dice", "hd95"}}, "mean": {"dice", "hd95"}}``; the
        overall mean is the NaN-aware mean of the class means. All numbers are Python floats.
    """
    check_protocol(protocol)
    per_case_nan_aware = protocol == "spacing"
    classes: dict[str, dict[str, float]] = {}
    for class_id, name in class_names.items():
        rows = []
        for case, results in per_case.items():
            if class_id not in results:
                raise ValueError(f"case {case!r} has no result for class {class_id} ({name})")
            rows.append(results[class_id])
        dice = _mean([r[0] for r in rows], per_case_nan_aware)
        distance = _mean([r[1] for r in rows], per_case_nan_aware)
        classes[str(name)] = {"dice": dice, "hd95": distance}
    mean = {
        "dice": _mean([v["dice"] for v in classes.values()], True),
        "hd95": _mean([v["hd95"] for v in classes.values()], True),
    }
    return {"protocol": protocol, "cases": len(per_case), "classes": classes, "mean": mean}
