"""Reading and writing volumes: NIfTI, MetaImage, TransUNet Synapse and UA-MT LA files (SPEC §7).

Two entry points:

* :func:`read_volume` returns a plain ``Volume`` (array, affine) for evaluation and checks.
* :class:`H5Reader` / :class:`NpzReader` / :class:`MetaImageReader` are MONAI ``ImageReader``
  classes, so ``LoadImaged(reader=[...])`` in bundle configs reads every supported format.

HDF5 (``mri_norm2.h5``, ``caseXXXX.npy.h5``) and npz (``caseXXXX_sliceNNN.npz``) files carry no
geometry: they get an identity affine (1 mm voxels). UA-MT LA arrays are (X, Y, Z) and slice along Z;
TransUNet Synapse volumes are stored (Z, Y, X) and are transposed to (X, Y, Z) on reading; a
TransUNet slice (Y, X) becomes a one-slice volume (X, Y, 1).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from samora_components.utils import first_line

__all__ = [
    "Volume",
    "VolumeError",
    "INTENSITY_META",
    "read_volume",
    "check_volume",
    "H5Reader",
    "NpzReader",
    "MetaImageReader",
    "VOLUME_SUFFIXES",
    "volume_stem",
    "readers",
    "volume_meta",
    "axial_slices",
]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha", ".h5", ".npz")


class VolumeError(ValueError):
    """A file that cannot be used as a volume; the message is meant for the user, on one line."""


#: metadata key of MONAI MetaTensors (and :class:`Volume` field) saying what a file's intensities are:
#: ``"scaled01"`` for TransUNet Synapse files (already clipped to [-125, 275] HU and scaled to [0, 1]);
#: absent for files holding raw values (HU for CT)
INTENSITY_META = "samora_intensity"


@dataclass
class Volume:
    """An array (X, Y, Z[, ...]) with its 4x4 voxel-to-world affine (RAS, mm) and, when the format
    says so, what its intensities already are (see :data:`INTENSITY_META`)."""

    array: np.ndarray
    affine: np.ndarray
    intensity: str | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def volume_stem(path: str | Path) -> str:
    """File name without its volume suffix ("case01.nii.gz" -> "case01"); UA-MT files use their folder."""
    path = Path(path)
    name = path.name
    if name == "mri_norm2.h5":
        return path.parent.name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)].removesuffix(".npy")
    return path.stem


def _is_h5(path: str) -> bool:
    return str(path).endswith(".h5")


def _h5_array(path: str, key: str) -> np.ndarray:
    """The ``key`` array of an h5 file (only that one is read)."""
    import h5py

    with h5py.File(path, "r") as handle:
        if key not in handle:
            raise VolumeError(f"{path}: no '{key}' array (has {sorted(handle.keys())})")
        return np.asarray(handle[key])


def _orient_h5(array: np.ndarray, path: str) -> np.ndarray:
    # TransUNet stores (Z, Y, X); UA-MT stores (X, Y, Z)
    return np.ascontiguousarray(np.transpose(array, (2, 1, 0))) if str(path).endswith(".npy.h5") else array


def read_volume(path: str | Path, key: str = "image") -> Volume:
    """Read one volume. ``key`` chooses the array in h5/npz files ("image" or "label").

    Raises:
        VolumeError: with a one-line reason for unreadable, corrupt or non-image files.
    """
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{path}: no such file")
    if p.is_dir():
        raise VolumeError(f"{path}: is a folder, not a volume file")
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            return Volume(np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64))
        if path.endswith((".mhd", ".mha")):
            import SimpleITK as sitk

            img = sitk.ReadImage(path)
            return Volume(np.transpose(sitk.GetArrayFromImage(img)), _sitk_affine(img))
        if _is_h5(path):
            array = _orient_h5(_h5_array(path, key), path)
            return Volume(array, np.eye(4), "scaled01" if path.endswith(".npy.h5") else None)
        if path.endswith(".npz"):
            with np.load(path) as data:
                if key not in data:
                    raise VolumeError(f"{path}: no '{key}' array (has {sorted(data.files)})")
                array = np.asarray(data[key])
            if array.ndim == 2:  # a TransUNet slice (Y, X) -> (X, Y, 1)
                array = np.ascontiguousarray(array.T)[..., None]
            return Volume(array, np.eye(4), "scaled01")
    except VolumeError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise VolumeError(f"{path}: truncated or corrupt file ({err})") from None
    except PermissionError:
        raise VolumeError(f"{path}: permission denied") from None
    except Exception as err:  # readers raise many types for bad files
        reason = first_line(err)
        raise VolumeError(f"{path}: not a readable volume ({reason})") from None
    raise VolumeError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")


def axial_slices(path: str | Path, key: str = "image") -> int:
    """Number of axial slices of a volume file once oriented to RAS, read from its header only.

    Used to index an unlabeled pool without loading it. NIfTI and MetaImage use their orientation;
    h5/npz arrays (no geometry) slice along their last axis after :func:`read_volume`'s transposition.
    """
    path = str(path)
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            codes = nib.aff2axcodes(img.affine)
            return int(img.shape[[c in ("S", "I") for c in codes].index(True)])
        if path.endswith((".mhd", ".mha")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            direction = np.asarray(reader.GetDirection()).reshape(3, 3)
            axis = int(np.argmax(np.abs(direction[2])))  # array axis that moves most along z (S/I)
            return int(reader.GetSize()[axis])
        if _is_h5(path):
            import h5py

            with h5py.File(path, "r") as handle:
                if key not in handle:
                    raise VolumeError(f"{path}: no '{key}' array (has {sorted(handle.keys())})")
                shape = handle[key].shape
            return int(shape[0] if path.endswith(".npy.h5") else shape[-1])
        if path.endswith(".npz"):
            return 1
    except VolumeError:
        raise
    except Exception as err:
        reason = first_line(err)
        raise VolumeError(f"{path}: not a readable volume ({reason})") from None
    raise VolumeError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")


def check_volume(array: np.ndarray, path: str = "") -> np.ndarray:
    """Validate an image array for slice-wise inference and return it as (X, Y, Z).

    Accepts 3-D arrays and 4-D arrays whose extra axes are singletons.
    """
    prefix = f"{path}: " if path else ""
    if array.size == 0:
        raise VolumeError(f"{prefix}empty image (shape {array.shape})")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{prefix}expected a 3-D volume, got a {array.ndim}-D array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(f"{prefix}voxel type {array.dtype} is not a real number type")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise VolumeError(f"{prefix}image contains NaN or infinite voxels")
    return array


def volume_meta(volume: Volume, channel_dim: int | None = None) -> dict:
    """The MONAI metadata ``LoadImage`` attaches to a volume read by our readers: affine (RAS),
    spatial shape, channel layout and, when known, what the intensities already are."""
    meta = {
        MetaKeys.AFFINE: volume.affine.copy(),
        MetaKeys.ORIGINAL_AFFINE: volume.affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(np.shape(volume.array)),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel" if channel_dim is None else channel_dim,
    }
    if volume.intensity:
        meta[INTENSITY_META] = volume.intensity
    return meta


def _sitk_affine(img: Any) -> np.ndarray:
    """LPS direction/spacing/origin of a SimpleITK image -> RAS affine for (X, Y, Z) arrays."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


class _ArrayReader(ImageReader):
    """Shared MONAI reader plumbing for formats read through :func:`read_volume`."""

    suffixes: tuple[str, ...] = ()

    def __init__(self, key: str = "image", channel_dim: int | None = None) -> None:
        super().__init__()
        self.key = key
        self.channel_dim = channel_dim

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(str(n).endswith(self.suffixes) for n in names)

    def read(self, data, **kwargs):
        names = [data] if isinstance(data, (str, Path)) else list(data)
        return [read_volume(n, kwargs.get("key", self.key)) for n in names]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        vols = img if isinstance(img, list) else [img]
        arrays = [np.asarray(v.array) for v in vols]
        return (np.stack(arrays) if len(arrays) > 1 else arrays[0]), volume_meta(vols[0], self.channel_dim)


class H5Reader(_ArrayReader):
    """UA-MT (``mri_norm2.h5``, (X, Y, Z)) and TransUNet (``caseXXXX.npy.h5``, (Z, Y, X)) volumes.

    Use one instance per key: ``H5Reader(key="image")`` for images, ``H5Reader(key="label")``.
    """

    suffixes = (".h5",)


class NpzReader(_ArrayReader):
    """TransUNet training slices (``caseXXXX_sliceNNN.npz``, 2-D arrays under image/label)."""

    suffixes = (".npz",)


class MetaImageReader(_ArrayReader):
    """MetaImage (.mhd/.mha, e.g. PROMISE12) through SimpleITK, converted to RAS."""

    suffixes = (".mhd", ".mha")


def readers(key: str = "image") -> list[ImageReader]:
    """SAMora's readers for ``LoadImage(d)(reader=...)``: h5, npz and MetaImage, reading ``key``.

    MONAI keeps its own readers (NIfTI through nibabel) behind these.
    """
    return [H5Reader(key=key), NpzReader(key=key), MetaImageReader(key=key)]
