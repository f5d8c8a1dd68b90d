"""NIfTI inference with a bundle: exact output geometry for any orientation, clear errors, no partial files."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from samora_components.apps.cli import main as cli
from samora_components.bundle.inference import BundlePredictor, main
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the CT bundle with a small random model (tiny backbone) as its weights."""
    root = tmp_path_factory.mktemp("bundle") / "samora_ct"
    shutil.copytree(REPO / "bundles" / "samora_ct" / "configs", root / "configs")
    (root / "models").mkdir()
    card = {"method": "samed", "backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 64, "num_classes": 9}
    torch.manual_seed(0)
    net = SAMoraNet(9, backbone="tiny_tinyvit", img_size=64, checkpoint="", method="samed")
    with torch.no_grad():  # make the prediction depend on the image, not only on the random decoder
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    (root / "models" / "model.json").write_text(json.dumps(card))
    return root


def _volume(shape=(40, 36, 6), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = 200.0 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1) - 100.0
    organ = 300.0 * (((x - 0.3) / 0.3) ** 2 + (y / 0.2) ** 2 + (z / 0.9) ** 2 < 1)
    return (body + organ + 20 * rng.standard_normal(shape)).astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))
    return path


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


@pytest.mark.parametrize("name", ["ras", "lps", "oblique"])
def test_output_keeps_shape_affine_and_header_codes(bundle, tmp_path, name):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    if name == "lps":
        affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    if name == "oblique":
        affine[:3, :3] = _rotation_z(25) @ np.diag([-0.8, 0.9, 2.5]) @ _rotation_z(-10).T
    affine[:3, 3] = [12.0, -30.5, 7.25]
    src = _save(_volume(), affine, tmp_path / f"{name}.nii.gz")
    main(str(bundle), str(src), str(tmp_path / "out"), batch=4)
    out = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
    assert out.shape == (40, 36, 6)
    assert np.allclose(out.affine, affine)
    assert out.get_data_dtype() == np.uint8
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert set(np.unique(np.asarray(out.dataobj))) <= set(range(9))


def test_same_anatomy_in_two_orientations_gives_the_same_labels(bundle, tmp_path):
    """Stored RAS, or flipped to LPS with the matching affine, the same patient gets the same labels."""
    volume = _volume(seed=1)
    ras = np.diag([1.0, 1.0, 3.0, 1.0])
    lps = ras.copy()
    lps[:2, :2] = -lps[:2, :2]
    lps[:2, 3] = [39.0, 35.0]  # voxel (0, 0) of the flipped array is voxel (39, 35) of the other
    a = _save(volume, ras, tmp_path / "a.nii.gz")
    b = _save(volume[::-1, ::-1].copy(), lps, tmp_path / "b.nii.gz")
    predictor = BundlePredictor.from_bundle(bundle, batch=8)
    label_a, label_b = predictor(str(a)), predictor(str(b))
    assert label_a.shape == label_b.shape == volume.shape
    assert len(np.unique(label_a)) > 1  # the check below is not vacuous
    assert np.array_equal(label_a, label_b[::-1, ::-1])


def test_existing_outputs_are_kept_unless_overwrite(bundle, tmp_path, capsys):
    src = _save(_volume(), np.eye(4), tmp_path / "case.nii.gz")
    target = tmp_path / "out" / "case.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"keep me")
    main(str(bundle), str(src), str(tmp_path / "out"))
    assert target.read_bytes() == b"keep me" and "--overwrite" in capsys.readouterr().err
    main(str(bundle), str(src), str(tmp_path / "out"), overwrite=True)
    assert nib.load(str(target)).shape == (40, 36, 6)


def _bad_inputs(folder: Path) -> dict[str, Path]:
    good = _save(_volume(), np.eye(4), folder / "good.nii.gz")
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = folder / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"this is not an image\n" * 50))
    nan = _volume()
    nan[3, 4, 2] = np.nan
    inf = _volume()
    inf[0, 0, 0] = np.inf
    return {
        "not an image": text,
        "truncated gzip": truncated,
        "2-D": _save(np.zeros((20, 20), np.float32), np.eye(4), folder / "flat.nii.gz"),
        "5-D": _save(np.zeros((8, 8, 4, 2, 2), np.float32), np.eye(4), folder / "five.nii.gz"),
        "NaN": _save(nan, np.eye(4), folder / "nan.nii.gz"),
        "inf": _save(inf, np.eye(4), folder / "inf.nii.gz"),
        "missing": folder / "missing.nii.gz",
        "folder": folder / "a_folder.nii.gz",
    }


@pytest.mark.parametrize("case", ["not an image", "truncated gzip", "2-D", "5-D", "NaN", "inf", "missing", "folder"])
def test_bad_input_gives_one_error_line_nonzero_exit_and_no_output(bundle, tmp_path, capsys, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a_folder.nii.gz").mkdir()
    path = _bad_inputs(inputs)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli(["infer", "--bundle", str(bundle), "--input", str(path), "--output", str(out)])
    assert exit_info.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_with_one_bad_volume_writes_the_good_ones(bundle, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _save(_volume(), np.eye(4), inputs / "good.nii.gz")
    (inputs / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(SystemExit) as exit_info:
        main(str(bundle), str(inputs), str(tmp_path / "out"))
    assert exit_info.value.code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "1 of 2 volumes failed" in err


def test_missing_weights_and_bundle_are_clear_errors(tmp_path, capsys):
    src = _save(_volume(), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(SystemExit):
        cli(["infer", "--bundle", str(tmp_path / "nowhere"), "--input", str(src), "--output", str(tmp_path / "out")])
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        cli(["infer", "--bundle", str(REPO / "bundles" / "samora_ct"), "--input", str(src), "--output", str(tmp_path / "out"),
             "--weights", str(tmp_path / "none.pt")])
    assert "none.pt" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["nifti", "h5", "int16 nifti"])
def test_each_volume_is_read_once_and_labelled_as_from_its_path(bundle, tmp_path, monkeypatch, kind):
    import h5py

    from samora_components.bundle import inference

    affine = np.array([[0.0, 0.9, 0, 3.0], [-1.2, 0.0, 0, 4.0], [0, 0, 2.5, -7.0], [0, 0, 0, 1]])  # not RAS
    volume = _volume()
    if kind == "h5":
        path = tmp_path / "case" / "mri_norm2.h5"
        path.parent.mkdir()
        with h5py.File(path, "w") as handle:
            handle["image"] = volume
            handle["label"] = (volume > 0).astype(np.uint8)
    else:
        path = _save(volume.astype(np.int16) if kind == "int16 nifti" else volume, affine, tmp_path / "x.nii.gz")
    predictor = BundlePredictor.from_bundle(bundle, precision="fp32")
    from_path = predictor(str(path))  # LoadImaged reads the file itself
    reads = []
    original = inference.read_volume
    monkeypatch.setattr(inference, "read_volume", lambda *a, **k: reads.append(a) or original(*a, **k))
    written = inference.predict_file(predictor, path, tmp_path / "out" / "x.nii.gz")
    assert len(reads) == 1  # checked, segmented and saved from one read
    assert np.array_equal(written, from_path)
    saved = nib.load(tmp_path / "out" / "x.nii.gz")
    assert saved.shape == volume.shape and np.array_equal(np.asarray(saved.dataobj), from_path)
    assert np.allclose(saved.affine, np.eye(4) if kind == "h5" else affine)


def test_freed_memory_is_kept_unless_the_environment_says_not(monkeypatch):
    from samora_components.utils import keep_freed_memory

    assert keep_freed_memory() is True  # Linux with glibc (CI and the supported platform)
    monkeypatch.setenv("SAMORA_SYSTEM_MALLOC", "1")
    assert keep_freed_memory() is False


def test_a_4d_singleton_nifti_is_segmented_on_its_own_grid(bundle, tmp_path):
    from samora_components.bundle import inference

    volume = _volume()[..., None]  # (X, Y, Z, 1)
    path = _save(volume, np.eye(4), tmp_path / "x4.nii.gz")
    predictor = BundlePredictor.from_bundle(bundle, precision="fp32")
    label = inference.predict_file(predictor, path, tmp_path / "out" / "x4.nii.gz")
    assert label.shape == volume.shape[:3]
    assert nib.load(tmp_path / "out" / "x4.nii.gz").shape == volume.shape


def test_a_left_over_partial_write_is_not_an_input(tmp_path):
    from samora_components.bundle.inference import find_volumes

    _save(_volume(), np.eye(4), tmp_path / "a.nii.gz")
    (tmp_path / ".partial-123-456-b.nii.gz").write_bytes(b"half a file")
    assert [p.name for p in find_volumes(tmp_path)] == ["a.nii.gz"]


def test_overlay_and_probabilities_lie_on_the_input_grid(bundle, tmp_path, capsys):
    """--overlay draws the labels over the image; --save_probabilities gives a softmax per class on the
    input's own grid (here LPS, so the orientation is undone) whose argmax is the label map."""
    import matplotlib.image

    affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    src = _save(_volume(seed=3), affine, tmp_path / "case.nii.gz")
    main(str(bundle), str(src), str(tmp_path / "out"), overlay=True, save_probabilities=True)
    label = np.asarray(nib.load(str(tmp_path / "out" / "case.nii.gz")).dataobj)
    prob_img = nib.load(str(tmp_path / "out" / "case_probabilities.nii.gz"))
    assert prob_img.shape == (40, 36, 6, 9) and np.allclose(prob_img.affine, affine)
    prob = prob_img.get_fdata()
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert np.abs(prob.sum(-1) - 1.0).max() <= 9 * 0.5 / 255 + 1e-6  # rounding to steps of 1/255
    top2 = np.sort(prob, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2.0 / 255  # argmax not decided by rounding
    assert clear.mean() > 0.5 and np.array_equal(prob.argmax(-1)[clear], label[clear])
    png = matplotlib.image.imread(str(tmp_path / "out" / "case_overlay.png"))
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 300
    rgb = png[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1)) > 0.15  # painted label pixels (the image itself is grey)
    assert coloured.sum() > 50
    out = capsys.readouterr().out
    assert "case: spleen" in out and " mL" in out


def test_class_volumes_in_millilitres():
    from samora_components.bundle.inference import label_volumes_ml

    label = np.zeros((10, 10, 10), np.uint8)
    label[:2, :5, :10] = 1  # 100 voxels
    label[5:, 5:, 5:] = 3  # 125 voxels
    affine = np.diag([0.5, 2.0, 4.0, 1.0])  # 4 mm^3 per voxel
    affine[:3, :3] = _rotation_z(30) @ affine[:3, :3]  # a rotation keeps the voxel volume
    volumes = label_volumes_ml(label, affine, ["background", "a", "b", "c"])
    assert volumes == {"a": 0.4, "b": 0.0, "c": 0.5}
    assert label_volumes_ml(label, affine) == {"class_1": 0.4, "class_2": 0.0, "class_3": 0.5}


def test_any_hu_storage_gives_the_same_labels(bundle, tmp_path):
    """The same CT stored as int16 HU, as uint16 with intercept -1024 (scanner export) and as float32:
    identical label maps."""
    hu = np.round(_volume(seed=4)).astype(np.int16)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    paths = {"int16": _save(hu, affine, tmp_path / "a.nii.gz"), "float32": _save(hu.astype(np.float32), affine, tmp_path / "c.nii.gz")}
    img = nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), affine)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "b.nii.gz"))
    paths["uint16+intercept"] = tmp_path / "b.nii.gz"
    predictor = BundlePredictor.from_bundle(bundle, batch=8)
    labels = {kind: predictor(str(path)) for kind, path in paths.items()}
    assert len(np.unique(labels["int16"])) > 1
    assert all(np.array_equal(labels["int16"], other) for other in labels.values())


def test_montage_paints_each_class_in_its_legend_colour(tmp_path):
    """A label painted over a flat image has the colour its legend entry shows."""
    import matplotlib.image

    from samora_components.metrics.plots import _colour, label_montage

    labels = np.zeros((60, 60, 5), np.uint8)
    labels[5:25, 5:25] = 2  # class 2 only: its colour sits at position 2 of [background, a, b]
    label_montage(np.zeros((60, 60, 5), np.float32), labels, (1.0, 1.0, 1.0), tmp_path / "m.png",
                  class_names={0: "background", 1: "a", 2: "b"}, window=(0.0, 1.0), alpha=1.0, coronal=0)
    png = matplotlib.image.imread(str(tmp_path / "m.png"))[..., :3]
    expected = np.asarray(_colour(2)[:3], dtype=np.float32)
    assert (np.abs(png - expected).max(-1) < 0.02).sum() > 100
    for wrong in (1, 3):
        assert (np.abs(png - np.asarray(_colour(wrong)[:3], dtype=np.float32)).max(-1) < 0.02).sum() < 20


def test_montage_slices_spread_over_the_labelled_extent():
    from samora_components.metrics.plots import spread_slices

    labels = np.zeros((4, 4, 100), np.uint8)
    labels[..., 20:81] = 1
    assert spread_slices(labels, 2, 3) == [35, 50, 65]
    assert spread_slices(np.zeros((4, 4, 9)), 2, 3) == [4]  # nothing labelled: the middle
    assert spread_slices(labels[..., 20:23], 2, 5) == [0, 1, 2]  # never more than there are


@pytest.mark.parametrize("axes", ["ras", "lpi", "oblique", "sagittal"])
def test_slab_by_slab_gives_the_whole_volume_labels(bundle, tmp_path, axes):
    """The CT bundle's preprocessing acts per slice: slabs of 16 slices (the last one shorter) give the
    labels of the whole volume; a file whose third axis is not the slice axis is done whole."""
    from samora_components.data.io import Volume, read_volume

    array = _volume(shape=(40, 36, 70), seed=2)
    array[..., :5] = -1000.0  # air slices above and below the body: run once per slab, copied
    array[..., -3:] = -1000.0
    affine = {"ras": np.diag([0.8, 0.8, 2.0, 1.0]), "lpi": np.diag([-0.8, -0.8, -2.0, 1.0]),
              "oblique": np.eye(4), "sagittal": np.array([[0, 0, 2.0, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]])}[axes]
    if axes == "oblique":
        affine[:3, :3] = _rotation_z(20) @ np.diag([0.8, 0.8, 2.0])
    path = _save(array.astype(np.int16), affine, tmp_path / "ct.nii.gz")
    volume = read_volume(path)
    predictor = BundlePredictor.from_bundle(bundle, batch=4, precision="fp32")
    predictor.slab_slices = 0
    whole = predictor.predict(str(path), volume).labels
    whole_counts = predictor.inferer.last_counts
    for size in (16, 23):  # a last slab of 6 slices, then of 1
        predictor.slab_slices = size
        assert predictor.slabs_apply(volume) is (axes != "sagittal")
        slabs = predictor.predict(str(path), volume).labels
        assert slabs.shape == whole.shape == (40, 36, 70) and len(np.unique(whole)) > 1
        assert np.array_equal(slabs, whole)  # same slices in the same batches of 4: same arithmetic
        assert predictor.inferer.last_counts[1] == whole_counts[1]
        if axes != "sagittal":
            # the two constant values (air, and nothing else) run once per slab that holds them, not once per slice
            assert whole_counts[0] <= predictor.inferer.last_counts[0] <= whole_counts[0] + 5
    assert predictor.slabs_apply(Volume(array[..., :23], affine)) is False  # one slab: done whole
    if axes == "ras":  # a 3-D post-processing step would see one slab at a time: the volume is done whole
        from monai.transforms import KeepLargestConnectedComponentd

        predictor.postprocessing.transforms = (*predictor.postprocessing.transforms,
                                               KeepLargestConnectedComponentd(keys="pred"))
        assert predictor.slabs_apply(volume) is False


@pytest.mark.parametrize("case", ["int16 gz", "float32 gz", "4-D gz", "scaled gz", "big-endian gz", "plain nii"])
def test_nifti_voxels_read_as_nibabel_gives_them(tmp_path, monkeypatch, case):
    """Unscaled .nii.gz files are decompressed chunk by chunk into the array (no whole-file
    temporary); every other NIfTI goes through nibabel. Both give nibabel's voxels."""
    from samora_components.data import io

    monkeypatch.setattr(io, "_GZIP_CHUNK", 1000)  # many chunks, one of them partial
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 2000, size=(23, 17, 9)).astype(np.int16)
    if case == "float32 gz":
        array = array.astype(np.float32) / 7
    if case == "4-D gz":
        array = array[..., None]
    if case == "big-endian gz":
        array = array.astype(">i2")
    header = None
    if case == "big-endian gz":  # nibabel writes native order unless the header says otherwise
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(">i2")
    img = nib.Nifti1Image(array, np.diag([0.7, 0.7, 2.0, 1.0]), header=header)
    if case == "scaled gz":
        img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / ("x.nii" if case == "plain nii" else "x.nii.gz")
    nib.save(img, str(path))
    opened = []
    real_open = io.gzip.open
    monkeypatch.setattr(io.gzip, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    if case == "big-endian gz":
        assert not nib.load(str(path)).dataobj.dtype.isnative
    read = io.read_volume(path).array
    # the chunked path ran exactly where it applies (nibabel's own reads do not go through gzip.open here)
    assert bool(opened) is (case in ("int16 gz", "float32 gz", "4-D gz"))
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    assert read.shape == expected.shape and read.dtype == expected.dtype
    assert np.array_equal(read, expected)
