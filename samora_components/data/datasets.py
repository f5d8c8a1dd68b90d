"""Datalists and the 2-D slice dataset used by every training stage (SPEC §7).

A dataset is a MONAI datalist JSON with ``training``/``validation``/``test`` items
``{"image", "label"}`` and ``unlabeled`` items ``{"image"}``; paths are relative to the JSON's
folder (or absolute). Volumes pass through a MONAI volume pipeline (load, orient, intensity
scaling, label remap) and are cut into axial slices, which are kept in memory after a deterministic
per-slice step (e.g. resizing to the model input); random augmentation runs per draw.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor, load_decathlon_datalist
from torch.utils.data import Dataset
from tqdm import tqdm

from samora_components.data.io import axial_slices, check_same_grid, volume_stem
from samora_components.utils import write_json

logger = logging.getLogger(__name__)

__all__ = ["read_datalist", "SliceDataset", "VolumeSlices", "select_few_shot", "check_training_volume"]


def read_datalist(datalist: str, section: str, base_dir: str | None = None) -> list[dict]:
    """Items of one section with absolute paths; an absent or empty section gives ``[]``.

    A missing datalist is an error that says how to make one (nothing is generated behind the
    user's back: the synthetic phantom is written only by ``make demo`` / the ``phantom`` command)."""
    if not Path(datalist).is_file():
        raise FileNotFoundError(
            f"datalist not found: {datalist}. Pass --dataset_dir DIR (holding datalist.json) or --datalist FILE; "
            "write one with `python -m samora_components convert --kind ... --src DIR`, or a synthetic one with "
            "`python -m samora_components phantom --out DIR --kind ct|mr`")
    try:
        with open(datalist, encoding="utf-8") as handle:
            content = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"datalist {datalist} is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise ValueError(f"datalist {datalist} holds a {type(content).__name__}, not an object of sections")
    if not content.get(section):
        return []
    base = base_dir or os.path.dirname(os.path.abspath(datalist))
    _check_section(content, section, datalist, base)
    return load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=section, base_dir=base)


#: sections whose cases must be distinct from each other's (the unlabeled pool may repeat training images)
_SPLITS = ("training", "validation", "test")


def _section_paths(content: dict, section: str, datalist: str) -> list[dict]:
    items = content.get(section) or []
    if not isinstance(items, list):
        raise ValueError(f"datalist {datalist}: section '{section}' is a {type(items).__name__}, not a list of items")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise ValueError(f"datalist {datalist}: item {index} of '{section}' has no 'image' path")
    return items


def _check_section(content: dict, section: str, datalist: str, base: str) -> None:
    """One-line errors for a section that names files that do not exist, lists a case twice, or shares
    a case with another of training / validation / test (a score on training data)."""
    items = _section_paths(content, section, datalist)

    def resolve(path: str) -> Path:
        return Path(path if os.path.isabs(path) else os.path.join(base, path))

    missing = [str(resolve(item[key])) for item in items for key in ("image", "label")
               if isinstance(item.get(key), str) and not resolve(item[key]).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
        raise FileNotFoundError(f"datalist {datalist}: {len(missing)} file(s) of '{section}' not found: {shown}")
    cases: dict[Path, str] = {}
    for item in items:  # a case is a file (TotalSegmentator names every image ct.nii.gz, so not a name)
        image = resolve(item["image"]).resolve()
        if image in cases:
            raise ValueError(f"datalist {datalist}: {item['image']} appears twice in '{section}' (also as {cases[image]}); "
                             "list each case once")
        cases[image] = item["image"]
    if section in _SPLITS:
        for other in (s for s in _SPLITS if s != section):
            shared = sorted(str(cases[p]) for p in set(cases) & {resolve(it["image"]).resolve()
                                                                 for it in _section_paths(content, other, datalist)})
            if shared:
                raise ValueError(f"datalist {datalist}: {shared[0]} is in both '{section}' and '{other}' "
                                 f"({len(shared)} shared); the sections must not overlap")


def check_training_volume(volume: dict, item: dict, num_classes: int | None = None) -> None:
    """A loaded training volume: finite image voxels, label values among the classes."""
    image = volume.get("image")
    if image is not None and image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError(f"{item['image']}: image contains NaN or infinite voxels")
    label = volume.get("label")
    if label is not None and num_classes is not None and label.numel():
        low, high = float(label.min()), float(label.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{item.get('label')}: label values {low:g}..{high:g} outside the {num_classes} classes "
                             f"(0..{num_classes - 1}); set --label_map, or num_classes")


def select_few_shot(counts: Sequence[int], fraction: float = 1.0, seed: int = 0, first_cases: int | None = None) -> list[tuple[int, int]]:
    """Choose (case, slice) pairs: all slices of the first ``first_cases`` cases, then a seeded
    random ``fraction`` of the remaining slices (SPEC §7: 10 % of Synapse slices, LA first 4 scans)."""
    cases = range(len(counts)) if first_cases is None else range(min(first_cases, len(counts)))
    pairs = [(c, z) for c in cases for z in range(counts[c])]
    if fraction >= 1.0:
        return pairs
    rng = random.Random(seed)
    keep = max(1, round(fraction * len(pairs)))
    return sorted(rng.sample(pairs, keep))


def _plain(t: torch.Tensor) -> torch.Tensor:
    # slices drop the volume's 3-D geometry: 2-D transforms start from a plain tensor
    return (t.as_tensor() if isinstance(t, MetaTensor) else t).clone()


class SliceDataset(Dataset):
    """Axial slices of a list of volumes, held in memory.

    Args:
        data: datalist items (``image`` and optionally ``label`` paths).
        volume_transform: maps an item to ``{"image": (1, X, Y, Z), "label": (1, X, Y, Z)}`` tensors,
            axial axis last (e.g. LoadImaged, EnsureChannelFirstd, Orientationd("RAS"), scaling).
        slice_transform: deterministic transform applied once per slice dict of (1, X, Y) tensors.
        augment: random transform applied at every draw.
        fraction / seed / first_cases: few-shot slice selection (:func:`select_few_shot`).
        subset_file: if given, the chosen (case, slice) list is written there as JSON.
        keys: keys to slice ("image", "label").
        num_classes: when given, label values outside 0..num_classes-1 are an error (else the loss
            fails mid-run on its one-hot encoding).

    Before anything is loaded, every image and its label must lie on the same voxel grid (shape and
    affine from the headers); a loaded image must be finite.

    Each item is ``{"image": (1, H, W) float, "label": (1, H, W)}`` plus ``case`` and ``slice``.
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable,
        slice_transform: Callable | None = None,
        augment: Callable | None = None,
        fraction: float = 1.0,
        seed: int = 0,
        first_cases: int | None = None,
        subset_file: str | None = None,
        keys: Sequence[str] = ("image", "label"),
        progress: bool = True,
        num_classes: int | None = None,
    ) -> None:
        if not data:
            raise ValueError("SliceDataset got no volumes: check the datalist section")
        self.augment = augment
        self.keys = tuple(keys)
        names = [os.path.basename(str(item["image"])) for item in data]
        # slice counts from the headers: only the volumes that hold chosen slices are loaded (the
        # Synapse few-shot protocol keeps 221 of 2,211 slices)
        counts = [axial_slices(str(item["image"])) for item in data]
        for item in data:
            if "label" in self.keys and "label" in item:
                check_same_grid(str(item["image"]), str(item["label"]))
        self.pairs = select_few_shot(counts, fraction, seed, first_cases)
        chosen: dict[int, list[int]] = {}
        for c, z in self.pairs:
            chosen.setdefault(c, []).append(z)
        self.items: list[dict] = []
        for c in tqdm(sorted(chosen), desc="loading volumes", disable=not progress, leave=False):
            loaded = volume_transform(dict(data[c]))
            volume = {k: torch.as_tensor(loaded[k]) for k in self.keys}
            check_training_volume(volume, data[c], num_classes)
            depth = volume[self.keys[0]].shape[-1]
            if depth != counts[c]:
                raise ValueError(f"{data[c]['image']}: {depth} axial slices after loading, {counts[c]} in its header")
            for z in chosen[c]:
                item = {k: _plain(volume[k][..., z]) for k in self.keys}
                if slice_transform is not None:
                    item = slice_transform(item)
                item = {k: torch.as_tensor(v).contiguous() for k, v in item.items() if k in self.keys}
                item.update(case=names[c], slice=z)
                self.items.append(item)
        if subset_file:
            write_json(subset_file, [{"case": names[c], "slice": z} for c, z in self.pairs])
        logger.info("slice dataset: %d slices from %d volumes", len(self.items), len(chosen))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.items[index])
        if self.augment is not None:
            item = self.augment(item)
        return item


class VolumeSlices(Dataset):
    """Axial slices of a pool of volumes, cut on the fly (the unlabeled pool of stage 1).

    Only the headers are read up front (:func:`samora_components.data.io.axial_slices`); a volume is
    loaded through ``volume_transform`` the first time one of its slices is drawn and kept in a
    least-recently-used cache of ``cache_volumes`` volumes (per data-loader worker).

    Args:
        data: datalist items with an ``image`` path (``unlabeled`` section).
        volume_transform: maps ``{"image": path}`` to ``{"image": (1, X, Y, Z)}``, axial axis last
            (load, orient to RAS, intensity scaling).
        slice_transform: applied to every drawn ``{"image": (1, X, Y)}`` slice (resize, augmentation).
        cache_volumes: volumes kept in memory.

    Each item is the slice dict after ``slice_transform`` plus ``case`` and ``slice``.
    """

    def __init__(
        self,
        data: Sequence[dict],
        volume_transform: Callable,
        slice_transform: Callable | None = None,
        cache_volumes: int = 64,
    ) -> None:
        if not data:
            raise ValueError("VolumeSlices got no volumes: is the datalist's 'unlabeled' section empty?")
        self.paths = [str(item["image"]) for item in data]
        self.volume_transform = volume_transform
        self.slice_transform = slice_transform
        self.cache_volumes = max(1, int(cache_volumes))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.index = [(v, z) for v, path in enumerate(self.paths) for z in range(axial_slices(path))]
        logger.info("unlabeled pool: %d slices from %d volumes", len(self.index), len(self.paths))

    def __len__(self) -> int:
        return len(self.index)

    def _volume(self, v: int) -> torch.Tensor:
        if v in self._cache:
            self._cache.move_to_end(v)
            return self._cache[v]
        image = _plain(torch.as_tensor(self.volume_transform({"image": self.paths[v]})["image"]))
        check_training_volume({"image": image}, {"image": self.paths[v]})
        self._cache[v] = image
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return image

    def __getitem__(self, index: int) -> dict:
        v, z = self.index[index]
        volume = self._volume(v)
        if z >= volume.shape[-1]:
            raise IndexError(f"{self.paths[v]}: slice {z} beyond the {volume.shape[-1]} axial slices after orientation")
        item = {"image": volume[..., z].clone()}
        if self.slice_transform is not None:
            item = dict(self.slice_transform(item))
        item["image"] = torch.as_tensor(item["image"]).contiguous()
        for key in [k for k in item if k != "image" and isinstance(item[k], torch.Tensor)]:
            item[key] = torch.as_tensor(item[key]).contiguous()
        item.update(case=volume_stem(self.paths[v]), slice=z)
        return item
