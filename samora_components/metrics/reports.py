"""Evaluate predicted label volumes against ground truth: Dice and HD95 per class and case.

``python -m samora_components evaluate --pred P --label L [--protocol transunet|spacing] [--out DIR]
[--classes synapse|binary|a,b,c|classes.json|metadata.json] [--image I]``

``P``, ``L`` (and ``I``) are each one volume file or a folder of them; folder files are matched by
name without their volume suffix (:func:`samora_components.data.io.volume_stem`). Files are read with
:func:`samora_components.data.io.read_volume` (h5/npz arrays under the key ``label``, images under
``image``); the voxel spacing comes from the label volume's affine.

Writes into ``--out``: ``metrics.csv`` (one row per case), ``summary.csv`` and ``summary.json``
(per-class and overall means, see :func:`samora_components.metrics.cases.summarise`), ``dice_bar.png``
and, with ``--image``, ``overlays/<case>.png``. Every file is written atomically.

A bundle's ``configs/evaluate.yaml`` runs a MONAI ``SupervisedEvaluator`` with two handlers of this
module: :class:`PredictionWriter` writes each prediction on its input's grid and :class:`CaseReport`
scores the written files with :func:`evaluate_cases` when the run completes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samora_components.data.io import VOLUME_SUFFIXES, VolumeError, read_volume, volume_stem
from samora_components.data.transforms import SYNAPSE_CLASSES, remap_labels, resolve_label_map
from samora_components.metrics.cases import as_label_map, case_metrics, check_protocol, empty_result, summarise
from samora_components.metrics.plots import bar_chart, choose_slices, overlay_grid
from samora_components.utils import write_json, write_text

__all__ = [
    "CLASS_PRESETS", "Case", "evaluate", "evaluate_cases", "parse_classes", "match_cases", "format_table", "print_report", "some_names",
]

CLASS_PRESETS: dict[str, dict[int, str]] = {
    "synapse": dict(enumerate(SYNAPSE_CLASSES[1:], start=1)),
    "binary": {1: "foreground"},
}

OUTPUT_FILES = ("metrics.csv", "summary.csv", "summary.json", "dice_bar.png")
_UNITS = {"transunet": "voxels", "spacing": "mm"}
_LISTED = 5  # names shown in messages about unmatched files


def _warn(message: str) -> None:
    """One ``warning:`` line on stderr (above any progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# atomic writes


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """CSV with a header row; floats keep full precision (``nan`` for missing values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# classes


def _names_from_json(path: Path) -> dict[int, str]:
    """Class ids -> names from ``{"1": "name", ...}`` or a MONAI bundle ``metadata.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON class list ({err})") from None
    if isinstance(data, dict) and "network_data_format" in data:
        try:
            data = data["network_data_format"]["outputs"]["pred"]["channel_def"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: bundle metadata has no network_data_format.outputs.pred.channel_def") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{\"1\": \"name\", ...}}")
    return _names_from_mapping(data, str(path))


def _names_from_mapping(data: Mapping, source: str) -> dict[int, str]:
    """Validate an id -> name mapping; id 0 and "background" entries are dropped."""
    names: dict[int, str] = {}
    for key, value in data.items():
        try:
            class_id = int(str(key).strip())
        except ValueError:
            raise ValueError(f"{source}: class id {key!r} is not an integer") from None
        name = str(value).strip()
        if class_id == 0 or name.lower() == "background":
            continue
        if class_id < 0 or not name:
            raise ValueError(f"{source}: invalid class entry {key!r}: {value!r}")
        names[class_id] = name
    return _checked(dict(sorted(names.items())), source)


def _checked(names: dict[int, str], source: str) -> dict[int, str]:
    """Reject empty class lists and repeated names (names key the summary)."""
    if not names:
        raise ValueError(f"{source}: no foreground classes")
    repeated = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: repeated class names {', '.join(repeated)}")
    return names


def parse_classes(classes: str | Sequence[str] | Mapping | None) -> dict[int, str] | None:
    """Class id -> name for ``--classes``; None means "ids 1..max label found, named class_<id>".

    Accepts a preset (``synapse``, ``binary``), a comma list of names (ids 1..n), a JSON file
    ``{"1": "name", ...}``, a MONAI bundle ``metadata.json`` (or a bundle folder holding
    ``configs/metadata.json``), or, from Python or Fire, a sequence of names or an id -> name mapping.
    """
    if classes is None:
        return None
    if isinstance(classes, Mapping):
        return _names_from_mapping(classes, "classes")
    if isinstance(classes, (list, tuple)):
        return _names_from_list([str(c) for c in classes])
    spec = str(classes).strip()
    if spec.lower() in CLASS_PRESETS:
        return dict(CLASS_PRESETS[spec.lower()])
    path = Path(spec)
    if path.is_dir():
        for candidate in (path / "configs" / "metadata.json", path / "metadata.json"):
            if candidate.is_file():
                return _names_from_json(candidate)
        raise FileNotFoundError(f"{spec}: folder has no configs/metadata.json or metadata.json for --classes")
    if path.is_file():
        return _names_from_json(path)
    if spec.endswith(".json") or os.sep in spec:
        raise FileNotFoundError(f"{spec}: classes file not found")
    return _names_from_list(spec.split(","))


def _names_from_list(names: list[str]) -> dict[int, str]:
    """``["liver", "spleen"]`` -> {1: "liver", 2: "spleen"}."""
    cleaned = [n.strip() for n in names]
    if not cleaned or any(not n for n in cleaned):
        raise ValueError(f"classes: empty name in {','.join(cleaned)!r}")
    return _checked({i + 1: n for i, n in enumerate(cleaned)}, "classes")


# --------------------------------------------------------------------------------------------------
# finding and matching files


def _volume_files(folder: Path) -> dict[str, Path]:
    """Volume files of a folder by stem: its own files plus UA-MT ``<ID>/mri_norm2.h5`` one level down."""
    candidates = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(VOLUME_SUFFIXES)]
    candidates += [p / "mri_norm2.h5" for p in folder.iterdir() if (p / "mri_norm2.h5").is_file()]
    found: dict[str, Path] = {}
    for path in sorted(candidates):
        if path.name.startswith("."):
            continue
        stem = volume_stem(path)
        if stem in found:
            raise ValueError(f"{folder}: two volumes named {stem!r} ({found[stem].name}, {path.name})")
        found[stem] = path
    return found


def _collect(path: str | os.PathLike, role: str) -> dict[str, Path]:
    """Stem -> file for one file or a folder of volume files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{role} path {str(path)!r} does not exist")
    if p.is_file():
        return {volume_stem(p): p}
    found = _volume_files(p)
    if not found:
        raise ValueError(f"{role} folder {str(path)!r} holds no volume files ({', '.join(VOLUME_SUFFIXES)})")
    return found


def some_names(names: Sequence[str]) -> str:
    """First few names, with a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


@dataclass
class Case:
    """One evaluation case: its name and the prediction, label and (optional) image files."""

    name: str
    pred: Path
    label: Path
    image: Path | None = None


def match_cases(pred: str | os.PathLike, label: str | os.PathLike) -> list[Case]:
    """Pair prediction and label files by stem (two single files are paired whatever their names).

    Unpaired files are reported in a warning line; no pair at all raises ``ValueError``.
    """
    preds, labels = _collect(pred, "prediction"), _collect(label, "label")
    pred_is_file, label_is_file = Path(pred).is_file(), Path(label).is_file()
    if pred_is_file and label_is_file:
        (pred_path,), ((stem, label_path),) = preds.values(), labels.items()
        return [Case(stem, pred_path, label_path)]
    common = sorted(set(preds) & set(labels))
    if not common:
        raise ValueError(
            f"no prediction matches a label by name: predictions {some_names(list(preds))}; labels {some_names(list(labels))}"
        )
    only_pred = sorted(set(preds) - set(labels)) if not pred_is_file else []
    only_label = sorted(set(labels) - set(preds)) if not label_is_file else []
    if only_pred:
        _warn(f"{len(only_pred)} prediction(s) without a label, skipped: {some_names(only_pred)}")
    if only_label:
        _warn(f"{len(only_label)} label(s) without a prediction, skipped: {some_names(only_label)}")
    return [Case(stem, preds[stem], labels[stem]) for stem in common]


def _attach_images(cases: list[Case], image: str | os.PathLike) -> None:
    """Set ``case.image`` from a file (single case) or a folder matched by stem (``_0000`` allowed)."""
    images = _collect(image, "image")
    if Path(image).is_file() and len(cases) == 1:
        cases[0].image = next(iter(images.values()))
        return
    by_stem = {s.removesuffix("_0000"): p for s, p in images.items() if s.endswith("_0000")}
    by_stem.update(images)  # an exact name wins over an nnU-Net channel suffix
    missing = []
    for case in cases:
        case.image = by_stem.get(case.name)
        if case.image is None:
            missing.append(case.name)
    if missing:
        _warn(f"{len(missing)} case(s) without an image, no overlay: {some_names(missing)}")


# --------------------------------------------------------------------------------------------------
# reading


def _drop_trailing_axes(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 1, ...) -> (X, Y, Z): drop singleton axes after the third."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def _read_labels(path: Path, label_map: Mapping[int, int] | None = None) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Integer label map (X, Y, Z), voxel spacing (one value per axis) and affine of one file;
    ``label_map`` remaps its ids (unlisted ids become 0) as training does. Negative values are no
    class id: an error."""
    volume = read_volume(path, key="label")
    array = _drop_trailing_axes(np.asarray(volume.array))
    try:
        labels = as_label_map(array, str(path))
        if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
            raise ValueError(f"{path}: negative label values (down to {int(labels.min())}); labels are class ids 0, 1, ...")
        if label_map is not None:
            labels = remap_labels(labels, label_map)
    except ValueError as err:
        raise VolumeError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    spacing = tuple(volume.spacing)[: labels.ndim]
    spacing += (1.0,) * (labels.ndim - len(spacing))
    return labels, spacing, volume.affine


def _has_geometry(path: Path) -> bool:
    """Whether a file records its voxel grid (NIfTI, MetaImage; h5/npz arrays get an identity affine)."""
    return path.name.endswith((".nii", ".nii.gz", ".mhd", ".mha"))


def _check_same_grid(case: Case, pred: np.ndarray, gt: np.ndarray, pred_affine: np.ndarray, gt_affine: np.ndarray) -> None:
    """A prediction must lie on its label's voxel grid: same shape, and same affine when both files have one."""
    if pred.shape != gt.shape:
        raise ValueError(f"case {case.name}: prediction shape {pred.shape} differs from label shape {gt.shape}")
    if _has_geometry(case.pred) and _has_geometry(case.label) and not np.allclose(pred_affine, gt_affine, rtol=1e-3, atol=1e-2):
        raise ValueError(f"case {case.name}: prediction {case.pred.name} lies on another voxel grid than its label "
                         f"(affines differ, e.g. flipped or shifted): write predictions on the label's grid")


def _largest_label(*maps: np.ndarray) -> int:
    """Largest label value of the maps (0 when all are empty)."""
    return max((int(m.max()) for m in maps if m.size), default=0)


# --------------------------------------------------------------------------------------------------
# outputs


def _case_mean(results: Mapping[int, tuple[float, float]], index: int) -> float:
    """NaN-aware mean over classes of one per-case number (0: dice, 1: hd95)."""
    values = [r[index] for r in results.values() if not math.isnan(r[index])]
    return float(np.mean(values)) if values else math.nan


def _write_metrics_csv(path: Path, per_case: Mapping[str, Mapping[int, tuple]], names: Mapping[int, str]) -> None:
    """``case, dice_<name>, hd95_<name> (per class), mean_dice, mean_hd95`` per case."""
    header = ["case"]
    for name in names.values():
        header += [f"dice_{name}", f"hd95_{name}"]
    header += ["mean_dice", "mean_hd95"]
    rows = []
    for case, results in per_case.items():
        selected = {c: results[c] for c in names}
        row: list = [case]
        for c in names:
            row += [float(selected[c][0]), float(selected[c][1])]
        row += [_case_mean(selected, 0), _case_mean(selected, 1)]
        rows.append(row)
    _write_csv(path, header, rows)


def _write_summary(out: Path, summary: dict) -> None:
    """``summary.csv`` (class, dice, hd95 + mean row) and ``summary.json``."""
    rows = [[name, v["dice"], v["hd95"]] for name, v in summary["classes"].items()]
    rows.append(["mean", summary["mean"]["dice"], summary["mean"]["hd95"]])
    _write_csv(out / "summary.csv", ["class", "dice", "hd95"], rows)
    write_json(out / "summary.json", summary)


def _write_overlay(
    case: Case, gt: np.ndarray, pred: np.ndarray, names: Mapping[int, str], out: Path, mean_dice: float
) -> None:
    """``overlays/<case>.png``: the slices with most truth foreground (prediction if no truth)."""
    image = _drop_trailing_axes(np.asarray(read_volume(case.image, key="image").array))
    if image.shape != gt.shape:
        _warn(f"case {case.name}: image shape {image.shape} differs from label shape {gt.shape}, no overlay")
        return
    if gt.ndim == 2:
        image, gt, pred = image[..., None], gt[..., None], pred[..., None]
    if gt.ndim != 3:
        _warn(f"case {case.name}: {gt.ndim}-D volume, no overlay")
        return
    zs = choose_slices(gt if gt.any() else pred, n=3)
    overlay_grid(
        [image[:, :, z] for z in zs],
        [gt[:, :, z] for z in zs],
        [pred[:, :, z] for z in zs],
        out / "overlays" / f"{case.name}.png",
        titles=[f"z = {z}" for z in zs],
        title=f"{case.name}  (mean Dice {mean_dice:.3f}; truth solid, prediction dashed)",
        class_names=names,
    )


# --------------------------------------------------------------------------------------------------
# evaluation


def _score_cases(cases: list[Case], protocol: str, names: dict[int, str] | None, out: Path,
                 label_map: Mapping[int, int] | None = None) -> tuple[dict, int]:
    """Per-case results for every case (progress bar on stderr) and the largest label value seen."""
    from tqdm import tqdm

    per_case: dict[str, dict[int, tuple[float, float]]] = {}
    largest = 0
    overlays: list[Path] = []
    try:
        with tqdm(cases, desc="evaluate", unit="case", file=sys.stderr, dynamic_ncols=True) as bar:
            largest = _score_each(bar, protocol, names, out, label_map, per_case, overlays)
    except Exception:  # a bad case stops the run: no overlay of this run stays behind without its reports
        for path in overlays:
            path.unlink(missing_ok=True)
        raise
    return per_case, largest


def _score_each(bar, protocol: str, names: dict[int, str] | None, out: Path, label_map: Mapping[int, int] | None,
                per_case: dict, overlays: list[Path]) -> int:
    """Score the cases of ``bar`` into ``per_case`` (overlay files written go to ``overlays``); the
    largest label value seen."""
    largest = 0
    for case in bar:
        bar.set_postfix_str(case.name)
        gt, spacing, gt_affine = _read_labels(case.label, label_map)
        pred, _, pred_affine = _read_labels(case.pred)
        _check_same_grid(case, pred, gt, pred_affine, gt_affine)
        case_largest = _largest_label(gt, pred)
        largest = max(largest, case_largest)
        case_names = names if names is not None else {c: f"class_{c}" for c in range(1, case_largest + 1)}
        results = case_metrics(pred, gt, list(case_names), protocol=protocol, spacing=spacing)
        per_case[case.name] = results
        if case.image is not None:
            overlays.append(out / "overlays" / f"{case.name}.png")
            _write_overlay(case, gt, pred, case_names, out, _case_mean(results, 0))
    return largest


def _complete(per_case: dict[str, dict[int, tuple]], names: Mapping[int, str], protocol: str) -> None:
    """Give every case a result for every class (absent classes: the both-empty result)."""
    for results in per_case.values():
        for c in names:
            results.setdefault(c, empty_result(protocol))


def evaluate(
    pred: str,
    label: str,
    protocol: str = "transunet",
    out: str = "eval",
    classes: str | None = None,
    image: str | None = None,
    label_map: str | Mapping[int, int] | None = None,
) -> dict:
    """Score predictions against labels and write the reports into ``out``.

    Args:
        pred, label: a volume file each, or folders of volume files matched by name.
        protocol: ``transunet`` (HD95 in voxels, TransUNet empty-mask rules) or ``spacing`` (HD95 in mm,
            NaN for undefined values).
        out: output folder (created).
        classes: see :func:`parse_classes`; None scores ids 1..largest label found, named ``class_<id>``.
        image: optional image file or folder (matched like labels) for ``overlays/<case>.png``.
        label_map: remap the *label* files' ids before scoring, as training does (a preset of
            :data:`samora_components.data.transforms.LABEL_MAPS` such as ``btcv_to_synapse``, or a mapping).

    Returns:
        The :func:`samora_components.metrics.cases.summarise` dict.

    Raises:
        ValueError: unknown protocol, nothing to match, mismatched shapes, bad class list
            (:class:`samora_components.data.io.VolumeError` for unreadable files).
        FileNotFoundError: a path that does not exist.
    """
    check_protocol(protocol)
    cases = match_cases(pred, label)
    if image is not None:
        _attach_images(cases, image)
    return evaluate_cases(cases, protocol, out, classes, label_map)


def evaluate_cases(cases: list[Case], protocol: str = "transunet", out: str = "eval", classes=None,
                   label_map: str | Mapping[int, int] | None = None) -> dict:
    """Score already-paired cases (see :func:`evaluate`) and write the reports into ``out``."""
    check_protocol(protocol)
    names = parse_classes(classes)
    mapping = resolve_label_map(label_map)
    out_dir = Path(out)  # created by the first file written: a bad case leaves no empty report folder
    per_case, largest = _score_cases(cases, protocol, names, out_dir, mapping)
    if names is None:
        if largest < 1:
            raise ValueError("no foreground label in any label or prediction; pass --classes to score empty volumes")
        names = {c: f"class_{c}" for c in range(1, largest + 1)}
    elif largest > max(names):
        _warn(f"label values up to {largest} found; ids above {max(names)} are not in the class list and are ignored")
    _complete(per_case, names, protocol)
    summary = summarise(per_case, names, protocol)
    _write_metrics_csv(out_dir / "metrics.csv", per_case, names)
    _write_summary(out_dir, summary)
    bar_chart(summary, out_dir / "dice_bar.png")
    return summary


# --------------------------------------------------------------------------------------------------
# terminal


def _number(value: float, digits: int) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(summary: dict) -> str:
    """Fixed-width table: one row per class (Dice, HD95) and the mean row, with a heading line."""
    protocol = summary.get("protocol", "")
    unit = _UNITS.get(protocol, "")
    rows = [(name, v["dice"], v["hd95"]) for name, v in summary["classes"].items()]
    width = max([len("class"), len("mean")] + [len(r[0]) for r in rows])
    hd_title = f"HD95 ({unit})" if unit else "HD95"
    header = f"{'class':<{width}}  {'Dice':>8}  {hd_title:>12}"
    rule = "-" * len(header)
    lines = [f"{protocol} protocol, {summary.get('cases', 0)} case(s)", header, rule]
    lines += [f"{name:<{width}}  {_number(d, 4):>8}  {_number(h, 2):>12}" for name, d, h in rows]
    mean = summary["mean"]
    lines += [rule, f"{'mean':<{width}}  {_number(mean['dice'], 4):>8}  {_number(mean['hd95'], 2):>12}"]
    return "\n".join(lines)


def print_report(summary: dict, out: str, image: str | None = None) -> None:
    """What ``python -m samora_components evaluate`` prints: the table and the files written."""
    print(format_table(summary))
    out_dir = Path(out)
    for name in OUTPUT_FILES:
        print(f"wrote {out_dir / name}")
    overlays = out_dir / "overlays"
    if image is not None and overlays.is_dir():
        print(f"wrote {overlays}/ ({len(list(overlays.glob('*.png')))} overlays)")
