"""Volume inference with a bundle's ``inference.yaml`` (SPEC §9).

The bundle config supplies the network, preprocessing (load, orient to RAS, scale), the slice-wise
inferer and the postprocessing (argmax, undo the orientation). This module adds what a user needs
around it: input checks with one-line errors, a progress bar over volumes, outputs that keep the
input's exact shape and affine, and atomic writes that never leave a partial file.

A folder run can be stopped at any point (Ctrl-C, a kill, a full disk): every label file in the
output folder is then complete, because each one appears only when it has been written in full.
Running the same command again without ``--overwrite`` skips the volumes whose label file exists and
segments the rest (the hidden temporary file of a killed run is removed then).

Beside each label file ``<stem>.nii.gz``, on request: ``<stem>_overlay.png`` (a montage of axial and
coronal slices with the labels painted over the image, as the model saw it) and
``<stem>_probabilities.nii.gz`` (the per-class softmax on the input grid, 4-D X x Y x Z x K). Both are
written before the label file, so a label file means its extras are complete. Each volume's label
volumes in millilitres are printed as it finishes.

Big volumes in bounded memory: when every preprocessing step acts on each slice alone (the CT
bundle's: orient, HU window), every post-processing step on each voxel (inversion, casting; a 3-D step
such as keeping the largest component turns this off) and the file's third axis is the slice axis
(axial scans), a volume is
preprocessed, segmented and inverted in slabs of ``slab_slices`` slices, so that no float copy of the
whole volume exists: memory grows with the slice count only by the volume as read and its uint8
label map. Slab and whole-volume runs give the network the same slices (the inferer sees each slice
alone); ``tests/test_inference.py`` compares their labels.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    CastToTyped,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    Orientationd,
)
from monai.utils import ImageMetaKey
from tqdm import tqdm

from samora_components.bundle.cards import apply_card, check_weights, load_weights, read_model_card
from samora_components.bundle.export import ENGINES, build_engine
from samora_components.bundle.inferers import SliceLabelInferer
from samora_components.data.io import (
    VOLUME_SUFFIXES,
    Volume,
    VolumeError,
    check_volume,
    read_volume,
    volume_meta,
    volume_stem,
)
from samora_components.data.transforms import CTWindowd
from samora_components.metrics.plots import label_montage
from samora_components.networks.precision import check_precision
from samora_components.utils import WriteError, atomic_path, first_line, keep_freed_memory, remove_stale_partials

logger = logging.getLogger(__name__)

__all__ = ["BundlePredictor", "Prediction", "check_output", "find_volumes", "label_volumes_ml", "output_path",
           "predict_file", "main"]


#: preprocessing steps that act on each slice alone, so that slabs can be preprocessed one at a time
_SLICEWISE = (LoadImaged, EnsureChannelFirstd, Orientationd, CTWindowd, EnsureTyped)
#: post-processing steps that act on each voxel or slice alone (a 3-D step such as keeping the largest
#: connected component would see one slab at a time, so its presence turns slabs off)
_SLICEWISE_POST = (Invertd, CastToTyped, AsDiscreted, EnsureTyped)


def _keeps_slices(transform) -> bool:
    """Whether a slice-wise preprocessing step keeps the third axis as the slice axis
    (an ``Orientationd`` must put S or I last)."""
    return not isinstance(transform, Orientationd) or str(transform.ornt_transform.axcodes or "")[2:3] in ("S", "I")


@dataclass
class Prediction:
    """One volume's result.

    ``labels``: (X, Y, Z) uint8 on the file's grid. ``probabilities``: (K, X, Y, Z) uint8 softmax x 255 on
    the file's grid, when asked for. ``view``: what the model saw, when asked for: the preprocessed image
    and its labels, both (X', Y', Z') in RAS, and their voxel spacing in mm.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    view: tuple[np.ndarray, np.ndarray, tuple[float, float, float]] | None = None


@dataclass
class BundlePredictor:
    """A bundle's inference pieces, parsed once and reused for every volume."""

    network: torch.nn.Module
    preprocessing: object
    inferer: object
    postprocessing: object
    device: torch.device
    class_names: list[str] | None = None
    #: slices per slab for slice-wise preprocessing (see the module notes); 0: always the whole volume
    slab_slices: int = 32

    @classmethod
    def from_bundle(cls, bundle: str | Path, weights: str | None = None, batch: int | None = None,
                    precision: str | None = None, engine: str = "eager", volumes: int = 1) -> "BundlePredictor":
        """Parse ``bundle/configs/inference.yaml`` and load ``weights`` (default ``models/model.pt``);
        ``precision`` ("auto", "fp32" or "bf16") overrides the config's ``auto``; ``engine`` runs the
        network (:data:`samora_components.bundle.export.ENGINES`; ``auto`` chooses for ``volumes``
        volumes, :func:`~samora_components.bundle.export.choose_engine`)."""
        keep_freed_memory()  # per-batch buffers reused (see utils); the CLI asks too, MONAI Label does not
        bundle = Path(bundle)
        config = bundle / "configs" / "inference.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{bundle}: no configs/inference.yaml (is this a SAMora bundle folder?)")
        weights = check_weights(weights or bundle / "models" / "model.pt")
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(bundle)
        parser["model_file"] = str(weights)
        card = read_model_card(weights)
        apply_card(parser, card)  # the card (same name, .json) describes the network
        if batch:
            parser["inferer#sw_batch_size"] = int(batch)
        if precision:
            parser["precision"] = precision
        network = parser.get_parsed_content("network")
        load_weights(network, weights)  # one-line errors for corrupt files and weights of another network
        network.eval()
        class_names = card.get("class_names") or parser.get("class_names")
        device = parser.get_parsed_content("device")
        if engine != "eager":
            network = build_engine(network, engine, weights, int(parser.get_parsed_content("inferer#sw_batch_size")),
                                   volumes=volumes, device=device)
        return cls(
            network=network,
            preprocessing=parser.get_parsed_content("preprocessing"),
            inferer=parser.get_parsed_content("inferer"),
            postprocessing=parser.get_parsed_content("postprocessing"),
            device=device,
            class_names=[str(n) for n in class_names] if class_names else None,
        )

    @property
    def engine(self) -> str:
        """The engine that runs the network (``auto`` resolved)."""
        return getattr(self.network, "engine", "eager")

    @property
    def display_window(self) -> tuple[float, float] | None:
        """Grey range of the preprocessed image for overlays: [0, 1] after the CT window, else None
        (percentiles)."""
        transforms = getattr(self.preprocessing, "transforms", ())
        return (0.0, 1.0) if any(isinstance(t, CTWindowd) for t in transforms) else None

    def __call__(self, path: str, volume: Volume | None = None) -> np.ndarray:
        """Label array (uint8) for one volume file, on the file's own voxel grid. ``volume``: the
        file already read (:func:`read_volume`), so that it is not read again."""
        return self.predict(path, volume).labels

    def slabs_apply(self, volume: Volume) -> bool:
        """Whether ``volume`` is segmented slab by slab (see the module notes)."""
        transforms = getattr(self.preprocessing, "transforms", ())
        post = getattr(self.postprocessing, "transforms", None)
        return (self.slab_slices > 0 and volume.array.ndim == 3 and volume.array.shape[2] > self.slab_slices
                and isinstance(self.inferer, SliceLabelInferer) and bool(transforms)
                and isinstance(transforms[0], LoadImaged)
                and all(isinstance(t, _SLICEWISE) and _keeps_slices(t) for t in transforms)
                and post is not None and all(isinstance(t, _SLICEWISE_POST) for t in post)
                and nib.aff2axcodes(volume.affine)[2] in ("S", "I"))

    def _labels_of_slabs(self, path: str, volume: Volume) -> np.ndarray:
        """(X, Y, Z) uint8 labels of ``volume``, computed slab by slab along its third axis."""
        depth = volume.array.shape[2]
        labels = np.empty(volume.array.shape, dtype=np.uint8, order="F")  # NIfTI's layout: written without a copy
        seen = total = 0
        starts = range(0, depth, self.slab_slices)  # a progress bar on a terminal only (disable=None)
        for start in tqdm(starts, desc=f"slabs of {self.slab_slices} slices", unit="slab", leave=False, disable=None):
            stop = min(depth, start + self.slab_slices)
            shift = np.eye(4)
            shift[2, 3] = start  # voxel (i, j, k) of the slab is voxel (i, j, start + k) of the volume
            slab = Volume(volume.array[:, :, start:stop], volume.affine @ shift, volume.intensity)
            meta = {**volume_meta(slab), ImageMetaKey.FILENAME_OR_OBJ: str(path)}
            data = self.preprocessing({"image": MetaTensor(np.asarray(slab.array, dtype=np.float32), meta=meta)},
                                      start=1)
            data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0].cpu()
            seen, total = seen + self.inferer.last_counts[0], total + self.inferer.last_counts[1]
            data = self.postprocessing(data)
            labels[:, :, start:stop] = data["pred"].detach().cpu().numpy()[0]
        self.inferer.last_counts = (seen, total)
        return labels

    @torch.no_grad()
    def predict(self, path: str, volume: Volume | None = None, probabilities: bool = False,
                view: bool = False) -> Prediction:
        """Labels of one volume file (see :class:`Prediction`), with its class probabilities and the
        model's view of it when asked for; ``volume`` as for ``__call__``. Slab by slab where
        :meth:`slabs_apply` (neither probabilities nor the view asked for)."""
        if volume is not None and not probabilities and not view and self.slabs_apply(volume):
            return Prediction(self._labels_of_slabs(path, volume))
        transforms = getattr(self.preprocessing, "transforms", ())
        if volume is not None and transforms and isinstance(transforms[0], LoadImaged):
            meta = {**volume_meta(volume), ImageMetaKey.FILENAME_OR_OBJ: str(path)}
            # no local reference to the float32 copy: each preprocessing step frees its input (big volumes)
            data = self.preprocessing({"image": MetaTensor(np.asarray(volume.array, dtype=np.float32), meta=meta)},
                                      start=1)  # what LoadImaged would have given
        else:
            data = self.preprocessing({"image": path})
        keep = getattr(self.inferer, "keep_probabilities", None)
        if probabilities and keep is None:
            raise ValueError("this bundle's inferer cannot keep class probabilities (needs SliceLabelInferer)")
        if keep is not None:
            self.inferer.keep_probabilities = probabilities
        try:
            data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0].cpu()
        finally:
            if keep is not None:
                self.inferer.keep_probabilities = keep
        seen = None
        if view:
            image = data["image"]
            spacing = tuple(float(v) for v in np.asarray(image.pixdim)[:3]) if isinstance(image, MetaTensor) else (1.0,) * 3
            seen = (np.asarray(image[0].detach().cpu().numpy(), dtype=np.float32),
                    np.asarray(data["pred"][0].detach().cpu().numpy(), dtype=np.uint8), spacing)
        if probabilities:
            data["prob"] = MetaTensor(self.inferer.last_probabilities)
            self.inferer.last_probabilities = None
        data = self.postprocessing(data)
        result = Prediction(np.asarray(data["pred"].detach().cpu().numpy()[0], dtype=np.uint8), view=seen)
        if probabilities:  # the same inversion as the labels (orientation: permutes and flips, no interpolation)
            inverted = Invertd(keys="prob", transform=self.preprocessing, orig_keys="image", nearest_interp=True)(data)
            result.probabilities = np.asarray(inverted["prob"].detach().cpu().numpy(), dtype=np.uint8)
        return result


def find_volumes(path: str | Path) -> list[Path]:
    """A volume file, or the volume files in a folder (sorted); UA-MT ``<id>/mri_norm2.h5`` included."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    # hidden files (e.g. an interrupted write's .partial-*) are not inputs; a volume name that is no
    # readable file (a broken link, a symbolic link loop) is kept, so that it is reported, not skipped
    found = sorted(p for p in path.iterdir()
                   if not p.name.startswith(".") and p.name.endswith(VOLUME_SUFFIXES) and not p.is_dir())
    found += sorted(p for p in path.glob("*/mri_norm2.h5"))
    if not found:
        raise FileNotFoundError(f"{path}: no volume files ({', '.join(VOLUME_SUFFIXES)})")
    return found


def output_path(source: Path, output: Path) -> Path:
    """``OUTPUT/<stem>.nii.gz`` for any input format."""
    return output / f"{volume_stem(source)}.nii.gz"


def _nifti_like(array: np.ndarray, source: Path, affine: np.ndarray | None, dtype: type) -> nib.Nifti1Image:
    """``array`` as a NIfTI image on the source's grid: its affine, and its header codes when it is NIfTI."""
    if source.name.endswith((".nii", ".nii.gz")):
        ref = nib.load(str(source))
        header = ref.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(1, 0)
        img = nib.Nifti1Image(array, ref.affine, header)
        img.set_qform(*ref.get_qform(coded=True))
        img.set_sform(*ref.get_sform(coded=True))
        return img
    return nib.Nifti1Image(array, read_volume(source).affine if affine is None else affine)


def save_like(label: np.ndarray, source: Path, target: Path, affine: np.ndarray | None = None) -> None:
    """Write ``label`` with the source's affine (and NIfTI header when the source is NIfTI), atomically;
    ``affine``: the source's, when it has been read already (other formats)."""
    img = _nifti_like(label, source, affine, np.uint8)
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def save_probabilities(probabilities: np.ndarray, source: Path, target: Path, affine: np.ndarray | None = None) -> None:
    """Write class probabilities (K, X, Y, Z) uint8 (x 255) as a 4-D NIfTI (X, Y, Z, K) on the source's
    grid, atomically. NIfTI-1 has no float16 type: values are stored as uint8 with scale 1/255, so
    every reader (nibabel's ``get_fdata``, ITK, 3D Slicer) returns probabilities in [0, 1]."""
    array = np.ascontiguousarray(np.moveaxis(probabilities, 0, -1))
    img = _nifti_like(array, source, affine, np.uint8)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    img.header["intent_name"] = b"probabilities"
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def extra_paths(target: Path) -> dict[str, Path]:
    """Files written beside the label file ``target`` on request: overlay PNG and probabilities."""
    stem = target.name[: -len(".nii.gz")] if target.name.endswith(".nii.gz") else target.stem
    return {"overlay": target.with_name(f"{stem}_overlay.png"),
            "probabilities": target.with_name(f"{stem}_probabilities.nii.gz")}


def label_volumes_ml(label: np.ndarray, affine: np.ndarray, class_names: list[str] | None = None,
                     num_classes: int | None = None) -> dict[str, float]:
    """Volume in millilitres of every foreground class of a label map (X, Y, Z) whose voxel-to-mm map is
    ``affine``; classes named by ``class_names`` (background first), else ``class_<id>``."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    label = np.asarray(label, dtype=np.uint8)
    counts = np.zeros(256, dtype=np.int64)
    for part in np.array_split(label.reshape(-1, order="A"), max(1, label.size // 2**22)):  # bincount casts to int64:
        counts += np.bincount(part, minlength=256)  # counted in pieces of about 4 M voxels, not all at once
    count = len(class_names) if class_names else (num_classes or int(np.flatnonzero(counts).max(initial=0)) + 1)
    names = list(class_names) if class_names else [f"class_{c}" for c in range(count)]
    return {names[c]: round(float(counts[c]) * voxel_ml, 1) for c in range(1, count)}


def predict_file(predictor: BundlePredictor, source: Path, target: Path, overlay: bool = False,
                 probabilities: bool = False, report: bool = False) -> np.ndarray:
    """Check, segment and save one volume (read once); raises :class:`VolumeError` for unusable input.
    ``overlay`` / ``probabilities``: also write the files of :func:`extra_paths` (before the label);
    ``report``: print the volume of each class in mL."""
    volume = read_volume(source)
    array = check_volume(np.asarray(volume.array), str(source))
    try:
        result = predictor.predict(str(source), Volume(array, volume.affine, volume.intensity),
                                   probabilities=probabilities, view=overlay)  # (X, Y, Z), read once
    except Exception as err:
        raise VolumeError(f"{source}: inference failed ({first_line(err)})") from err
    label = result.labels
    if label.shape != array.shape:
        raise VolumeError(f"{source}: prediction shape {label.shape} differs from the image {array.shape}")
    extras = extra_paths(target)
    if probabilities:
        save_probabilities(result.probabilities, source, extras["probabilities"], volume.affine)
    if overlay:
        image, labels, spacing = result.view
        names = dict(enumerate(predictor.class_names)) if predictor.class_names else None
        label_montage(image, labels, spacing, extras["overlay"], class_names=names, window=predictor.display_window,
                      title=volume_stem(source))
    save_like(label.reshape(volume.array.shape), source, target, volume.affine)
    if report:
        volumes = label_volumes_ml(label, volume.affine, predictor.class_names)
        tqdm.write(f"{volume_stem(source)}: " + ", ".join(f"{name} {ml:.1f} mL" for name, ml in volumes.items()))
    return label


def check_output(input: Path, sources: list[Path], output: Path) -> None:
    """Refuse an output folder that is (or lies inside) the input folder, one whose labels would
    replace an input file, and one that cannot be created or written; checked before the model loads.

    Raises:
        ValueError: the output folder overlaps the input.
        WriteError: the output folder cannot be created or written (one line naming it).
    """
    out = Path(os.path.realpath(output))  # realpath: a symbolic link loop among the inputs does not raise here
    if input.is_dir():
        folder = Path(os.path.realpath(input))
        if out == folder or folder in out.parents:
            where = "is" if out == folder else "lies inside"
            raise ValueError(f"--output {output} {where} the input folder {input}: its label files would mix with "
                             "(or replace) the images; choose a folder outside it")
    for source in sources:
        if os.path.realpath(output_path(source, output)) == os.path.realpath(source):
            raise ValueError(f"--output {output} would replace the input {source} with its labels; choose another folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as err:
        raise WriteError(err.errno, f"cannot write into the output folder {output} ({err.strerror or err})") from None


def main(bundle: str, input: str, output: str, weights: str | None = None, overwrite: bool = False, batch: int | None = None,
         precision: str | None = None, engine: str = "auto", overlay: bool = False,
         save_probabilities: bool = False) -> None:
    """CLI: segment a file or folder; one error line per bad input, non-zero exit if any failed (the
    CLI reports errors that stop the whole run, such as a missing bundle, in one line)."""
    sources = find_volumes(input)
    if precision is not None:
        check_precision(precision)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out_dir = Path(output)
    check_output(Path(input), sources, out_dir)
    todo = sum(overwrite or not output_path(source, out_dir).exists() for source in sources)
    predictor = BundlePredictor.from_bundle(bundle, weights, batch, precision, engine, volumes=todo)
    remove_stale_partials(out_dir)
    failed, written, skipped = 0, [], 0
    for source in tqdm(sources, desc="volumes", unit="vol", disable=len(sources) < 2):
        target = output_path(source, out_dir)
        if target.exists() and not overwrite:
            print(f"skip: {target} exists (use --overwrite to replace it)", file=sys.stderr)
            skipped += 1
            continue
        try:
            predict_file(predictor, source, target, overlay=overlay, probabilities=save_probabilities, report=True)
            written.append(target)
        except VolumeError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    for target in written:
        print(f"wrote {target}")
    if failed:
        if len(sources) > 1:
            print(f"error: {failed} of {len(sources)} volumes failed", file=sys.stderr)
        raise SystemExit(1)
