"""Synthetic phantoms for demos and tests: an abdominal CT with the 8 Synapse organs, and a
one-structure MR (left-atrium / prostate-like).

CT (:func:`make_ct_case`): an axial-slice stack through the upper abdomen (default 96 x 96 x 48
voxels of 4 x 4 x 5 mm, about 38 x 38 x 24 cm) in Hounsfield units. A case is built as a *tissue
map* (one id per voxel: air, subcutaneous fat, muscle, bone, marrow, bowel, kidney cortex, ...)
painted from simple geometric primitives in patient coordinates (RAS: +x patient left, +y
anterior, +z superior), then turned into HU with a per-case table (design value +-10 HU for the
organs), a mild smooth texture and Gaussian noise (sd ~12 HU). The body is a super-ellipse
(~32 x 24 cm, +-8 % per case, slowly varying along z) with a subcutaneous fat ring, an abdominal
wall with ribs, a vertebra (cortex, marrow, discs, posterior elements), paraspinal and psoas
muscles, mesenteric fat with bowel loops, retroperitoneal / perirenal fat, IVC and duodenum. The
8 organs are deformed ellipsoids (spleen, kidneys, gallbladder, liver, stomach) or tubes (aorta,
pancreas) with a random pose (rotation +-15 deg, scale 0.85-1.15, centre jitter ~1 cm) and a
low-frequency shape wobble; they are clipped to the abdominal cavity and painted in a fixed order
so that later organs win, hence labels never overlap. Label ids follow :data:`SYNAPSE_CLASSES`.

MR (:func:`make_mr_case`): a 96 x 96 x 40 crop (1.25 x 1.25 x 2.5 mm) of positive intensities
(~0..1000) with a bright, lobulated, roughly ellipsoidal structure near the centre (label 1), a
dark wall around it, similar-looking unlabelled distractors (a ventricle-like blob and a vessel),
dark lung-like regions, partial-volume blur, a smooth multiplicative bias field and Rician noise.

:func:`generate` writes a MONAI decathlon-style dataset (``imagesTr``, ``labelsTr``, ``imagesUn``
and ``datalist.json`` with relative paths); each case ``i`` is drawn from its own
``np.random.default_rng([seed, i])`` so the output is a pure function of the arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from samora_components.data.transforms import SYNAPSE_CLASSES
from samora_components.utils import atomic_path, write_json

__all__ = [
    "SYNAPSE_CLASSES",
    "MR_CLASSES",
    "CT_TISSUE_HU",
    "CT_SHAPE",
    "CT_SPACING",
    "MR_SHAPE",
    "MR_SPACING",
    "make_ct_case",
    "make_mr_case",
    "generate",
    "main",
]

MR_CLASSES = ("background", "foreground")

CT_SHAPE = (96, 96, 48)
CT_SPACING = (4.0, 4.0, 5.0)
MR_SHAPE = (96, 96, 40)
MR_SPACING = (1.25, 1.25, 2.5)

#: Design HU of every CT tissue (portal-venous phase); a case varies the organ values by +-10 HU.
CT_TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,  # subcutaneous
    "retro_fat": -90.0,  # mesenteric, retroperitoneal, perirenal, renal sinus
    "muscle": 45.0,
    "bone": 650.0,  # cortical bone, ribs, posterior elements
    "marrow": 250.0,
    "disc": 80.0,
    "csf": 10.0,
    "bowel": 30.0,
    "bowel_gas": -800.0,
    "bowel_fluid": 10.0,
    "ivc": 130.0,
    "spleen": 115.0,
    "kidney_cortex": 180.0,
    "kidney_medulla": 40.0,  # medulla / collecting system, inside the kidney label
    "gallbladder": 10.0,
    "liver": 100.0,
    "stomach_wall": 60.0,
    "stomach_content": 15.0,
    "stomach_air": -900.0,
    "aorta": 200.0,
    "pancreas": 90.0,
}
_TISSUE_ID = {name: index for index, name in enumerate(CT_TISSUE_HU)}
_ORGAN_TISSUES = ("spleen", "kidney_cortex", "kidney_medulla", "gallbladder", "liver", "stomach_wall", "stomach_content", "aorta", "pancreas", "ivc")
_NO_TEXTURE = ("air", "bone", "marrow", "bowel_gas", "stomach_air")
_LABEL = {name: index for index, name in enumerate(SYNAPSE_CLASSES)}

#: Field of view (mm) kept by :func:`generate` when a non-default ``shape`` is asked for.
_CT_FOV = tuple(n * s for n, s in zip(CT_SHAPE, CT_SPACING))
_MR_FOV = tuple(n * s for n, s in zip(MR_SHAPE, MR_SPACING))

Box = tuple[slice, slice, slice]
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- geometry helpers


def _axes(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """World coordinates (mm) of a grid centred on the origin: three 1-D float32 arrays (X,), (Y,), (Z,)."""
    return [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine (4, 4) of a grid with ``spacing`` whose centre is the world origin."""
    affine = np.diag([float(s) for s in spacing] + [1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
    return affine


def _box(axes: Sequence[np.ndarray], lo: Sequence[float], hi: Sequence[float]) -> Box:
    """Index slices of the voxels whose world coordinates lie in [lo, hi] per axis (may be empty)."""
    out = []
    for axis, low, high in zip(axes, lo, hi):
        start = int(np.searchsorted(axis, low, side="left"))
        stop = int(np.searchsorted(axis, high, side="right"))
        out.append(slice(start, max(start, stop)))
    return tuple(out)  # type: ignore[return-value]


def _grid(axes: Sequence[np.ndarray], box: Box) -> Coords:
    """Broadcastable world coordinates of a box: shapes (x, 1, 1), (1, y, 1), (1, 1, z)."""
    return (axes[0][box[0]][:, None, None], axes[1][box[1]][None, :, None], axes[2][box[2]][None, None, :])


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """Rotation matrix (3, 3) R = Rz @ Ry @ Rx; column k is local axis k in world coordinates."""
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise of ``shape`` rescaled to zero mean and unit sd (float32)."""
    field = rng.standard_normal(tuple(shape), dtype=np.float32)
    field = ndimage.gaussian_filter(field, [sigma_mm / s for s in spacing], mode="reflect", truncate=3.0)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _wobble(rng: np.random.Generator, q: Coords, amplitude: float, cycles: tuple[float, float], terms: int = 5) -> np.ndarray:
    """Smooth random field on local coordinates ``q``: a sum of ``terms`` plane sinusoids whose
    amplitudes add up to ``amplitude`` (so |field| <= amplitude), with ``cycles`` per unit length."""
    directions = rng.standard_normal((terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    freqs = directions * rng.uniform(cycles[0], cycles[1], (terms, 1)) * 2.0 * np.pi
    phases = rng.uniform(0.0, 2.0 * np.pi, terms)
    weights = rng.uniform(0.5, 1.0, terms)
    weights *= amplitude / weights.sum()
    field = np.zeros(np.broadcast_shapes(*(c.shape for c in q)), dtype=np.float32)
    for k in range(terms):
        field += np.float32(weights[k]) * np.sin(freqs[k, 0] * q[0] + freqs[k, 1] * q[1] + freqs[k, 2] * q[2] + phases[k])
    return field


@dataclass
class _Pose:
    """Centre (mm), semi-axes (mm) and rotation of an ellipsoidal primitive."""

    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray


def _random_pose(
    rng: np.random.Generator,
    center: Sequence[float],
    semi: Sequence[float],
    base_deg: Sequence[float] = (0.0, 0.0, 0.0),
    jitter_mm: float | Sequence[float] = 10.0,
    scale: tuple[float, float] = (0.85, 1.15),
    tilt_deg: float = 15.0,
) -> _Pose:
    """Jitter the nominal centre (+-``jitter_mm``, scalar or per axis), scale the semi-axes (overall ``scale`` and +-5 % per
    axis) and rotate by ``base_deg`` plus a random +-``tilt_deg`` about each axis."""
    jitter = np.broadcast_to(np.asarray(jitter_mm, dtype=np.float64), (3,))
    c = np.asarray(center, dtype=np.float64) + rng.uniform(-jitter, jitter)
    s = np.asarray(semi, dtype=np.float64) * rng.uniform(*scale) * rng.uniform(0.95, 1.05, 3)
    rot = _rotation(np.asarray(base_deg, dtype=np.float64) + rng.uniform(-tilt_deg, tilt_deg, 3))
    return _Pose(c, s, rot)


@dataclass
class _Blob:
    """A deformed ellipsoid evaluated in its box: ``inside`` (bool), deformed normalised radius ``r``
    (1 on the surface) and normalised local coordinates ``q`` (all broadcast to the box shape)."""

    box: Box
    inside: np.ndarray
    r: np.ndarray
    q: Coords


def _blob(
    rng: np.random.Generator,
    axes: Sequence[np.ndarray],
    pose: _Pose,
    wobble: float = 0.15,
    cycles: tuple[float, float] = (0.25, 0.7),
    taper: float = 0.0,
    margin: float = 1.0,
) -> _Blob:
    """Deformed ellipsoid of ``pose``; ``taper`` > 0 narrows the local x/y section towards +z (a pear).

    ``r = |q| (1 + wobble field)`` with ``q`` the local coordinates divided by the semi-axes;
    ``inside`` is ``r <= margin``. Only the bounding box of the shape is evaluated.
    """
    reach = np.sqrt(((pose.rot * pose.semi[None, :]) ** 2).sum(axis=1)) * margin / (1.0 - wobble) * (1.0 + taper) + 1e-3
    box = _box(axes, pose.center - reach, pose.center + reach)
    x, y, z = _grid(axes, box)
    d = (x - pose.center[0], y - pose.center[1], z - pose.center[2])
    q = tuple(
        ((pose.rot[0, k] * d[0] + pose.rot[1, k] * d[1] + pose.rot[2, k] * d[2]) / pose.semi[k]).astype(np.float32) for k in range(3)
    )
    if taper:
        narrow = 1.0 - taper * np.clip(q[2], -1.0, 1.0)
        r2 = (q[0] / narrow) ** 2 + (q[1] / narrow) ** 2 + q[2] ** 2
    else:
        r2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
    r = np.sqrt(r2) * (1.0 + _wobble(rng, q, wobble, cycles))
    full = np.broadcast_shapes(r.shape, *(c.shape for c in q))
    q = tuple(np.broadcast_to(c, full) for c in q)
    return _Blob(box, r <= margin, np.broadcast_to(r, full), q)  # type: ignore[arg-type]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a, b, power: float = 2.0) -> np.ndarray:
    """Normalised super-ellipse value |(x-cx)/a|^p + |(y-cy)/b|^p (<= 1 inside), broadcast."""
    if power == 2.0:
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
    return np.abs((x - cx) / a) ** power + np.abs((y - cy) / b) ** power


class _Canvas:
    """Tissue map and label volume of one CT case, painted in place."""

    def __init__(self, shape: Sequence[int]):
        self.tissue = np.full(tuple(shape), _TISSUE_ID["air"], dtype=np.uint8)
        self.label = np.zeros(tuple(shape), dtype=np.uint8)

    def paint(self, box: Box, mask: np.ndarray, tissue: str, label: int | None = None) -> None:
        """Set ``tissue`` (and ``label`` when given) where ``mask`` (bool, broadcastable to the box) is true."""
        target = self.tissue[box]
        mask = np.broadcast_to(mask, target.shape)
        target[mask] = _TISSUE_ID[tissue]
        if label is not None:
            self.label[box][mask] = label


# ----------------------------------------------------------------------------- CT


def _ct_case(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CT case: HU image (X, Y, Z) float32, label (X, Y, Z) uint8 and tissue map (X, Y, Z) uint8
    (ids index :data:`CT_TISSUE_HU`)."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    axes = _axes(shape, spacing)
    full: Box = (slice(None), slice(None), slice(None))
    x, y, z = _grid(axes, full)
    canvas = _Canvas(shape)

    # ---- body outline, subcutaneous fat, abdominal wall and cavity (all per z slice)
    sbx, sby = rng.uniform(0.92, 1.08, 2)
    sway = 1.0 + 0.03 * np.sin(np.pi * z / 240.0 + rng.uniform(0.0, 2.0 * np.pi))
    a, b = 160.0 * sbx * sway, 120.0 * sby * sway
    cy = rng.uniform(-5.0, 5.0)
    body = _ellipse(x, y, 0.0, cy, a, b, 2.3) <= 1.0
    fat_lat = rng.uniform(10.0, 25.0)
    fat_ant, fat_post = fat_lat * rng.uniform(1.0, 1.4), fat_lat * rng.uniform(0.6, 0.9)
    a_in, b_in = a - fat_lat, b - (fat_ant + fat_post) / 2.0
    cy_in = cy + (fat_post - fat_ant) / 2.0
    inner = _ellipse(x, y, 0.0, cy_in, a_in, b_in, 2.3) <= 1.0
    wall_lat, wall_ant, wall_post = rng.uniform(8.0, 12.0), rng.uniform(8.0, 12.0), 18.0
    cy_cav = cy_in + (wall_post - wall_ant) / 2.0
    cavity_outline = _ellipse(x, y, 0.0, cy_cav, a_in - wall_lat, b_in - (wall_ant + wall_post) / 2.0, 2.3) <= 1.0
    canvas.paint(full, body, "fat")
    canvas.paint(full, inner, "muscle")

    # ribs: oblique bands in the wall, descending anteriorly, absent at the front and the spine
    theta = np.abs(np.arctan2(x, -(y - cy_in)))  # 0 posterior midline, pi anterior midline
    band = inner & ~cavity_outline
    rib_phase = (z + 32.0 * theta) / 30.0 + rng.uniform(0.0, 1.0)
    ribs = band & (rib_phase % 1.0 < 0.3) & (theta > 0.45) & (theta < 2.4) & (z > -60.0 + 28.0 * theta)
    canvas.paint(full, ribs, "bone")

    # ---- spine, paraspinal and psoas muscles
    xv, yv = rng.uniform(-3.0, 3.0), -50.0 * sby + rng.uniform(-4.0, 4.0)
    canal_y = yv - 28.0
    level = ((z - rng.uniform(0.0, 32.0)) / 32.0) % 1.0
    disc = level < 0.19
    vertebral_body = _ellipse(x, y, xv, yv, 22.0, 17.0) <= 1.0
    marrow = _ellipse(x, y, xv, yv, 17.5, 12.5) <= 1.0
    arch = _ellipse(x, y, xv, canal_y, 16.0, 14.0) <= 1.0
    canal = _ellipse(x, y, xv, canal_y, 9.0, 9.0) <= 1.0
    spinous = (_ellipse(x, y, xv, canal_y - 24.0, 5.0, 13.0) <= 1.0) & inner
    transverse = (_ellipse(np.abs(x - xv), y, 26.0, canal_y + 2.0, 15.0, 5.0) <= 1.0) & (level > 0.4) & (level < 0.7)
    paraspinal = _ellipse(np.abs(x - xv), y, 38.0, yv - 42.0, 28.0, 22.0) <= 1.0
    psoas_r = 7.0 + 11.0 * np.clip((60.0 - z) / 180.0, 0.0, 1.0)
    psoas = _ellipse(np.abs(x - xv), y, 20.0 + 0.9 * psoas_r, yv - 2.0, psoas_r, psoas_r) <= 1.0
    block = vertebral_body | arch | spinous | transverse | paraspinal | psoas
    canvas.paint(full, (paraspinal | psoas) & inner, "muscle")
    canvas.paint(full, arch | spinous | transverse | vertebral_body, "bone")
    canvas.paint(full, marrow & ~disc, "marrow")
    canvas.paint(full, vertebral_body & disc, "disc")
    canvas.paint(full, canal, "csf")

    # ---- cavity content: mesenteric / retroperitoneal fat with bowel loops (fat posteriorly)
    cavity = cavity_outline & ~block & inner
    loops = _smooth_noise(rng, shape, 9.0, spacing)
    gas = _smooth_noise(rng, shape, 4.0, spacing)
    threshold = -0.1 + 1.5 / (1.0 + np.exp(-(yv + 45.0 - y) / 10.0))
    bowel = cavity & (loops > threshold)
    canvas.paint(full, cavity, "retro_fat")
    canvas.paint(full, bowel, "bowel")
    canvas.paint(full, bowel & (gas > 1.9), "bowel_gas")

    def clip(blob: _Blob, extra: np.ndarray | None = None) -> np.ndarray:
        mask = blob.inside & cavity[blob.box]
        return mask if extra is None else mask & extra

    def place(cx_: float, cy_: float, cz_: float) -> tuple[float, float, float]:
        # nominal organ centres follow the body size in the axial plane
        return (cx_ * sbx, cy_ * sby, cz_)

    # ---- duodenum (unlabelled bowel) around the pancreatic head
    head = np.array(place(-32.0, 18.0, -25.0)) + rng.uniform(-6.0, 6.0, 3)
    for center, semi, deg in (
        ((head[0] - 24.0, head[1] - 4.0, head[2] - 5.0), (11.0, 11.0, 32.0), (0.0, 0.0, 0.0)),
        ((head[0] + 5.0, head[1] - 6.0, head[2] - 40.0), (36.0, 10.0, 10.0), (0.0, 0.0, 0.0)),
    ):
        duct = _blob(rng, axes, _random_pose(rng, center, semi, deg, 3.0, (0.95, 1.05), 8.0), wobble=0.1)
        canvas.paint(duct.box, clip(duct), "bowel", 0)
        canvas.paint(duct.box, clip(duct, duct.r < 0.55), "bowel_fluid" if rng.uniform() < 0.6 else "bowel_gas", 0)

    # ---- stomach: thick wall, fluid content, optional anterior air pocket (air-fluid level)
    stomach_pose = _random_pose(rng, place(60.0, 30.0, 42.0), (42.0, 32.0, 52.0), (0.0, 0.0, 25.0))
    stomach = _blob(rng, axes, stomach_pose, wobble=0.18)
    inner_r = 1.0 - 7.0 / float(np.mean(stomach_pose.semi))  # ~7 mm wall
    canvas.paint(stomach.box, clip(stomach), "stomach_wall", _LABEL["stomach"])
    canvas.paint(stomach.box, clip(stomach, stomach.r < inner_r), "stomach_content")
    if rng.uniform() < 0.6:
        sy = _grid(axes, stomach.box)[1]
        level_y = stomach_pose.center[1] + rng.uniform(0.3, 0.6) * stomach_pose.semi[1]
        canvas.paint(stomach.box, clip(stomach, (stomach.r < inner_r) & (sy > level_y)), "stomach_air")

    # ---- liver: right lobe + left lobe, clipped to the cavity
    right_lobe = _blob(rng, axes, _random_pose(rng, place(-60.0, 8.0, 45.0), (73.0, 73.0, 85.0)), wobble=0.15)
    left_lobe = _blob(rng, axes, _random_pose(rng, place(-5.0, 55.0, 72.0), (52.0, 27.0, 38.0), (0.0, 0.0, -10.0)), wobble=0.15)
    for lobe in (right_lobe, left_lobe):
        canvas.paint(lobe.box, clip(lobe), "liver", _LABEL["liver"])

    # ---- gallbladder: pear in the inferior-medial liver fossa, neck superior and posterior
    gb = _blob(rng, axes, _random_pose(rng, place(-24.0, 52.0, -10.0), (16.0, 16.0, 32.0), (-25.0, 10.0, 0.0)), wobble=0.1, taper=0.35)
    canvas.paint(gb.box, clip(gb), "gallbladder", _LABEL["gallbladder"])

    # ---- spleen: crescent along the left posterolateral wall, hilum concave anteromedially
    spleen = _blob(rng, axes, _random_pose(rng, place(94.0, -36.0, 55.0), (25.0, 50.0, 52.0), (0.0, 0.0, -39.0)), wobble=0.15)
    hilum = ((spleen.q[0] + 1.25) / 0.5) ** 2 + (spleen.q[1] / 0.5) ** 2 + (spleen.q[2] / 0.6) ** 2 > 1.0
    canvas.paint(spleen.box, clip(spleen, hilum), "spleen", _LABEL["spleen"])

    # ---- kidneys: perirenal fat, cortex, medulla/pelvis opening to an anteromedial hilum
    kidney_shift = rng.uniform(-8.0, 8.0)  # shared, so that the right kidney stays ~2 cm lower
    for name, side, z0 in (("right_kidney", -1.0, -52.0), ("left_kidney", 1.0, -33.0)):
        center = place(80.0 * side, -48.0, z0 + kidney_shift)
        pose = _random_pose(rng, center, (30.0, 22.0, 52.0), (0.0, -10.0 * side, 30.0 * side), jitter_mm=(10.0, 10.0, 4.0))
        fat_pose = _Pose(pose.center, pose.semi * 1.15 + 6.0, pose.rot)
        perirenal = _blob(rng, axes, fat_pose, wobble=0.05)
        canvas.paint(perirenal.box, clip(perirenal), "retro_fat", 0)
        kidney = _blob(rng, axes, pose, wobble=0.08, cycles=(0.2, 0.5))
        qx, qy, qz = kidney.q
        notch = (qx / 0.35) ** 2 + ((qy - 1.0) / 0.5) ** 2 + (qz / 0.3) ** 2 <= 1.0
        renal = clip(kidney, ~notch)
        canvas.paint(kidney.box, renal, "kidney_cortex", _LABEL[name])
        medulla = (qx / 0.62) ** 2 + ((qy - 0.2) / 0.55) ** 2 + (qz / 0.7) ** 2 <= 1.0
        canvas.paint(kidney.box, renal & medulla, "kidney_medulla")

    # ---- IVC (unlabelled; moves into the liver superiorly)
    ivc_box = _box(axes, (xv - 45.0, yv + 20.0, -1e3), (xv - 5.0, yv + 110.0, 1e3))
    bx, by, bz = _grid(axes, ivc_box)
    ivc_y = yv + 38.0 + 0.25 * np.maximum(bz - 20.0, 0.0)
    ivc = _ellipse(bx, by, xv - 24.0, ivc_y, 11.0, 13.0) <= 1.0
    canvas.paint(ivc_box, ivc, "ivc", 0)

    # ---- pancreas: lobulated tube along a bent curve, head at the duodenum, tail at the splenic hilum
    _paint_pancreas(rng, axes, canvas, cavity, head, np.array(place(10.0, 38.0, -18.0)), np.array(place(82.0, -12.0, -6.0)))

    # ---- aorta: tube anterior-left of the vertebral body along all z
    radius = 12.5 * rng.uniform(0.88, 1.12)
    ax0, ay0 = xv + 16.0 + rng.uniform(-3.0, 3.0), yv + 32.0 + rng.uniform(-2.0, 2.0)
    drift = rng.uniform(-4.0, 4.0, 2)
    aorta_box = _box(axes, (ax0 - 30.0, ay0 - 30.0, -1e3), (ax0 + 30.0, ay0 + 30.0, 1e3))
    bx, by, bz = _grid(axes, aorta_box)
    aorta = _ellipse(bx, by, ax0 + drift[0] * bz / 120.0, ay0 + drift[1] * bz / 120.0, radius, radius) <= 1.0
    canvas.paint(aorta_box, aorta, "aorta", _LABEL["aorta"])

    # ---- tissue map -> HU
    table = np.array(list(CT_TISSUE_HU.values()), dtype=np.float32)
    for name in _ORGAN_TISSUES:
        table[_TISSUE_ID[name]] += rng.uniform(-10.0, 10.0)
    for name, spread in (("fat", 10.0), ("retro_fat", 10.0), ("muscle", 5.0), ("bowel", 10.0), ("bone", 60.0), ("marrow", 40.0)):
        table[_TISSUE_ID[name]] += rng.uniform(-spread, spread)
    textured = np.ones(len(table), dtype=bool)
    textured[[_TISSUE_ID[name] for name in _NO_TEXTURE]] = False
    image = table[canvas.tissue]
    image += np.where(textured[canvas.tissue], 6.0 * _smooth_noise(rng, shape, 5.0, spacing), 0.0).astype(np.float32)
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(10.0, 14.0))
    np.clip(image, -1024.0, 3071.0, out=image)
    return image, canvas.label, canvas.tissue


def _paint_pancreas(
    rng: np.random.Generator,
    axes: Sequence[np.ndarray],
    canvas: _Canvas,
    cavity: np.ndarray,
    head: np.ndarray,
    bend: np.ndarray,
    tail: np.ndarray,
) -> None:
    """Paint the pancreas: a quadratic Bezier centre line head -> bend -> tail (mm, (3,) each),
    radius tapering from ~14 mm (head) to ~10 mm (tail), lobulated by a smooth wobble."""
    bend = bend + rng.uniform(-8.0, 8.0, 3)
    tail = tail + rng.uniform(-8.0, 8.0, 3)
    t = np.linspace(0.0, 1.0, 48)[:, None]
    line = (1 - t) ** 2 * head[None] + 2 * (1 - t) * t * bend[None] + t**2 * tail[None]  # (48, 3)
    scale = rng.uniform(0.85, 1.15)
    radii = scale * (14.0 * (1 - t[:, 0]) + 10.0 * t[:, 0])
    reach = radii.max() * 1.4
    box = _box(axes, line.min(axis=0) - reach, line.max(axis=0) + reach)
    x, y, z = _grid(axes, box)
    n = (x.size, y.size, z.size)
    points = np.stack(np.broadcast_arrays(x, y, z), axis=-1).reshape(-1, 3)
    dist2 = ((points[:, None, :] - line[None, :, :].astype(np.float32)) ** 2).sum(axis=-1)  # (N, 48)
    nearest = dist2.argmin(axis=1)
    dist = np.sqrt(dist2[np.arange(len(points)), nearest]).reshape(n)
    lobules = _wobble(rng, (x / 25.0, y / 25.0, z / 25.0), 0.3, (0.6, 1.4), terms=6)
    inside = dist <= radii[nearest].reshape(n) * (1.0 + lobules)
    canvas.paint(box, inside & cavity[box], "pancreas", _LABEL["pancreas"])


def make_ct_case(
    rng: np.random.Generator, shape: Sequence[int] = CT_SHAPE, spacing: Sequence[float] = CT_SPACING
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT.

    Args:
        rng: random generator (the only source of randomness).
        shape: (X, Y, Z) voxels; the anatomy is defined in mm, so keep ``shape * spacing`` near the
            default 384 x 384 x 240 mm field of view.
        spacing: voxel size (mm) along X (patient left), Y (anterior), Z (superior).

    Returns:
        ``image`` float32 (X, Y, Z) in HU and ``label`` uint8 (X, Y, Z) with ids of
        :data:`SYNAPSE_CLASSES`.
    """
    image, label, _ = _ct_case(rng, shape, spacing)
    return image, label


# ----------------------------------------------------------------------------- MR


def make_mr_case(
    rng: np.random.Generator, shape: Sequence[int] = MR_SHAPE, spacing: Sequence[float] = MR_SPACING
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic MR crop with a single bright, lobulated structure near the centre.

    Args:
        rng: random generator.
        shape: (X, Y, Z) voxels (default field of view 120 x 120 x 100 mm).
        spacing: voxel size in mm.

    Returns:
        ``image`` float32 (X, Y, Z), positive, roughly 0..1000, with a smooth bias field and
        Rician noise; ``label`` uint8 (X, Y, Z) in {0, 1}.
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    axes = _axes(shape, spacing)
    full: Box = (slice(None), slice(None), slice(None))
    x, y, z = _grid(axes, full)
    image = (260.0 + 50.0 * _smooth_noise(rng, shape, 8.0, spacing)).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    bright = rng.uniform(550.0, 750.0)

    # dark lung-like regions on both sides, a vessel posteriorly
    for side in (-1.0, 1.0):
        lung = _blob(rng, axes, _random_pose(rng, (62.0 * side, -5.0, 0.0), (30.0, 55.0, 80.0), jitter_mm=6.0), wobble=0.1)
        image[lung.box][lung.inside] = 40.0
    vessel_x, vessel_y, vessel_r = rng.uniform(5.0, 20.0), rng.uniform(-45.0, -35.0), rng.uniform(8.0, 11.0)
    vessel = np.broadcast_to(_ellipse(x, y, vessel_x, vessel_y, vessel_r, vessel_r) <= 1.0, shape)
    image[vessel] = 0.85 * bright

    # the structure: lobulated ellipsoid plus 1-3 appendages, wrapped in a dark wall
    semi = rng.uniform((20.0, 17.0, 17.0), (30.0, 26.0, 26.0))
    pose = _random_pose(rng, (0.0, 0.0, 0.0), semi, jitter_mm=10.0, scale=(1.0, 1.0), tilt_deg=30.0)
    body = _blob(rng, axes, pose, wobble=0.15, cycles=(0.3, 0.9), margin=1.2)
    parts = [(body.box, body.inside & (body.r <= 1.0), body.inside)]
    for _ in range(int(rng.integers(1, 4))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        anchor = pose.center + pose.rot @ (pose.semi * direction * 0.95)
        lobe_pose = _random_pose(rng, anchor, rng.uniform(6.0, 11.0, 3), jitter_mm=2.0, tilt_deg=90.0)
        lobe = _blob(rng, axes, lobe_pose, wobble=0.1, margin=1.3)
        parts.append((lobe.box, lobe.inside & (lobe.r <= 1.0), lobe.inside))

    # a ventricle-like bright distractor beside it (unlabelled), with its own dark wall
    offset = np.array([1.0, 1.0, -1.0]) / np.sqrt(3.0) * (float(pose.semi.max()) + 30.0)
    lv = _blob(rng, axes, _random_pose(rng, pose.center + offset, (24.0, 20.0, 26.0), tilt_deg=30.0), wobble=0.1, margin=1.3)
    image[lv.box][lv.inside] = 150.0
    image[lv.box][lv.inside & (lv.r <= 1.0)] = 0.8 * bright
    wall = 170.0
    for box, _, shell in parts:
        image[box][shell] = wall
    for box, core, _ in parts:
        image[box][core] = bright
        label[box][core] = 1

    # acquisition: partial-volume blur, bias field, Rician noise
    image = ndimage.gaussian_filter(image, (0.8, 0.8, 0.5), truncate=3.0)
    coords = [c / (0.5 * n * s) for c, n, s in zip((x, y, z), shape, spacing)]
    log_bias = sum(rng.uniform(-0.2, 0.2) * c for c in coords) + sum(rng.uniform(-0.1, 0.1) * c * c for c in coords)
    image = image * np.exp(log_bias).astype(np.float32) * np.float32(rng.uniform(0.85, 1.15))
    sd = np.float32(rng.uniform(12.0, 25.0))
    real = image + sd * rng.standard_normal(shape, dtype=np.float32)
    imag = sd * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32), label


# ----------------------------------------------------------------------------- dataset writer


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write ``array`` (X, Y, Z) to ``path`` (.nii.gz) atomically."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def _split_sizes(cases: int, test_fraction: float, val_cases: int) -> tuple[int, int, int]:
    """(training, validation, test) sizes of ``cases`` labeled cases; at least one training case."""
    if cases < 2:
        raise ValueError(f"need at least 2 labeled phantom cases (one for training, one for test), got cases={cases}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    if val_cases < 0:
        raise ValueError(f"val_cases must be >= 0, got {val_cases}")
    n_test = min(max(1, round(test_fraction * cases)), cases - 1)
    n_val = 0 if cases < 3 else min(val_cases, cases - n_test - 1)
    return cases - n_test - n_val, n_val, n_test


def generate(
    out: str,
    kind: str = "ct",
    cases: int = 10,
    seed: int = 0,
    unlabeled: int = 0,
    shape: tuple[int, int, int] | None = None,
    test_fraction: float = 0.2,
    val_cases: int = 1,
) -> str:
    """Write a phantom dataset to ``out`` and return the path of its ``datalist.json``.

    Files: ``imagesTr/<name>.nii.gz`` + ``labelsTr/<name>.nii.gz`` for ``cases`` labeled cases and
    ``imagesUn/<name>.nii.gz`` for ``unlabeled`` image-only cases, named ``phantom_<kind>_000``...
    (unlabeled ones continue the numbering). Labeled cases are split in order into training,
    validation (``val_cases``, none when ``cases < 3``) and test (the last
    ``max(1, round(test_fraction * cases))``). A non-default ``shape`` keeps the default field of
    view (the spacing is adapted). CT images are stored as int16 HU, MR images as float32.
    """
    kind = kind.lower()
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}")
    if unlabeled < 0:
        raise ValueError(f"unlabeled must be >= 0, got {unlabeled}")
    n_train, n_val, n_test = _split_sizes(cases, test_fraction, val_cases)
    default_shape, fov = (CT_SHAPE, _CT_FOV) if kind == "ct" else (MR_SHAPE, _MR_FOV)
    if shape is None:
        shape = default_shape
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got {shape}")
    shape = tuple(int(n) for n in shape)
    spacing = tuple(f / n for f, n in zip(fov, shape))
    affine = _affine(shape, spacing)
    maker = make_ct_case if kind == "ct" else make_mr_case

    for folder in ("imagesTr", "labelsTr", "imagesUn"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    labeled, extra = [], []
    for index in range(cases + unlabeled):
        name = f"phantom_{kind}_{index:03d}"
        image, label = maker(np.random.default_rng([seed, index]), shape, spacing)
        if kind == "ct":
            image = np.round(image).astype(np.int16)
        if index < cases:
            _save_nifti(image, affine, os.path.join(out, "imagesTr", f"{name}.nii.gz"))
            _save_nifti(label, affine, os.path.join(out, "labelsTr", f"{name}.nii.gz"))
            labeled.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
        else:
            _save_nifti(image, affine, os.path.join(out, "imagesUn", f"{name}.nii.gz"))
            extra.append({"image": f"imagesUn/{name}.nii.gz"})

    content = {
        "name": f"SAMora phantom {kind.upper()}",
        "kind": kind,
        "seed": seed,
        "classes": list(SYNAPSE_CLASSES if kind == "ct" else MR_CLASSES),
        "training": labeled[:n_train],
        "validation": labeled[n_train : n_train + n_val],
        "test": labeled[n_train + n_val :],
        "unlabeled": extra,
    }
    path = os.path.join(out, "datalist.json")
    write_json(path, content)
    return path


def main(out: str, kind: str = "ct", cases: int = 10, seed: int = 0, unlabeled: int = 0) -> None:
    """CLI entry (``python -m samora_components phantom``): generate and print one summary line."""
    path = generate(out, kind=kind, cases=cases, seed=seed, unlabeled=unlabeled)
    print(f"wrote {cases} labeled (+{unlabeled} unlabeled) {kind} phantom cases to {out} (datalist: {path})")
