"""Datalists for public MR releases laid out as downloaded (SPEC §7).

``python -m samora_components convert --kind la|promise12 --src DIR [--out DIR/datalist.json]
[--validation N]``

``la``
    The 2018 Atrial Segmentation Challenge in the UA-MT release: ``<ID>/mri_norm2.h5`` folders (any
    depth under ``DIR``) with ``train.list`` / ``test.list`` next to them. Without the lists the
    sorted ids are split 80/20. Training scans keep the list order, so ``first_cases: 4`` picks the
    "5 % labeled" protocol; scans whose file has no ``label`` array go to ``unlabeled`` only.
``promise12``
    PROMISE12 training data: ``CaseNN.mhd`` (or ``.nii.gz``) with ``CaseNN_segmentation.*``; sorted
    cases split 40/10 (``first_cases: 3`` is the 7.5 % protocol).

Every training image (labeled or not) except the validation scans is also listed under
``unlabeled``, the pool of stage 1. ``--validation N`` moves the last N *labeled* training scans
among the first ``--labeled`` ones into ``validation`` (a split of the few labeled scans for your
own checks). Paths are written relative to the datalist's folder when they lie below it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["la_datalist", "promise12_datalist", "write_datalist", "main"]

_MR_SUFFIXES = (".mhd", ".nii.gz", ".nii", ".mha")


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _has_label(h5: Path) -> bool:
    import h5py

    with h5py.File(h5, "r") as handle:
        return "label" in handle


def _split(items: list, labeled: int | None, validation: int) -> tuple[list, list]:
    """Move the last ``validation`` of the first ``labeled`` labeled items to a validation list."""
    with_label = [i for i, item in enumerate(items) if "label" in item]
    pool = with_label[:labeled] if labeled else with_label
    if validation >= len(pool) and validation:
        raise ValueError(f"cannot hold out {validation} of {len(pool)} labeled training scans")
    held = set(pool[len(pool) - validation :]) if validation else set()
    return [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held]


def la_datalist(src: str | Path, validation: int = 0, labeled: int | None = 4) -> dict:
    """Datalist of an LA (UA-MT layout) folder; see the module docstring."""
    src = Path(src)
    found = {p.parent.name: p for p in sorted(src.rglob("mri_norm2.h5"))}
    if not found:
        raise FileNotFoundError(f"{src}: no <ID>/mri_norm2.h5 files (UA-MT layout)")
    lists = {name: next(iter(sorted(src.rglob(f"{name}.list"))), None) for name in ("train", "test")}
    if lists["train"] is not None:
        train_ids = _read_list(lists["train"])
        test_ids = _read_list(lists["test"]) if lists["test"] is not None else []
    else:
        ids = sorted(found)
        cut = round(0.8 * len(ids))
        train_ids, test_ids = ids[:cut], ids[cut:]
    missing = [i for i in train_ids + test_ids if i not in found]
    if missing:
        logger.warning("%d listed scans are not under %s (e.g. %s); they are left out", len(missing), src, missing[:3])
    training, pool = [], []
    for scan in (i for i in train_ids if i in found):
        path = str(found[scan])
        pool.append({"image": path})
        if _has_label(found[scan]):
            training.append({"image": path, "label": path})
    test = [{"image": str(found[i]), "label": str(found[i])} for i in test_ids if i in found and _has_label(found[i])]
    training, valid = _split(training, labeled, validation)
    held = {v["image"] for v in valid}
    return {"name": "LA 2018 (UA-MT release)", "kind": "mr", "classes": ["background", "left_atrium"],
            "training": training, "validation": valid, "test": test,
            "unlabeled": [p for p in pool if p["image"] not in held]}


def promise12_datalist(src: str | Path, validation: int = 0, labeled: int | None = 3) -> dict:
    """Datalist of a PROMISE12 training folder; see the module docstring."""
    src = Path(src)
    images = {}
    for path in sorted(src.rglob("*")):
        name = path.name
        match = re.fullmatch(r"(Case\d+)(" + "|".join(re.escape(s) for s in _MR_SUFFIXES) + ")", name, re.IGNORECASE)
        if match:
            images.setdefault(match.group(1), path)
    if not images:
        raise FileNotFoundError(f"{src}: no CaseNN.mhd / CaseNN.nii.gz images (PROMISE12 layout)")
    items = []
    for case, image in sorted(images.items()):
        labels = [image.with_name(f"{case}_segmentation{s}") for s in _MR_SUFFIXES]
        label = next((p for p in labels if p.is_file()), None)
        items.append({"image": str(image), "label": str(label)} if label else {"image": str(image)})
    labeled_items = [it for it in items if "label" in it]
    cut = round(0.8 * len(labeled_items))
    training, test = labeled_items[:cut], labeled_items[cut:]
    training, valid = _split(training, labeled, validation)
    held = {v["image"] for v in valid}
    pool = [{"image": it["image"]} for it in items if it not in test and it["image"] not in held]
    return {"name": "PROMISE12", "kind": "mr", "classes": ["background", "prostate"],
            "training": training, "validation": valid, "test": test, "unlabeled": pool}


def _relative(content: dict, base: Path) -> dict:
    out = dict(content)
    for section in ("training", "validation", "test", "unlabeled"):
        out[section] = [
            {k: (os.path.relpath(v, base) if Path(v).resolve().is_relative_to(base.resolve()) else str(Path(v).resolve()))
             for k, v in item.items()}
            for item in content[section]
        ]
    return out


def write_datalist(content: dict, out: str | Path) -> Path:
    """Write a datalist JSON atomically; paths below its folder become relative."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(_relative(content, out.parent), indent=2) + "\n")
    tmp.replace(out)
    return out


def main(kind: str, src: str, out: str | None = None, validation: int = 0, labeled: int | None = None) -> None:
    """CLI entry: write the datalist and print a one-line summary."""
    builders = {"la": (la_datalist, 4), "promise12": (promise12_datalist, 3)}
    if kind not in builders:
        print(f"error: --kind must be one of {', '.join(builders)}", file=sys.stderr)
        raise SystemExit(2)
    build, default_labeled = builders[kind]
    try:
        content = build(src, validation=int(validation), labeled=default_labeled if labeled is None else int(labeled))
        path = write_datalist(content, out or Path(src) / "datalist.json")
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = ", ".join(f"{len(content[s])} {s}" for s in ("training", "validation", "test", "unlabeled"))
    print(f"wrote {path}: {counts}")
