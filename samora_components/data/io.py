"""Reading and writing volumes: NIfTI, MetaImage, TransUNet Synapse and UA-MT LA files (SPEC §7).

Two entry points:

* :func:`read_volume` returns a plain ``Volume`` (array, affine) for evaluation and checks.
* :class:`H5Reader` / :class:`NpzReader` / :class:`MetaImageReader` are MONAI ``ImageReader``
  classes, so ``LoadImaged(reader=[...])`` in bundle configs reads every supported format.

Every reader first checks the file's header (:func:`read_header`, :func:`check_header`): a volume
larger than :func:`max_voxels` (environment variable ``SAMORA_MAX_VOXELS``, default 2e9 voxels) is
refused before any voxel is read, and so is a geometry no scanner writes (voxel spacing outside
[0.001, 1000] mm, a singular affine, voxel axes less than 60 degrees apart).

HDF5 (``mri_norm2.h5``, ``caseXXXX.npy.h5``) and npz (``caseXXXX_sliceNNN.npz``) files carry no
geometry: they get an identity affine (1 mm voxels). UA-MT LA arrays are (X, Y, Z) and slice along Z;
TransUNet Synapse volumes are stored (Z, Y, X) and are transposed to (X, Y, Z) on reading; a
TransUNet slice (Y, X) becomes a one-slice volume (X, Y, 1).
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
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
    "read_header",
    "check_header",
    "check_volume",
    "check_same_grid",
    "max_voxels",
    "MAX_VOXELS_ENV",
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


#: environment variable: the most voxels a volume may have (checked from the header, before reading)
MAX_VOXELS_ENV = "SAMORA_MAX_VOXELS"
#: 2e9 voxels: above a whole-body CT at 0.5 mm (about 1e9), 8 GB as float32; larger headers are
#: broken or need a machine sized for them (raise the limit there)
DEFAULT_MAX_VOXELS = 2_000_000_000
#: voxel spacing (mm) a header may give; outside it the header is broken (or not in mm)
SPACING_RANGE = (1e-3, 1e3)
#: voxel axes closer than 60 degrees (|cos| above 0.5) are a broken affine; smaller shears (e.g. a
#: CT gantry tilt) are kept as they are: the labels are written on the same grid
_MAX_AXIS_COS = 0.5


def max_voxels() -> int:
    """The voxel limit of every volume read: ``$SAMORA_MAX_VOXELS`` (e.g. ``5e9``), default 2e9."""
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{MAX_VOXELS_ENV}={value!r} is not a number of voxels (e.g. 5e9)") from None
    if not math.isfinite(limit) or limit < 1:
        raise ValueError(f"{MAX_VOXELS_ENV}={value!r}: the voxel limit must be a positive number")
    return int(limit)


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


#: bytes decompressed per read of a gzipped NIfTI (below glibc's mmap threshold as set by utils)
_GZIP_CHUNK = 16 * 2**20


def _nifti_array(img: Any, path: str) -> np.ndarray:
    """The voxels of a NIfTI image, as nibabel gives them. An unscaled ``.nii.gz`` is decompressed
    straight into the array, chunk by chunk: nibabel reads it whole into a temporary first, so that
    a 512 x 512 x 400 CT would need twice its 200 MB while being read."""
    proxy = img.dataobj
    unscaled = proxy.slope == 1 and proxy.inter == 0
    if not (path.endswith(".gz") and unscaled and proxy.dtype.isnative and len(proxy.shape) >= 3):
        return np.asanyarray(proxy)
    flat = np.empty(int(np.prod(proxy.shape)), dtype=proxy.dtype)
    view = memoryview(flat).cast("B")
    with gzip.open(path, "rb") as handle:
        handle.seek(int(proxy.offset))
        done = 0
        while done < len(view):
            read = handle.readinto(view[done : done + _GZIP_CHUNK])
            if not read:
                raise EOFError(f"the file ends after {done} of {len(view)} bytes of voxels")
            done += read
    return flat.reshape(proxy.shape, order="F")  # NIfTI stores the first axis fastest


def read_volume(path: str | Path, key: str = "image") -> Volume:
    """Read one volume. ``key`` chooses the array in h5/npz files ("image" or "label").

    Raises:
        VolumeError: with a one-line reason for unreadable, corrupt or non-image files.
    """
    path = str(path)
    check_header(*read_header(path, key), path)  # size and geometry, before any voxel is read
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            return Volume(_nifti_array(img, path), np.asarray(img.affine, dtype=np.float64))
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


def _check_file(path: str) -> None:
    """A one-line error for a path that is no regular file (missing, a folder, a symbolic link loop)."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file" + (" (broken symbolic link)" if p.is_symlink() else "")) from None
    except OSError as err:  # ELOOP: a symbolic link loop; EACCES: a folder we may not enter
        raise VolumeError(f"{path}: cannot be opened ({err.strerror or err})") from None
    if p.is_dir():
        raise VolumeError(f"{path}: is a folder, not a volume file")


def _npz_shape(path: str, key: str) -> tuple[int, ...]:
    """Shape of one array of an npz file, from its .npy header inside the zip (no data read)."""
    with zipfile.ZipFile(path) as archive:
        name = f"{key}.npy"
        if name not in archive.namelist():
            raise VolumeError(f"{path}: no '{key}' array (has {sorted(n.removesuffix('.npy') for n in archive.namelist())})")
        with archive.open(name) as stream:
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(stream)
    return tuple(int(n) for n in shape)


def _check_nifti_pixdim(path: str) -> None:
    """Refuse negative voxel sizes in a NIfTI-1 header (nibabel would take their absolute values,
    with a message of its own on stderr); other header faults are left to nibabel."""
    import nibabel as nib

    with nib.openers.ImageOpener(path) as stream:
        raw = stream.read(348)
    if len(raw) < 348:
        return
    try:
        header = nib.Nifti1Header(raw, check=False)
    except Exception:  # noqa: BLE001 - not a NIfTI-1 header: nib.load reports it
        return
    if int(header["sizeof_hdr"]) != 348:
        return
    ndim = int(header["dim"][0])
    pixdim = np.asarray(header["pixdim"][1 : 1 + min(3, max(ndim, 0))], dtype=np.float64)
    if (pixdim < 0).any():
        shown = ", ".join(f"{v:g}" for v in pixdim)
        raise VolumeError(f"{path}: negative voxel spacing ({shown}) in the header (a broken header)")


def read_header(path: str | Path, key: str = "image") -> tuple[tuple[int, ...], np.ndarray]:
    """(array shape as :func:`read_volume` returns it, 4x4 affine) from a file's header only.

    Raises:
        VolumeError: with a one-line reason for missing, unreadable or non-image files.
    """
    path = str(path)
    _check_file(path)
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            _check_nifti_pixdim(path)
            img = nib.load(path)
            return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
        if path.endswith((".mhd", ".mha")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            spacing = reader.GetSpacing()
            if any(not s > 0 for s in spacing):
                raise VolumeError(f"{path}: voxel spacing {tuple(spacing)} is not positive (a broken header)")
            shape = tuple(int(n) for n in reader.GetSize())
            affine = _sitk_affine(reader) if len(shape) == 3 else np.eye(4)  # other ranks are refused later
            if reader.GetNumberOfComponents() > 1:
                shape += (int(reader.GetNumberOfComponents()),)
            return shape, affine
        if _is_h5(path):
            import h5py

            with h5py.File(path, "r") as handle:
                if key not in handle:
                    raise VolumeError(f"{path}: no '{key}' array (has {sorted(handle.keys())})")
                if not isinstance(handle[key], h5py.Dataset):
                    raise VolumeError(f"{path}: '{key}' is a group, not an array")
                shape = tuple(int(n) for n in handle[key].shape)
            return (shape[::-1] if path.endswith(".npy.h5") and len(shape) == 3 else shape), np.eye(4)
        if path.endswith(".npz"):
            shape = _npz_shape(path, key)
            return (shape[::-1] + (1,) if len(shape) == 2 else shape), np.eye(4)
    except VolumeError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise VolumeError(f"{path}: truncated or corrupt file ({first_line(err) if str(err) else type(err).__name__})") from None
    except PermissionError:
        raise VolumeError(f"{path}: permission denied") from None
    except Exception as err:  # readers raise many types for bad files
        raise VolumeError(f"{path}: not a readable volume ({first_line(err)})") from None
    raise VolumeError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")


def check_header(shape: tuple[int, ...], affine: np.ndarray, path: str = "") -> None:
    """Refuse a volume too large for :func:`max_voxels` or with a geometry no scanner writes.

    Raises:
        VolumeError: one line naming what is wrong.
    """
    prefix = f"{path}: " if path else ""
    voxels = math.prod(int(n) for n in shape)
    limit = max_voxels()
    if voxels > limit:
        raise VolumeError(f"{prefix}{'x'.join(str(n) for n in shape)} = {voxels:,} voxels, above the limit of {limit:,} "
                          f"(set {MAX_VOXELS_ENV} to raise it)")
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(np.asarray(affine, dtype=np.float64)).all():
        raise VolumeError(f"{prefix}affine holds NaN or infinite values (a broken header)")
    spacing = np.sqrt((matrix**2).sum(axis=0))
    low, high = SPACING_RANGE
    if (spacing < low).any() or (spacing > high).any():
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise VolumeError(f"{prefix}voxel spacing ({shown}) mm is outside [{low:g}, {high:g}] mm (a broken header?)")
    directions = matrix / spacing
    if abs(np.linalg.det(directions)) < 1e-6:
        raise VolumeError(f"{prefix}singular affine: its voxel axes do not span 3-D space (a broken header)")
    cosines = np.abs(directions.T @ directions - np.eye(3))
    if cosines.max() > _MAX_AXIS_COS:
        angle = math.degrees(math.acos(min(1.0, float(cosines.max()))))
        raise VolumeError(f"{prefix}non-orthogonal affine: two voxel axes are {angle:.0f} degrees apart "
                          "(a broken header; resample to an orthogonal grid)")


def check_same_grid(image: str, label: str) -> None:
    """An image and its label must have the same shape and affine (read from the headers only).

    Raises:
        VolumeError: one line naming both files.
    """
    if image == label:  # h5/npz files holding both arrays
        return
    (image_shape, image_affine), (label_shape, label_affine) = read_header(image, "image"), read_header(label, "label")
    if tuple(image_shape[:3]) != tuple(label_shape[:3]):
        raise VolumeError(f"label {label} has shape {tuple(label_shape)}, its image {image} {tuple(image_shape)}: "
                         "a label must lie on its image's voxel grid")
    if not np.allclose(image_affine, label_affine, rtol=1e-3, atol=1e-2):
        raise VolumeError(f"label {label} lies on another voxel grid than its image {image} (affines differ): "
                         "a label must lie on its image's voxel grid")


def axial_slices(path: str | Path, key: str = "image") -> int:
    """Number of axial slices of a volume file once oriented to RAS, read from its header only.

    Used to index an unlabeled pool without loading it. NIfTI and MetaImage use their orientation;
    h5/npz arrays (no geometry) slice along their last axis after :func:`read_volume`'s transposition.
    """
    path = str(path)
    shape, affine = read_header(path, key)
    check_header(shape, affine, path)
    if len(shape) < 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got a {len(shape)}-D array of shape {shape}")
    if path.endswith((".nii", ".nii.gz", ".mhd", ".mha")):
        import nibabel as nib

        codes = nib.aff2axcodes(affine)
        return int(shape[[c in ("S", "I") for c in codes].index(True)])
    return int(shape[2])


def check_volume(array: np.ndarray, path: str = "") -> np.ndarray:
    """Validate an image array for slice-wise inference and return it as (X, Y, Z).

    Accepts 3-D arrays and 4-D arrays whose extra axes are singletons. A constant image (every voxel
    the same, e.g. a blank scan) is valid: it is segmented like any other (the label map is then
    usually all background); refusing it would drop a case from a folder run without a reason.
    """
    prefix = f"{path}: " if path else ""
    if array.size == 0:
        raise VolumeError(f"{prefix}empty image (shape {array.shape})")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise VolumeError(f"{prefix}a 4-D image holding {array.shape[3]} volumes of shape {array.shape[:3]}: segment "
                          "one volume at a time (split it into 3-D files first)")
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
