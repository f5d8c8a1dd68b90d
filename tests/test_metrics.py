"""Dice/HD95 parity with medpy, the TransUNet and spacing protocols' empty-mask rules, summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

from samora_components.metrics.cases import case_metrics, dc, empty_result, hd95, summarise

medpy_binary = pytest.importorskip("medpy.metric.binary")

TOTALSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_example_ct"
ORGANS = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder",
    5: "liver", 6: "stomach", 7: "pancreas", 52: "aorta",
}  # fmt: skip
TOL = 1e-9


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 1.5) -> np.ndarray:
    """A random smooth mask (one or more blobs) of ``shape``, never empty."""
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    mask = field > np.quantile(field, rng.uniform(0.6, 0.9))
    if not mask.any():
        mask.flat[rng.integers(mask.size)] = True
    return mask


def _check_parity(pred: np.ndarray, gt: np.ndarray, spacing=None) -> None:
    assert dc(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=TOL)
    expected = medpy_binary.hd95(pred, gt, voxelspacing=spacing, connectivity=1)
    assert hd95(pred, gt, spacing) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------------------------------
# parity with medpy on synthetic masks

SHAPES = [(30,), (40, 37), (64, 64), (1, 33), (30, 25, 20), (17, 40, 33), (9, 1, 14), (6, 7, 5, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_random_blobs(shape):
    rng = np.random.default_rng(len(shape) * 1000 + sum(shape))
    for trial in range(6):
        pred, gt = _blob(rng, shape), _blob(rng, shape)
        spacing = [None, 0.7, tuple(rng.uniform(0.4, 3.0, size=len(shape)))][trial % 3]
        _check_parity(pred, gt, spacing)


@pytest.mark.parametrize("spacing", [None, (0.8, 0.8, 2.5), (3.0, 0.5, 1.0)])
def test_parity_masks_touching_the_border(spacing):
    rng = np.random.default_rng(1)
    shape = (20, 18, 12)
    gt = _blob(rng, shape)
    gt[0, :, :] = True  # first and last slabs of the array: the erosion sees zeros outside
    gt[:, -1, 4:9] = True
    pred = _blob(rng, shape)
    pred[:, :, -1] = True
    _check_parity(pred, gt, spacing)
    full = np.ones(shape, dtype=bool)  # the whole array is one object: its surface is the array border
    _check_parity(full, gt, spacing)
    _check_parity(full, full, spacing)


def test_parity_single_voxels():
    shape = (15, 12, 10)
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[0, 0, 0] = True
    b[14, 11, 9] = True
    for spacing in (None, (0.5, 2.0, 3.0)):
        _check_parity(a, b, spacing)
        _check_parity(a, a, spacing)
        _check_parity(a, _blob(np.random.default_rng(2), shape), spacing)
    assert hd95(a, b) == pytest.approx(math.sqrt(14**2 + 11**2 + 9**2), abs=TOL)
    assert hd95(a, a) == 0.0


def test_parity_far_apart_and_anisotropic_2d():
    a, b = np.zeros((50, 70), bool), np.zeros((50, 70), bool)
    a[2:6, 3:9] = True
    b[40:48, 55:69] = True
    _check_parity(a, b, (2.0, 0.3))


def test_dice_definition_and_empty_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dc(a, b) == 1.0  # as medpy
    a[0, :3] = True
    b[0, 1:] = True
    assert dc(a, b) == pytest.approx(2 * 2 / 6)
    with pytest.raises(RuntimeError):
        hd95(a, np.zeros_like(a))
    with pytest.raises(ValueError):
        hd95(a, b, spacing=(1.0, 2.0, 3.0))


def test_large_anisotropic_volume_matches_medpy():
    shape = (256, 256, 96)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt = ((z - 120) / 30.0) ** 2 + ((y - 100) / 22.0) ** 2 + ((x - 50) / 15.0) ** 2 < 1
    pred = ((z - 123) / 29.0) ** 2 + ((y - 99) / 23.0) ** 2 + ((x - 51) / 15.0) ** 2 < 1
    ours = hd95(pred, gt, (0.8, 0.8, 2.5))
    reference = medpy_binary.hd95(pred, gt, voxelspacing=(0.8, 0.8, 2.5))
    assert ours == pytest.approx(reference, abs=TOL)


# --------------------------------------------------------------------------------------------------
# protocols


def _labels() -> tuple[np.ndarray, np.ndarray]:
    """Prediction and truth (12, 10, 8): class 1 in both, 2 only in truth, 3 only in prediction."""
    gt = np.zeros((12, 10, 8), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:7, 2:6, 1:5] = 1
    pred[3:8, 2:6, 1:6] = 1
    gt[9:11, 7:9, 5:7] = 2
    pred[0:2, 8:10, 6:8] = 3
    return pred, gt


def test_transunet_rules():
    pred, gt = _labels()
    spacing = (2.0, 0.5, 3.0)
    result = case_metrics(pred, gt, [1, 2, 3, 4], protocol="transunet", spacing=spacing)
    expected = (medpy_binary.dc(pred == 1, gt == 1), medpy_binary.hd95(pred == 1, gt == 1))
    assert result[1] == pytest.approx(expected, abs=TOL)
    assert result[2] == (0.0, 0.0)  # prediction empty, truth not
    assert result[3] == (1.0, 0.0)  # truth empty, prediction not
    assert result[4] == (0.0, 0.0)  # both empty
    assert empty_result("transunet") == (0.0, 0.0)
    # spacing is ignored by this protocol
    assert case_metrics(pred, gt, [1], protocol="transunet")[1] == result[1]


def test_spacing_rules():
    pred, gt = _labels()
    spacing = (2.0, 0.5, 3.0)
    result = case_metrics(pred, gt, [1, 2, 3, 4], protocol="spacing", spacing=spacing)
    expected = (medpy_binary.dc(pred == 1, gt == 1), medpy_binary.hd95(pred == 1, gt == 1, voxelspacing=spacing))
    assert result[1] == pytest.approx(expected, abs=TOL)
    assert result[1][1] != pytest.approx(case_metrics(pred, gt, [1])[1][1])  # mm, not voxels
    assert result[2][0] == 0.0 and math.isnan(result[2][1])
    assert result[3][0] == 0.0 and math.isnan(result[3][1])
    assert math.isnan(result[4][0]) and math.isnan(result[4][1])
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(pred, gt, [1], protocol="spacing")


def test_case_metrics_inputs():
    pred, gt = _labels()
    as_float = case_metrics(pred.astype(np.float32), gt.astype(np.float64), [1, 2], "transunet")
    assert as_float == case_metrics(pred, gt, [1, 2], "transunet")
    with pytest.raises(ValueError, match="protocol"):
        case_metrics(pred, gt, [1], protocol="nnunet")
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred[:-1], gt, [1])
    with pytest.raises(ValueError, match="non-integer"):
        case_metrics(pred + 0.5, gt, [1])
    with pytest.raises(ValueError, match=">= 1"):
        case_metrics(pred, gt, [0, 1])


# --------------------------------------------------------------------------------------------------
# summaries


def test_summarise_transunet_arithmetic():
    per_case = {
        "a": {1: (0.5, 2.0), 2: (1.0, 0.0)},
        "b": {1: (0.7, 4.0), 2: (0.0, 0.0)},
    }
    summary = summarise(per_case, {1: "liver", 2: "spleen"}, "transunet")
    assert set(summary) == {"protocol", "cases", "classes", "mean"}
    assert summary["protocol"] == "transunet" and summary["cases"] == 2
    assert list(summary["classes"]) == ["liver", "spleen"]
    assert summary["classes"]["liver"] == pytest.approx({"dice": 0.6, "hd95": 3.0})
    assert summary["classes"]["spleen"] == pytest.approx({"dice": 0.5, "hd95": 0.0})
    assert summary["mean"] == pytest.approx({"dice": 0.55, "hd95": 1.5})
    for values in [*summary["classes"].values(), summary["mean"]]:
        assert all(type(v) is float for v in values.values())
    assert json.loads(json.dumps(summary)) == summary


def test_summarise_spacing_is_nan_aware():
    nan = math.nan
    per_case = {
        "a": {1: (0.5, 2.0), 2: (nan, nan), 3: (0.9, 1.0)},
        "b": {1: (0.0, nan), 2: (nan, nan), 3: (0.7, 3.0)},
    }
    summary = summarise(per_case, {1: "x", 2: "y", 3: "z"}, "spacing")
    assert summary["classes"]["x"] == pytest.approx({"dice": 0.25, "hd95": 2.0})
    assert math.isnan(summary["classes"]["y"]["dice"]) and math.isnan(summary["classes"]["y"]["hd95"])
    assert summary["classes"]["z"] == pytest.approx({"dice": 0.8, "hd95": 2.0})
    assert summary["mean"] == pytest.approx({"dice": (0.25 + 0.8) / 2, "hd95": 2.0})
    with pytest.raises(ValueError, match="no result"):
        summarise({"a": {1: (1.0, 0.0)}}, {1: "x", 2: "y"}, "spacing")


# --------------------------------------------------------------------------------------------------
# real labels (TotalSegmentator example CT)


def _reference_transunet(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """TransUNet ``calculate_metric_percase`` written directly on medpy."""
    if pred.sum() > 0 and gt.sum() > 0:
        return medpy_binary.dc(pred, gt), medpy_binary.hd95(pred, gt)
    if pred.sum() > 0:
        return 1.0, 0.0
    return 0.0, 0.0


def _perturbed(gt: np.ndarray) -> np.ndarray:
    """A plausible wrong prediction: per-organ dilation, erosion, shifts, one organ dropped, one added."""
    pred = np.zeros_like(gt)
    cross = np.ones((3, 3, 3), bool)
    edits = {
        1: lambda m: binary_dilation(m),
        2: lambda m: binary_erosion(m),
        3: lambda m: np.roll(m, 2, axis=0),
        4: lambda m: np.zeros_like(m),  # gallbladder missed
        5: lambda m: binary_dilation(m, iterations=2) & ~np.roll(m, -4, axis=2),
        6: lambda m: np.roll(binary_erosion(m, cross), (1, -1), axis=(1, 2)),
        7: lambda m: m,
        52: lambda m: binary_dilation(m, structure=cross),
    }
    for organ, edit in edits.items():
        pred[edit(gt == organ) & (pred == 0)] = organ
    return pred


def test_parity_on_real_labels():
    label_file = TOTALSEG / "example_seg_fast_force_split.nii.gz"
    if not label_file.is_file():
        pytest.skip(f"real example labels not available ({label_file})")
    from samora_components.data.io import read_volume

    volume = read_volume(label_file, key="label")
    full = np.asarray(volume.array)
    gt = np.where(np.isin(full, list(ORGANS)), full, 0).astype(np.uint8)
    pred = _perturbed(gt)
    pred[(full == 8) & (pred == 0)] = 8  # adrenal gland: predicted, absent from the truth
    ids = [*ORGANS, 8]

    reference = {c: _reference_transunet(pred == c, gt == c) for c in ids}
    ours = case_metrics(pred, gt, ids, protocol="transunet", spacing=volume.spacing)

    assert ours[4] == (0.0, 0.0) and ours[8] == (1.0, 0.0)
    assert ours[7] == (1.0, 0.0)  # unchanged organ
    for c in ids:
        assert ours[c] == pytest.approx(reference[c], abs=TOL), ORGANS.get(c, c)

    spacing = volume.spacing
    mm = case_metrics(pred, gt, [1, 5, 52], protocol="spacing", spacing=spacing)
    for c in (1, 5, 52):
        expected = medpy_binary.hd95(pred == c, gt == c, voxelspacing=spacing)
        assert mm[c][1] == pytest.approx(expected, abs=TOL)
        assert mm[c][1] == pytest.approx(3.0 * ours[c][1], abs=1e-6)  # 3 mm isotropic voxels
