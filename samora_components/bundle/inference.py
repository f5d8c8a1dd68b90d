"""Volume inference with a bundle's ``inference.yaml`` (SPEC §9).

The bundle config supplies the network, preprocessing (load, orient to RAS, scale), the slice-wise
inferer and the postprocessing (argmax, undo the orientation). This module adds what a user needs
around it: input checks with one-line errors, a progress bar over volumes, outputs that keep the
input's exact shape and affine, and atomic writes that never leave a partial file.

A folder run can be stopped at any point (Ctrl-C, a kill, a full disk): every label file in the
output folder is then complete, because each one appears only when it has been written in full.
Running the same command again without ``--overwrite`` skips the volumes whose label file exists and
segments the rest (the hidden temporary file of a killed run is removed then).
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
from monai.transforms import LoadImaged
from monai.utils import ImageMetaKey
from tqdm import tqdm

from samora_components.bundle.cards import apply_card, check_weights, load_weights, read_model_card
from samora_components.bundle.export import ENGINES, build_engine
from samora_components.data.io import (
    VOLUME_SUFFIXES,
    Volume,
    VolumeError,
    check_volume,
    read_volume,
    volume_meta,
    volume_stem,
)
from samora_components.networks.precision import check_precision
from samora_components.utils import WriteError, atomic_path, first_line, keep_freed_memory, remove_stale_partials

logger = logging.getLogger(__name__)

__all__ = ["BundlePredictor", "check_output", "find_volumes", "output_path", "predict_file", "main"]


@dataclass
class BundlePredictor:
    """A bundle's inference pieces, parsed once and reused for every volume."""

    network: torch.nn.Module
    preprocessing: object
    inferer: object
    postprocessing: object
    device: torch.device

    @classmethod
    def from_bundle(cls, bundle: str | Path, weights: str | None = None, batch: int | None = None,
                    precision: str | None = None, engine: str = "eager") -> "BundlePredictor":
        """Parse ``bundle/configs/inference.yaml`` and load ``weights`` (default ``models/model.pt``);
        ``precision`` ("auto", "fp32" or "bf16") overrides the config's ``auto``; ``engine`` runs the
        network (:data:`samora_components.bundle.export.ENGINES`)."""
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
        apply_card(parser, read_model_card(weights))  # the card (same name, .json) describes the network
        if batch:
            parser["inferer#sw_batch_size"] = int(batch)
        if precision:
            parser["precision"] = precision
        network = parser.get_parsed_content("network")
        load_weights(network, weights)  # one-line errors for corrupt files and weights of another network
        network.eval()
        if engine != "eager":
            network = build_engine(network, engine, weights, int(parser.get_parsed_content("inferer#sw_batch_size")))
        return cls(
            network=network,
            preprocessing=parser.get_parsed_content("preprocessing"),
            inferer=parser.get_parsed_content("inferer"),
            postprocessing=parser.get_parsed_content("postprocessing"),
            device=parser.get_parsed_content("device"),
        )

    @torch.no_grad()
    def __call__(self, path: str, volume: Volume | None = None) -> np.ndarray:
        """Label array (uint8) for one volume file, on the file's own voxel grid. ``volume``: the
        file already read (:func:`read_volume`), so that it is not read again."""
        transforms = getattr(self.preprocessing, "transforms", ())
        if volume is not None and transforms and isinstance(transforms[0], LoadImaged):
            meta = {**volume_meta(volume), ImageMetaKey.FILENAME_OR_OBJ: str(path)}
            # no local reference to the float32 copy: each preprocessing step frees its input (big volumes)
            data = self.preprocessing({"image": MetaTensor(np.asarray(volume.array, dtype=np.float32), meta=meta)},
                                      start=1)  # what LoadImaged would have given
        else:
            data = self.preprocessing({"image": path})
        data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0].cpu()
        data = self.postprocessing(data)
        return np.asarray(data["pred"].detach().cpu().numpy()[0], dtype=np.uint8)


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


def save_like(label: np.ndarray, source: Path, target: Path, affine: np.ndarray | None = None) -> None:
    """Write ``label`` with the source's affine (and NIfTI header when the source is NIfTI), atomically;
    ``affine``: the source's, when it has been read already (other formats)."""
    if source.name.endswith((".nii", ".nii.gz")):
        ref = nib.load(str(source))
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        img = nib.Nifti1Image(label, ref.affine, header)
        img.set_qform(*ref.get_qform(coded=True))
        img.set_sform(*ref.get_sform(coded=True))
    else:
        img = nib.Nifti1Image(label, read_volume(source).affine if affine is None else affine)
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))


def predict_file(predictor: BundlePredictor, source: Path, target: Path) -> np.ndarray:
    """Check, segment and save one volume (read once); raises :class:`VolumeError` for unusable input."""
    volume = read_volume(source)
    array = check_volume(np.asarray(volume.array), str(source))
    try:
        label = predictor(str(source), Volume(array, volume.affine, volume.intensity))  # (X, Y, Z), read once
    except Exception as err:
        raise VolumeError(f"{source}: inference failed ({first_line(err)})") from err
    if label.shape != array.shape:
        raise VolumeError(f"{source}: prediction shape {label.shape} differs from the image {array.shape}")
    save_like(label.reshape(volume.array.shape), source, target, volume.affine)
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
         precision: str | None = None, engine: str = "eager") -> None:
    """CLI: segment a file or folder; one error line per bad input, non-zero exit if any failed (the
    CLI reports errors that stop the whole run, such as a missing bundle, in one line)."""
    sources = find_volumes(input)
    if precision is not None:
        check_precision(precision)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out_dir = Path(output)
    check_output(Path(input), sources, out_dir)
    predictor = BundlePredictor.from_bundle(bundle, weights, batch, precision, engine)
    remove_stale_partials(out_dir)
    failed, written, skipped = 0, [], 0
    for source in tqdm(sources, desc="volumes", unit="vol", disable=len(sources) < 2):
        target = output_path(source, out_dir)
        if target.exists() and not overwrite:
            print(f"skip: {target} exists (use --overwrite to replace it)", file=sys.stderr)
            skipped += 1
            continue
        try:
            predict_file(predictor, source, target)
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
