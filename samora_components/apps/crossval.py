"""Leave-one-volume-out quality check of a bundle on a small labelled set (``lovo`` command).

    python -m samora_components lovo --bundle bundles/samora_ct --datalist data/ct_real/datalist.json \
        --profile real_ct --methods samed,samora --out runs/lovo_ct

For every training volume of the datalist (a *fold*), the other volumes train each method with the
bundle's own training path (``configs/train.yaml`` + the profile, as ``train`` does) and the held-out
volume is segmented with the bundle's inference path and scored with both protocols: ``spacing``
(HD95 in mm) and ``transunet`` (HD95 in voxels). SAMora's stage 1 runs inside each fold on the fold's
training volumes only, so the held-out volume is never seen, labelled or not.

A fold trains on fewer slices than the full datalist; with ``equal_iterations`` (the default) its
stage-2 epochs are scaled so that it takes as many optimiser steps as the bundle's recipe takes on
the whole datalist (``epochs x floor(slices / batch)``): the check then measures the recipe, not a
shorter schedule. Stage 1 keeps its own settings.

Everything a fold makes lives in ``OUT/fold_<case>/`` (datalist, experts, weights, predictions,
reports, one overlay PNG per organ); a fold-method pair whose reports exist is not run again, so a
stopped run resumes with the same command. ``OUT/lovo.json`` and ``OUT/lovo.md`` hold the per-organ
table (one column per held-out volume and the mean), ``OUT/lovo_dice.png`` its Dice bars.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from samora_components.bundle import workflow
from samora_components.bundle.inference import BundlePredictor, predict_file
from samora_components.data.datasets import read_datalist
from samora_components.data.io import read_volume, volume_stem
from samora_components.metrics import reports
from samora_components.metrics.plots import overlay, save_figure
from samora_components.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["fold_datalist", "organ_overlays", "axial_slices", "equal_iteration_epochs", "leave_one_out",
           "format_markdown"]

PROTOCOLS = ("spacing", "transunet")
_EXPERT_FILES = ("lora_image.safetensors", "lora_patch.safetensors", "lora_pixel.safetensors")


def fold_datalist(content: dict, training: list[dict], held_out: int) -> dict:
    """The datalist of one fold: every training volume but ``held_out`` trains (and is the stage-1
    pool), the held-out one is the fold's only test volume."""
    train = [item for i, item in enumerate(training) if i != held_out]
    return {"name": f"{content.get('name', 'datalist')}: leave out {volume_stem(training[held_out]['image'])}",
            **{k: content[k] for k in ("kind", "classes", "intensity") if k in content},
            "training": train, "validation": [], "test": [training[held_out]],
            "unlabeled": [{"image": item["image"]} for item in train]}


def axial_slices(path: str) -> int:
    """Number of axial slices of a volume (the size of the axis its affine points head-foot), read
    from the header only."""
    image = nib.load(path)
    ornt = nib.orientations.io_orientation(image.affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return int(image.shape[axis])


def equal_iteration_epochs(epochs: int, batch_size: int, all_slices: int, fold_slices: int) -> int:
    """Epochs over ``fold_slices`` that give the optimiser steps of ``epochs`` over ``all_slices``
    (full batches only, as the training loader drops the last partial batch)."""
    steps = epochs * max(1, all_slices // batch_size)
    return max(1, math.ceil(steps / max(1, fold_slices // batch_size)))


def _recipe(bundle: str, profile, method: str, overrides: dict) -> tuple[int, int]:
    """(epochs, batch_size) the bundle's training config gives ``method`` under ``profile``."""
    parser = ConfigParser()
    parser.read_config(workflow.config_files(bundle, "train", profile=profile))
    parser.update({"method": method, **overrides})
    return int(parser.get_parsed_content("epochs")), int(parser.get_parsed_content("batch_size"))


def organ_overlays(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: dict[int, str], out: Path,
                   case: str) -> list[Path]:
    """One PNG per class: the axial slice with most truth voxels of that class (prediction when the
    truth has none), its truth (solid) and predicted (dashed) outline. Arrays (X, Y, Z) in RAS."""
    written = []
    for class_id, name in names.items():
        source = truth if (truth == class_id).any() else pred
        counts = np.count_nonzero(source == class_id, axis=(0, 1))
        if not counts.any():
            continue
        z = int(np.argmax(counts))
        only = {class_id: name}
        path = out / f"{name}.png"
        overlay(image[:, :, z], np.where(truth[:, :, z] == class_id, class_id, 0),
                np.where(pred[:, :, z] == class_id, class_id, 0), path,
                title=f"{case}: {name}, z = {z} (truth solid, prediction dashed)", class_names=only)
        written.append(path)
    return written


def _canonical(path: str) -> np.ndarray:
    """A volume's array reoriented to RAS (nearest axis order and flips), for drawing."""
    volume = read_volume(path)
    array = np.asarray(volume.array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    ornt = nib.orientations.io_orientation(volume.affine)
    return nib.orientations.apply_orientation(array, ornt)


def _run_fold(bundle: str, fold: Path, method: str, profile, pretrain: bool, names: dict[int, str],
              held: dict, overrides: dict) -> None:
    """Train ``method`` on the fold, segment and score its held-out volume (skipped when done)."""
    result = fold / method
    if all((result / p / "summary.json").is_file() for p in PROTOCOLS):
        logger.info("%s/%s: done before, kept", fold.name, method)
        return
    datalist = str(fold / "datalist.json")
    if method == "samora" and pretrain and not all((fold / "models" / "experts" / f).is_file() for f in _EXPERT_FILES):
        workflow.pretrain(bundle, "all", profile=profile, bundle_root=str(fold), datalist=datalist)
    weights = fold / "models" / f"{method}.pt"
    workflow.run_config(bundle, "train", run_id="training", profile=profile, bundle_root=str(fold),
                        datalist=datalist, method=method, model_filename=weights.name, **overrides)
    case = volume_stem(held["image"])
    pred = result / "pred" / f"{case}.nii.gz"
    pred.parent.mkdir(parents=True, exist_ok=True)
    predict_file(BundlePredictor.from_bundle(bundle, str(weights)), Path(held["image"]), pred)
    organ_overlays(_canonical(held["image"]), _canonical(held["label"]), _canonical(str(pred)), names,
                   result / "organs", case)
    for protocol in reversed(PROTOCOLS):  # spacing last: its summary marks the pair as done
        reports.evaluate(str(pred), held["label"], protocol=protocol, out=str(result / protocol),
                         classes=[names[c] for c in sorted(names)])


def _table(out: Path, folds: list[str], methods: Sequence[str], names: dict[int, str]) -> dict:
    """{method: {organ: {metric: {fold: value, "mean": value}}}} from the folds' per-protocol summaries."""
    table: dict = {}
    metrics = {"dice": ("spacing", "dice"), "hd95_mm": ("spacing", "hd95"), "hd95_voxels": ("transunet", "hd95")}
    for method in methods:
        table[method] = {}
        for name in names.values():
            table[method][name] = {}
            for metric, (protocol, key) in metrics.items():
                values = {}
                for fold in folds:
                    path = out / f"fold_{fold}" / method / protocol / "summary.json"
                    if path.is_file():
                        values[fold] = json.loads(path.read_text())["classes"][name][key]
                finite = [v for v in values.values() if v is not None and not math.isnan(v)]
                values["mean"] = float(np.mean(finite)) if finite else float("nan")
                table[method][name][metric] = values
    return table


def format_markdown(table: dict, folds: list[str]) -> str:
    """The table as Markdown: one row per method and organ; Dice, HD95 mm, HD95 voxels per held-out
    volume and their mean (``nan``: the organ is absent from that volume's truth or prediction)."""
    def cell(value) -> str:
        return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    head = ["method", "organ"] + [f"Dice {f}" for f in folds] + ["Dice mean", "HD95 mm mean", "HD95 vox mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, organs in table.items():
        for organ, metrics in organs.items():
            row = [method, organ] + [cell(metrics["dice"].get(f)) for f in folds]
            row += [cell(metrics["dice"]["mean"]), cell(metrics["hd95_mm"]["mean"]), cell(metrics["hd95_voxels"]["mean"])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _dice_plot(table: dict, path: Path) -> None:
    organs = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(1.1 * len(organs) + 2, 3.5))
    width = 0.8 / max(1, len(table))
    for i, (method, rows) in enumerate(table.items()):
        means = [rows[o]["dice"]["mean"] for o in organs]
        ax.bar(np.arange(len(organs)) + i * width, np.nan_to_num(means), width, label=method)
    ax.set_xticks(np.arange(len(organs)) + width * (len(table) - 1) / 2, organs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice, mean over held-out volumes")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def leave_one_out(bundle: str, datalist: str, out: str, methods: str | Sequence[str] = ("samed", "samora"),
                  profile: str | Sequence[str] | None = None, pretrain: bool = True,
                  folds: str | Sequence[str] | None = None, equal_iterations: bool = True, **overrides) -> dict:
    """Run every fold and method (see the module docstring); returns the table of :func:`_table`.

    ``overrides``: training config values for every run (e.g. ``epochs``); ``pretrain=False`` uses
    experts already in ``OUT/fold_<case>/models/experts`` instead of running stage 1; ``folds``: the
    held-out volumes (names without suffix) to run now, to spread a study over several runs (the
    table holds every fold finished so far); ``equal_iterations``: scale each fold's epochs to the
    full datalist's optimiser steps (see the module docstring; ignored when ``epochs`` is given).
    """
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    content = json.loads(Path(datalist).read_text())
    training = read_datalist(datalist, "training")
    if len(training) < 2:
        raise ValueError(f"{datalist}: leave-one-out needs at least 2 training volumes, found {len(training)}")
    classes = content.get("classes") or []
    names = {i: str(n) for i, n in enumerate(classes) if i > 0}
    if not names:
        raise ValueError(f"{datalist}: no 'classes' list (background first) to name the organs")
    out_dir = Path(out)
    names_all = [volume_stem(item["image"]) for item in training]
    if len(set(names_all)) != len(names_all):
        raise ValueError(f"{datalist}: two training volumes share a name ({', '.join(names_all)})")
    chosen = [f.strip() for f in folds.split(",")] if isinstance(folds, str) else list(folds or names_all)
    unknown = [f for f in chosen if f not in names_all]
    if unknown:
        raise ValueError(f"--folds {', '.join(unknown)}: not a training volume of {datalist} ({', '.join(names_all)})")
    slices = [axial_slices(item["image"]) for item in training] if equal_iterations else []
    for index, (case, held) in enumerate(zip(names_all, training)):
        if case not in chosen:
            continue
        fold = out_dir / f"fold_{case}"
        write_json(fold / "datalist.json", fold_datalist(content, training, index))
        for method in methods:
            settings = dict(overrides)
            if equal_iterations and "epochs" not in overrides:
                epochs, batch = _recipe(bundle, profile, method, overrides)
                settings["epochs"] = equal_iteration_epochs(epochs, batch, sum(slices), sum(slices) - slices[index])
            logger.info("fold %d/%d (%s held out): %s, %s epochs", index + 1, len(names_all), case, method,
                        settings.get("epochs", "the recipe's"))
            _run_fold(bundle, fold, method, profile, pretrain, names, held, settings)
    folds = [f for f in names_all if (out_dir / f"fold_{f}").is_dir()]
    table = _table(out_dir, folds, methods, names)
    write_json(out_dir / "lovo.json", {"folds": folds, "methods": methods, "table": table})
    (out_dir / "lovo.md").write_text(format_markdown(table, folds))
    _dice_plot(table, out_dir / "lovo_dice.png")
    return table
