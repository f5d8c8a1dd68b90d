"""Datalists for public MR and CT releases laid out as downloaded (SPEC §7).

``python -m samora_components convert --kind la|promise12|synapse|amos|totalseg --src DIR
[--out DIR/datalist.json] [--validation N] [--evaluation N] [--labeled N] [--append True]``

``--append True`` adds the converted cases to the datalist already at ``--out`` (one training set from
several releases, e.g. AMOS slabs + a TotalSegmentator subject); both must be CT, or the same MR kind.

A datalist has the sections ``training``, ``validation``, ``test`` (items ``{"image", "label"}``)
and ``unlabeled`` (items ``{"image"}``, the stage-1 pool), plus ``name``, ``kind`` (ct|mr) and
``classes`` (background first). Paths are written relative to the datalist's folder when they lie
below it; the file is written atomically.

MR kinds (few-shot budget)
--------------------------
``la``
    The 2018 Atrial Segmentation Challenge in the UA-MT release: ``<ID>/mri_norm2.h5`` folders (any
    depth under ``DIR``) with ``train.list`` / ``test.list`` next to them. Without ``train.list`` the
    sorted ids are split 80/20. Scans whose file has no ``label`` array are unlabeled. The layout of
    ``shared/data/la2018`` (``labeled/``, ``unlabeled/``, ``validation/`` and ``train.list``, no
    ``test.list``) is the same thing with most scans absent: ``test`` is then empty.
``promise12``
    PROMISE12 training data: ``CaseNN.mhd`` (or ``.nii.gz``) with ``CaseNN_segmentation.*`` beside it;
    the sorted labeled cases are split 80/20 (40/10) into training list and ``test``.

The few-shot budget counts every labeled scan a run touches. ``training`` is the first ``--labeled``
labeled scans of the training list in list order (LA 4, PROMISE12 3; ``--labeled 0`` = all of them,
fully supervised). ``validation`` is the next ``--validation`` labeled scans *after* the budget
(never one of the budget scans; an error when there are not enough). ``--evaluation N`` moves the
next N labeled scans after those into ``test``: scans for scoring only, never a gradient, a
checkpoint choice or a stage-1 image (``shared/data/la2018``: ``--labeled 4 --evaluation 16`` makes
its ``validation/`` folder the test set). ``unlabeled`` is every image of the training list except the
validation and evaluation scans (the budget scans' images included).

CT kinds (8 Synapse organs)
---------------------------
Labels come out in Synapse-8 ids (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 liver,
6 stomach, 7 aorta, 8 pancreas). Where the source uses other ids, remapped uint8 copies (the source
label's geometry) are written to ``labels_synapse8/`` beside the datalist, which points at them and
records ``label_source``. ``intensity`` says what the image files hold: ``hu`` (NIfTI) or
``scaled01`` (TransUNet files, already clipped to [-125, 275] HU and scaled to [0, 1]). The CT
converters do no few-shot selection and no validation split (the training config selects, seeded);
``--validation`` / ``--labeled`` are refused for them.

``synapse``
    (a) TransUNet release: ``train_npz/caseXXXX_sliceNNN.npz`` slices (one training item each, image
    and label in the same file) and ``test_vol_h5/caseXXXX.npy.h5`` test volumes, in the order of
    ``lists_Synapse/train.txt`` / ``test_vol.txt`` when such a folder is under ``DIR``, else sorted.
    Already Synapse ids; ``unlabeled`` is empty. (b) Raw BTCV: ``RawData/Training/{img,label}/``
    (or ``Training/{img,label}``, or ``{img,label}`` under ``DIR``), split by case number as SPEC §7
    (18 training, 12 test cases), labels remapped with ``btcv_to_synapse``; ``unlabeled`` is the
    training cases' images.
``amos``
    AMOS22: ``imagesTr``/``labelsTr`` (training), ``imagesVa``/``labelsVa`` (test), ``imagesTs``;
    CT cases only (case number < 500). Ids map to Synapse by the organ names of ``dataset.json``
    when present, else with ``amos_to_synapse``; ``unlabeled`` is every CT image. A flat folder of
    ``<case>_ct.nii.gz`` + ``<case>_label_amos15.nii.gz`` pairs (``shared/data/amos_slabs``) is
    also accepted: every labeled case goes to training.
``totalseg``
    TotalSegmentator subject folders (``DIR`` itself or its subfolders): ``ct.nii.gz`` with binary
    masks ``segmentations/<organ>.nii.gz`` merged into one label map (later organs in Synapse order
    win where masks overlap), or one ``*ct*.nii.gz`` with one ``*seg*.nii.gz`` in "total" ids
    (remapped with ``totalseg_to_synapse``). Every subject is training; ``unlabeled`` is their CTs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from samora_components.data.io import check_same_grid, volume_stem
from samora_components.data.transforms import LABEL_MAPS, SYNAPSE_CLASSES, remap_labels
from samora_components.utils import atomic_path, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "la_datalist",
    "promise12_datalist",
    "synapse_datalist",
    "amos_datalist",
    "totalseg_datalist",
    "build_datalist",
    "write_datalist",
    "merge_datalists",
    "main",
    "KINDS",
    "LABELS_DIR",
]

LABELS_DIR = "labels_synapse8"
SYNAPSE_NAMES = SYNAPSE_CLASSES[1:]
_MR_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".mha")
_MR_SUFFIX = "(?:" + "|".join(re.escape(s) for s in _MR_SUFFIXES) + ")"
_NIFTI = r"\.nii(?:\.gz)?"
# SPEC §7: the TransUNet split of the 30 labeled BTCV cases
BTCV_TRAINING = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
BTCV_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
# TotalSegmentator mask file names, in Synapse id order
TOTALSEG_MASKS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas")
_ORGAN_ALIASES = {"kidneyright": "rightkidney", "kidneyleft": "leftkidney", "arota": "aorta"}  # AMOS22 spells "arota"

Pair = tuple[str, Path, Path]  # (output name, image, label)


# ---------------------------------------------------------------- shared helpers


def _folder(src: str | Path) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    return src


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _warn_missing(names: list, what: str) -> None:
    """One warning for all ``names`` that are ``what`` but absent (e.g. listed but not found)."""
    if names:
        logger.warning("%d %s are absent (e.g. %s); they are left out", len(names), what, names[:3])


def _listed(list_file: Path | None, found: Mapping[str, Path]) -> list[str]:
    """Names of ``list_file`` that were found, in list order; all found names sorted without a list."""
    if list_file is None:
        return sorted(found)
    names = [volume_stem(n) for n in _read_list(list_file)]
    _warn_missing([n for n in names if n not in found], f"scans listed in {list_file}")
    return [n for n in names if n in found]


def _index(paths: Iterable[Path], pattern: str, flags: int = 0) -> dict[str, Path]:
    """Files whose name fully matches ``pattern``, keyed by its first group (first path wins)."""
    index: dict[str, Path] = {}
    for path in sorted(paths):
        match = re.fullmatch(pattern, path.name, flags)
        if match and path.is_file():
            index.setdefault(match.group(1), path)
    return index


def _pairs(images: Mapping[str, Path], labels: Mapping[str, Path], where: Path) -> list[Pair]:
    """(case, image, label) for every label with an image of the same case, sorted by case."""
    _warn_missing([c for c in sorted(labels) if c not in images], f"images of labels under {where}")
    return [(case, images[case], labels[case]) for case in sorted(labels) if case in images]


def _images(paths: Iterable[Path]) -> list[dict]:
    return [{"image": str(p)} for p in paths]


def _budget(items: list[dict], labeled: int | None, validation: int,
            evaluation: int = 0) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(training, validation, evaluation, unlabeled) of training-list items (list order) under the
    few-shot rule."""
    if validation < 0 or (labeled or 0) < 0 or evaluation < 0:
        raise ValueError(f"--validation, --evaluation and --labeled must not be negative (got {validation}, "
                         f"{evaluation}, {labeled})")
    with_label = [item for item in items if "label" in item]
    if labeled and len(with_label) < labeled:
        raise ValueError(f"few-shot budget of {labeled} labeled scans, but the training list has only "
                         f"{len(with_label)}")
    budget = labeled or len(with_label)
    valid = with_label[budget : budget + validation]
    if len(valid) < validation:
        raise ValueError(f"cannot hold out {validation} validation scans: only {len(valid)} labeled training scans "
                         f"follow the {budget} of the few-shot budget (lower --labeled or --validation)")
    start = budget + validation
    scored = with_label[start : start + evaluation]
    if len(scored) < evaluation:
        raise ValueError(f"cannot hold out {evaluation} evaluation scans: only {len(scored)} labeled training scans "
                         f"follow the {budget} of the budget and the {validation} validation scans")
    held = {item["image"] for item in valid + scored}
    return with_label[:budget], valid, scored, [{"image": it["image"]} for it in items if it["image"] not in held]


def _mr_datalist(name: str, classes: list[str], items: list[dict], test: list[dict], labeled: int | None,
                 validation: int, evaluation: int = 0) -> dict:
    training, valid, scored, pool = _budget(items, labeled, validation, evaluation)
    return {"name": name, "kind": "mr", "classes": classes,
            "training": training, "validation": valid, "test": scored + test, "unlabeled": pool}


def _ct_datalist(name: str, training: list[dict], test: list[dict], unlabeled: list[dict], intensity: str,
                 label_source: str | None) -> dict:
    content = {"name": name, "kind": "ct", "classes": list(SYNAPSE_CLASSES), "intensity": intensity,
               "training": training, "validation": [], "test": test, "unlabeled": unlabeled}
    if label_source:
        content["label_source"] = label_source
    return content


# ---------------------------------------------------------------- label copies


def _read_label(path: Path) -> tuple[np.ndarray, object]:
    """Integer array and nibabel image of a NIfTI label file; ValueError (one line) if unreadable."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel, gzip and zlib raise many types for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable NIfTI label ({reason})") from None
    return (np.rint(array) if np.issubdtype(array.dtype, np.floating) else array), image


def _save_label(array: np.ndarray, like: object, dest: Path) -> Path:
    """Write ``array`` as a uint8 NIfTI with the geometry of image ``like``, atomically."""
    import nibabel as nib

    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    with atomic_path(dest) as tmp:
        nib.save(type(like)(np.asarray(array, dtype=np.uint8), like.affine, header), str(tmp))
    return dest


def _remapped_items(pairs: Iterable[Pair], mapping: Mapping[int, int], labels_dir: Path) -> list[dict]:
    """Items whose labels are remapped copies ``labels_dir/<name>.nii.gz`` of the source labels."""
    pairs = list(pairs)
    for _, image, label in pairs:  # headers only: a label on another grid is refused before any copy is written
        check_same_grid(str(image), str(label))
    items = []
    for name, image, label in pairs:
        array, source = _read_label(label)
        try:
            remapped = remap_labels(array, mapping)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
        items.append({"image": str(image), "label": str(_save_label(remapped, source, labels_dir / f"{name}.nii.gz"))})
    return items


def _organ_key(name: str) -> str:
    key = re.sub(r"[\s_\-]", "", name.lower())
    return _ORGAN_ALIASES.get(key, key)


_SYNAPSE_IDS = {_organ_key(name): i for i, name in enumerate(SYNAPSE_NAMES, start=1)}


def _names_by_id(labels: Mapping) -> dict[int, str]:
    """A dataset.json ``labels`` table as id -> name; accepts ``{"id": name}`` and ``{name: id}``."""
    if all(str(key).isdigit() for key in labels):
        return {int(key): str(name) for key, name in labels.items()}
    return {int(value): str(name) for name, value in labels.items()}


def _mapping_from_names(by_id: Mapping[int, str]) -> dict[int, int]:
    """Source id -> Synapse id by organ name; names of no Synapse organ are left out (-> background)."""
    mapping = {i: _SYNAPSE_IDS[_organ_key(n)] for i, n in by_id.items() if _organ_key(n) in _SYNAPSE_IDS}
    absent = [n for n in SYNAPSE_NAMES if _SYNAPSE_IDS[_organ_key(n)] not in mapping.values()]
    if len(absent) == len(SYNAPSE_NAMES):
        raise ValueError(f"dataset.json labels name none of the 8 Synapse organs ({sorted(by_id.values())})")
    if absent:
        logger.warning("dataset.json labels lack %s: they stay background", ", ".join(absent))
    return mapping


# ---------------------------------------------------------------- MR kinds


def _has_label(h5: Path) -> bool:
    import h5py

    try:
        with h5py.File(h5, "r") as handle:
            return "label" in handle
    except OSError as err:  # h5py's message does not name the file
        raise ValueError(f"{h5}: not a readable HDF5 file, truncated or corrupt? ({str(err).splitlines()[0]})") from None


def _h5_item(path: Path) -> dict:
    return {"image": str(path), "label": str(path)} if _has_label(path) else {"image": str(path)}


def la_datalist(src: str | Path, validation: int = 0, labeled: int | None = 4, evaluation: int = 0) -> dict:
    """Datalist of an LA (UA-MT layout) folder; see the module docstring for the budget rule."""
    src = _folder(src)
    found = {p.parent.name: p for p in sorted(src.rglob("mri_norm2.h5"))}
    if not found:
        raise FileNotFoundError(f"{src}: no <ID>/mri_norm2.h5 files (UA-MT layout)")
    train_list, test_list = (next(iter(sorted(src.rglob(f"{n}.list"))), None) for n in ("train", "test"))
    if train_list is not None:
        train_ids = _listed(train_list, found)
        test_ids = _listed(test_list, found) if test_list is not None else []
    else:
        ids = sorted(found)
        cut = round(0.8 * len(ids))
        train_ids, test_ids = ids[:cut], ids[cut:]
    test = [item for item in (_h5_item(found[i]) for i in test_ids) if "label" in item]
    return _mr_datalist("LA 2018 (UA-MT release)", ["background", "left_atrium"],
                        [_h5_item(found[i]) for i in train_ids], test, labeled, validation, evaluation)


def promise12_datalist(src: str | Path, validation: int = 0, labeled: int | None = 3, evaluation: int = 0) -> dict:
    """Datalist of a PROMISE12 training folder; see the module docstring for the budget rule."""
    src = _folder(src)
    images = _index(src.rglob("*"), rf"(Case\d+){_MR_SUFFIX}", re.IGNORECASE)
    if not images:
        raise FileNotFoundError(f"{src}: no CaseNN.mhd / CaseNN.nii.gz images (PROMISE12 layout)")
    items = []
    for case, image in sorted(images.items()):
        label = next((p for s in _MR_SUFFIXES if (p := image.with_name(f"{case}_segmentation{s}")).is_file()), None)
        items.append({"image": str(image), "label": str(label)} if label else {"image": str(image)})
    labeled_items = [item for item in items if "label" in item]
    test = labeled_items[round(0.8 * len(labeled_items)) :]
    return _mr_datalist("PROMISE12", ["background", "prostate"], [it for it in items if it not in test], test,
                        labeled, validation, evaluation)


# ---------------------------------------------------------------- synapse


def _transunet(src: Path) -> dict | None:
    """The TransUNet Synapse layout (train_npz/ + test_vol_h5/), or None when ``src`` has none of it."""
    slices = {volume_stem(p): p for p in sorted(src.rglob("*.npz")) if p.parent.name == "train_npz"}
    volumes = {volume_stem(p): p for p in sorted(src.rglob("*.npy.h5")) if p.parent.name == "test_vol_h5"}
    if not slices and not volumes:
        return None
    lists = next((p for p in sorted(src.rglob("lists_Synapse")) if p.is_dir()), None)

    def items(found: dict[str, Path], name: str) -> list[dict]:
        list_file = lists / name if lists is not None and (lists / name).is_file() else None
        return [{"image": str(found[n]), "label": str(found[n])} for n in _listed(list_file, found)]

    return _ct_datalist("Synapse multi-organ CT (TransUNet release)", items(slices, "train.txt"),
                        items(volumes, "test_vol.txt"), [], "scaled01", None)


def _btcv(src: Path, labels_dir: Path) -> dict | None:
    """The raw BTCV release (img/ + label/ folders), or None when ``src`` has none of it."""
    root = next((r for r in (src / "RawData" / "Training", src / "Training", src)
                 if (r / "img").is_dir() and (r / "label").is_dir()), None)
    if root is None:
        return None
    images = {int(k): p for k, p in _index((root / "img").iterdir(), rf"img(\d+){_NIFTI}").items()}
    labels = {int(k): p for k, p in _index((root / "label").iterdir(), rf"label(\d+){_NIFTI}").items()}
    _warn_missing([c for c in BTCV_TRAINING + BTCV_TEST if c not in images or c not in labels],
                  f"BTCV cases (image or label) under {root}")

    def pairs(cases: tuple[int, ...]) -> list[Pair]:
        return [(volume_stem(labels[c]), images[c], labels[c]) for c in cases if c in images and c in labels]

    mapping = LABEL_MAPS["btcv_to_synapse"]
    training = _remapped_items(pairs(BTCV_TRAINING), mapping, labels_dir)
    test = _remapped_items(pairs(BTCV_TEST), mapping, labels_dir)
    if not training and not test:
        raise FileNotFoundError(f"{root}: none of the 30 BTCV cases has both img{{NNNN}} and label{{NNNN}} files")
    return _ct_datalist("Synapse multi-organ CT (raw BTCV)", training, test, _images(it["image"] for it in training),
                        "hu", "btcv_to_synapse")


def synapse_datalist(src: str | Path, labels_dir: str | Path | None = None) -> dict:
    """Datalist of a Synapse/BTCV folder (TransUNet or raw BTCV layout, detected in that order)."""
    src = _folder(src)
    labels_dir = Path(labels_dir) if labels_dir is not None else src / LABELS_DIR
    content = _transunet(src) or _btcv(src, labels_dir)
    if content is None:
        raise FileNotFoundError(f"{src}: neither the TransUNet layout (train_npz/, test_vol_h5/) nor raw BTCV "
                                "(RawData/Training/img, label)")
    return content


# ---------------------------------------------------------------- amos


def _amos_is_ct(case: str) -> bool:
    """AMOS case numbers below 500 are CT, from 500 on MR; names without a number count as CT."""
    match = re.search(r"(\d+)", case)
    return match is None or int(match.group(1)) < 500


def _amos_mapping(root: Path) -> tuple[dict[int, int], str]:
    """(source id -> Synapse id, label_source) from ``root/dataset.json`` names, else the preset."""
    preset = LABEL_MAPS["amos_to_synapse"]
    path = root / "dataset.json"
    if not path.is_file():
        return dict(preset), "amos_to_synapse"
    try:
        by_id = _names_by_id(json.loads(path.read_text())["labels"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: no readable 'labels' table ({type(err).__name__}: {err})") from None
    mapping = _mapping_from_names(by_id)
    return mapping, ("amos_to_synapse" if mapping == preset else "amos dataset.json names")


def _amos_folder(folder: Path, keep: Callable[[str], bool]) -> dict[str, Path]:
    """NIfTI files of an AMOS folder by case name (nnU-Net ``_0000`` channel suffix dropped), filtered."""
    if not folder.is_dir():
        return {}
    found = _index(folder.iterdir(), rf"(.+?)(?:_0000)?{_NIFTI}")
    return {case: path for case, path in found.items() if keep(case)}


def _amos_release(root: Path, labels_dir: Path, keep: Callable[[str], bool]) -> tuple[list, list, list, str]:
    mapping, source = _amos_mapping(root)
    images = {part: _amos_folder(root / f"images{part}", keep) for part in ("Tr", "Va", "Ts")}
    labels = {part: _amos_folder(root / f"labels{part}", keep) for part in ("Tr", "Va")}
    training, test = (_remapped_items(_pairs(images[p], labels[p], root / f"labels{p}"), mapping, labels_dir)
                      for p in ("Tr", "Va"))
    pool = _images(path for part in ("Tr", "Va", "Ts") for _, path in sorted(images[part].items()))
    return training, test, pool, source


def _amos_flat(src: Path, labels_dir: Path) -> tuple[list, list, list, str]:
    mapping, source = _amos_mapping(src)
    images = _index(src.iterdir(), rf"(.+)_ct{_NIFTI}")
    labels = _index(src.iterdir(), rf"(.+)_label_amos15{_NIFTI}")
    training = _remapped_items(_pairs(images, labels, src), mapping, labels_dir)
    return training, [], _images(path for _, path in sorted(images.items())), source


def amos_datalist(src: str | Path, labels_dir: str | Path | None = None, modality: str = "ct") -> dict:
    """Datalist of an AMOS22 release (or flat ``<case>_ct`` / ``<case>_label_amos15`` pairs).

    ``modality="all"`` keeps the MR cases (case number >= 500) too.
    """
    src = _folder(src)
    if modality not in ("ct", "all"):
        raise ValueError(f"modality must be 'ct' or 'all', got {modality!r}")
    labels_dir = Path(labels_dir) if labels_dir is not None else src / LABELS_DIR
    keep = _amos_is_ct if modality == "ct" else (lambda case: True)
    root = next((p.parent for p in sorted(src.rglob("imagesTr")) if p.is_dir()), None)
    if root is not None:
        training, test, pool, source = _amos_release(root, labels_dir, keep)
    else:
        training, test, pool, source = _amos_flat(src, labels_dir)
    if not training and not test:
        raise FileNotFoundError(f"{src}: no labeled AMOS {'CT ' if modality == 'ct' else ''}cases (imagesTr/ + "
                                "labelsTr/, or <case>_ct.nii.gz + <case>_label_amos15.nii.gz)")
    content = _ct_datalist("AMOS22", training, test, pool, "hu" if modality == "ct" else "mixed", source)
    if modality != "ct":
        content["modality"] = modality
    return content


# ---------------------------------------------------------------- totalseg


def _totalseg_subject(folder: Path) -> tuple[Path, Path | None] | None:
    """(CT, multi-label file or None for the masks layout) of a subject folder; None if it is not one."""
    files = sorted(p for p in folder.glob("*.nii*") if p.is_file())
    cts = [p for p in files if "ct" in p.name.lower() and "seg" not in p.name.lower()]
    segs = [p for p in files if "seg" in p.name.lower()]
    masks = (folder / "segmentations").is_dir()
    if not cts or not (masks or segs):
        return None
    if len(cts) > 1 or (not masks and len(segs) > 1):
        raise ValueError(f"{folder}: expected one CT (*ct*.nii.gz) and one label map (*seg*.nii.gz), found "
                         f"{', '.join(p.name for p in cts + segs)}")
    return cts[0], (None if masks else segs[0])


def _merge_masks(folder: Path) -> tuple[np.ndarray, object]:
    """One Synapse-8 label map from ``folder/<organ>.nii.gz`` binary masks; later organs win overlaps."""
    label, like, overlap, absent = None, None, 0, []
    for organ_id, organ in enumerate(TOTALSEG_MASKS, start=1):
        path = next(iter(sorted(folder.glob(f"{organ}.nii*"))), None)
        if path is None:
            absent.append(organ)
            continue
        array, image = _read_label(path)
        mask = array > 0
        if label is None:
            label, like = np.zeros(mask.shape, np.uint8), image
        elif mask.shape != label.shape:
            raise ValueError(f"{path}: mask shape {mask.shape} differs from the other masks' {label.shape}")
        overlap += int(np.count_nonzero(mask & (label > 0)))
        label[mask] = organ_id
    if label is None:
        raise FileNotFoundError(f"{folder}: none of the 8 organ masks ({', '.join(TOTALSEG_MASKS)})")
    if absent:
        logger.warning("%s: no mask for %s: they stay background", folder, ", ".join(absent))
    if overlap:
        logger.warning("%s: %d voxels lie in more than one organ mask; the later organ (Synapse order) wins",
                       folder, overlap)
    return label, like


def totalseg_datalist(src: str | Path, labels_dir: str | Path | None = None) -> dict:
    """Datalist of a TotalSegmentator subject folder or a folder of them (see the module docstring)."""
    src = _folder(src)
    labels_dir = Path(labels_dir) if labels_dir is not None else src / LABELS_DIR
    own = _totalseg_subject(src)
    subjects = [(src, own)] if own else [(folder, found) for folder in sorted(src.iterdir())
                                         if folder.is_dir() and (found := _totalseg_subject(folder))]
    if not subjects:
        raise FileNotFoundError(f"{src}: no TotalSegmentator subject (ct.nii.gz + segmentations/, or *ct*.nii.gz + "
                                "*seg*.nii.gz)")
    training, sources = [], set()
    for folder, (ct, seg) in subjects:
        if seg is None:
            label, like = _merge_masks(folder / "segmentations")
            path = _save_label(label, like, labels_dir / f"{folder.name}.nii.gz")
            training.append({"image": str(ct), "label": str(path)})
            sources.add("totalseg_masks")
        else:
            training += _remapped_items([(folder.name, ct, seg)], LABEL_MAPS["totalseg_to_synapse"], labels_dir)
            sources.add("totalseg_to_synapse")
    return _ct_datalist("TotalSegmentator", training, [], _images(it["image"] for it in training), "hu",
                        "+".join(sorted(sources)))


# ---------------------------------------------------------------- writing and CLI


def _relative(content: dict, base: Path) -> dict:
    def rel(path: str) -> str:
        resolved = Path(path).resolve()
        return os.path.relpath(path, base) if resolved.is_relative_to(base.resolve()) else str(resolved)

    out = dict(content)
    for section in ("training", "validation", "test", "unlabeled"):
        out[section] = [{k: rel(v) for k, v in item.items()} for item in content[section]]
    return out


def write_datalist(content: dict, out: str | Path) -> Path:
    """Write a datalist JSON atomically; paths below its folder become relative."""
    out = Path(out)
    return write_json(out, _relative(content, out.parent))


def merge_datalists(old: dict, new: dict) -> dict:
    """``old`` with the cases of ``new`` added to each section (``convert --append``).

    Raises:
        ValueError: the two differ in kind, classes or intensity, or share an image (a case twice).
    """
    for key in ("kind", "classes", "intensity"):
        if old.get(key) != new.get(key):
            raise ValueError(f"--append: the existing datalist has {key} {old.get(key)!r}, the new cases "
                             f"{new.get(key)!r}; write them to separate datalists")
    merged = dict(old)
    seen = {os.path.realpath(item["image"]) for section in ("training", "validation", "test")
            for item in old.get(section, [])}
    for section in ("training", "validation", "test", "unlabeled"):
        items = list(old.get(section, []))
        have = {os.path.realpath(item["image"]) for item in items}
        for item in new.get(section, []):
            image = os.path.realpath(item["image"])
            if section != "unlabeled" and image in seen:
                raise ValueError(f"--append: {item['image']} is already in the datalist")
            if image not in have:
                items.append(item)
                have.add(image)
        merged[section] = items
    merged["name"] = f"{old.get('name', '?')} + {new.get('name', '?')}"
    sources = [s for s in (old.get("label_source"), new.get("label_source")) if s]
    if sources:
        merged["label_source"] = "+".join(dict.fromkeys("+".join(sources).split("+")))
    return merged


def _absolute(content: dict, base: Path) -> dict:
    """Datalist read from a file in ``base`` with its relative paths made absolute."""
    out = dict(content)
    for section in ("training", "validation", "test", "unlabeled"):
        out[section] = [{k: str((base / v).resolve()) if isinstance(v, str) else v for k, v in item.items()}
                        for item in content.get(section, [])]
    return out


_MR_KINDS = {"la": (la_datalist, 4), "promise12": (promise12_datalist, 3)}
_CT_KINDS = {"synapse": synapse_datalist, "amos": amos_datalist, "totalseg": totalseg_datalist}
KINDS = (*_MR_KINDS, *_CT_KINDS)


def build_datalist(kind: str, src: str | Path, labels_dir: str | Path, validation: int = 0,
                   labeled: int | None = None, modality: str = "ct", evaluation: int = 0) -> dict:
    """The datalist of ``kind`` for folder ``src``; CT label copies go to ``labels_dir``.

    ``labeled=None`` takes the kind's default budget (LA 4, PROMISE12 3); 0 means all labeled scans.
    """
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if modality != "ct" and kind != "amos":
        raise ValueError("--modality applies to --kind amos only")
    if kind in _MR_KINDS:
        build, default = _MR_KINDS[kind]
        return build(src, validation=int(validation), labeled=default if labeled is None else int(labeled),
                     evaluation=int(evaluation))
    if int(validation) or int(evaluation) or (labeled is not None and int(labeled)):
        raise ValueError(f"--validation, --evaluation and --labeled apply to la and promise12; --kind {kind} has no validation "
                         "split and its few-shot selection is done by the training config")
    options = {"modality": modality} if kind == "amos" else {}
    return _CT_KINDS[kind](src, labels_dir=labels_dir, **options)


def main(kind: str, src: str, out: str | None = None, validation: int = 0, labeled: int | None = None,
         modality: str = "ct", append: bool = False, evaluation: int = 0) -> None:
    """CLI entry: write the datalist (default ``SRC/datalist.json``) and print a one-line summary;
    ``append``: add the cases to the datalist already at ``out``.

    Errors print one ``error: ...`` line to stderr and exit with status 2.
    """
    path = Path(out) if out else Path(src) / "datalist.json"
    labels_dir = path.parent / LABELS_DIR
    old = None
    if append:
        if not path.is_file():
            raise FileNotFoundError(f"--append: no datalist at {path} to add to (run convert once without --append)")
        try:
            old = _absolute(json.loads(path.read_text()), path.parent)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"--append: {path} is not a datalist ({err})") from None
    content = build_datalist(kind, src, labels_dir, validation, labeled, modality, evaluation)
    if old is not None:
        content = merge_datalists(old, content)
    write_datalist(content, path)
    counts = ", ".join(f"{len(content[s])} {s}" for s in ("training", "validation", "test", "unlabeled"))
    remapped = f"; labels remapped ({content['label_source']}) into {labels_dir}" if "label_source" in content else ""
    print(f"wrote {path}: {counts}{remapped}")
