"""Bad input to every command: one `error: ...` line on stderr, a non-zero exit status, no traceback,
nothing partial written. Also the inputs that look odd but are valid (a constant volume, a volume
without foreground, a read-only bundle) and a folder run stopped half-way."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from samora_components.apps.cli import main as cli
from samora_components.bundle import inference
from samora_components.bundle.inference import BundlePredictor, predict_file
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "bundles" / "samora_ct"
CARD = {"method": "samed", "backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32, "num_classes": 9}
SHAPE = (24, 20, 3)
PROGRESS = re.compile(r"\d+%\|")  # a progress bar (tqdm) redrawn on stderr: not a message


def _network(num_classes: int = 9, backbone: str = "tiny_tinyvit", method: str = "samed", **extra) -> SAMoraNet:
    torch.manual_seed(0)
    net = SAMoraNet(num_classes, backbone=backbone, img_size=32 if backbone == "tiny_tinyvit" else 64, checkpoint="",
                    method=method, **extra)
    with torch.no_grad():  # make the prediction depend on the image, not only on the random decoder
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A copy of the CT bundle's configs with a tiny random model as its weights."""
    root = tmp_path_factory.mktemp("bundle") / "samora_ct"
    shutil.copytree(CT / "configs", root / "configs")
    (root / "models").mkdir()
    torch.save(_network().state_dict(), root / "models" / "model.pt")
    (root / "models" / "model.json").write_text(json.dumps(CARD))
    return root


def _volume(shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = 200.0 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1) - 100.0
    return (body + 20 * rng.standard_normal(shape)).astype(np.float32)


def _save(array: np.ndarray, path: Path, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _raw_nifti(path: Path, array: np.ndarray, affine=np.eye(4), pixdim=None, shape=None) -> Path:
    """An uncompressed NIfTI-1 file written field by field: any affine (sform only, no qform), any
    pixdim, a header shape other than the data's (the data is then what follows the header)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(shape or array.shape)
    header["vox_offset"] = 352
    header["qform_code"], header["sform_code"] = 0, 2
    header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(affine, dtype=np.float32)[:3]
    if pixdim is not None:
        header["pixdim"][1:4] = pixdim
        header["qform_code"], header["sform_code"] = 1, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.binaryblock + b"\0" * 4 + np.asfortranarray(array).tobytes(order="F"))
    return path


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones included (none when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def _one_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, expect exit ``code`` and exactly one `error: ...` line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ---- infer: the volume itself --------------------------------------------------------------------


def _good(folder: Path) -> Path:
    return _save(_volume(), folder / "good.nii.gz")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _shear() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 1] = [0.9, 0.3, 0.0]  # the y axis 18 degrees from the x axis
    return affine


def _loop(folder: Path) -> Path:
    link = folder / "loop.nii.gz"
    link.symlink_to(link)  # a link to itself
    return folder


VOLUMES = {  # kind -> (writer, fragment of the error line, exit status)
    "empty file": (lambda d: _write(d / "empty.nii.gz", b""),
                   "empty.nii.gz: not a readable volume", 1),
    "truncated gzip": (lambda d: _write(d / "cut.nii.gz", _good(d).read_bytes()[:_good(d).stat().st_size // 2]),
                       "cut.nii.gz: truncated or corrupt file", 1),
    "garbage bytes": (lambda d: _write(d / "junk.nii", np.random.default_rng(0).bytes(4000)),
                      "junk.nii: not a readable volume", 1),
    "gzip of text": (lambda d: _write(d / "notes.nii.gz", gzip.compress(b"not an image\n" * 50)),
                     "notes.nii.gz: not a readable volume", 1),
    "zero header": (lambda d: _write(d / "zero.nii", b"\0" * 352 + _volume().tobytes()),
                    "zero.nii: not a readable volume", 1),
    "2-D": (lambda d: _save(np.zeros((20, 20), np.float32), d / "flat.nii.gz"), "expected a 3-D volume, got a 2-D", 1),
    "4-D, two volumes": (lambda d: _save(np.zeros((8, 8, 4, 2), np.float32), d / "two.nii.gz"),
                         "a 4-D image holding 2 volumes of shape (8, 8, 4)", 1),
    "5-D": (lambda d: _save(np.zeros((8, 8, 4, 2, 2), np.float32), d / "five.nii.gz"), "expected a 3-D volume, got a 5-D", 1),
    "NaN voxel": (lambda d: _save(np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 7, np.nan, _volume()).astype(np.float32),
                                  d / "nan.nii.gz"), "nan.nii.gz: image contains NaN or infinite voxels", 1),
    "infinite voxel": (lambda d: _save(np.where(np.arange(np.prod(SHAPE)).reshape(SHAPE) == 7, np.inf, _volume()).astype(np.float32),
                                       d / "inf.nii.gz"), "inf.nii.gz: image contains NaN or infinite voxels", 1),
    "zero spacing": (lambda d: _raw_nifti(d / "zero_mm.nii", _volume(), np.diag([0.8, 0.0, 2.5, 1.0])),
                     "voxel spacing (0.8, 0, 2.5) mm is outside [0.001, 1000] mm", 1),
    "negative spacing": (lambda d: _raw_nifti(d / "minus_mm.nii", _volume(), pixdim=[-1.0, 1.0, 2.0]),
                         "minus_mm.nii: negative voxel spacing (-1, 1, 2) in the header", 1),
    "spacing 1e6": (lambda d: _raw_nifti(d / "huge_mm.nii", _volume(), np.diag([1e6, 1.0, 1.0, 1.0])),
                    "voxel spacing (1e+06, 1, 1) mm is outside", 1),
    "non-orthogonal affine": (lambda d: _raw_nifti(d / "shear.nii", _volume(), _shear()),
                              "non-orthogonal affine: two voxel axes are 18 degrees apart", 1),
    "singular affine": (lambda d: _raw_nifti(d / "singular.nii", _volume(), np.array(
        [[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])),
        "singular affine: its voxel axes do not span 3-D space", 1),
    "header beyond the voxel limit": (lambda d: _raw_nifti(d / "giant.nii", _volume(), shape=(30000, 30000, 3000)),
                                      "30000x30000x3000 = 2,700,000,000,000 voxels, above the limit of 2,000,000,000", 1),
    "symlink loop in the folder": (_loop, "loop.nii.gz: cannot be opened (Too many levels of symbolic links)", 1),
    "missing file": (lambda d: d / "missing.nii.gz", "missing.nii.gz: no such file or folder", 2),
    "folder named like a volume": (lambda d: (d / "dir.nii.gz").mkdir() or d / "dir.nii.gz", "dir.nii.gz: no volume files", 2),
}


@pytest.mark.parametrize("kind", list(VOLUMES))
def test_infer_refuses_a_bad_volume_in_one_line(bundle, tmp_path, capsys, kind):
    write, fragment, code = VOLUMES[kind]
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = write(inputs)
    out = tmp_path / "out"
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(path), "--output", str(out),
                               "--engine", "eager"], code)
    assert fragment in line, line
    assert _files(out) == []


def test_the_voxel_limit_is_read_from_the_environment(bundle, tmp_path, capsys, monkeypatch):
    src = _good(tmp_path)
    monkeypatch.setenv("SAMORA_MAX_VOXELS", "1000")
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(tmp_path / "o"),
                               "--engine", "eager"], 1)
    assert "24x20x3 = 1,440 voxels, above the limit of 1,000 (set SAMORA_MAX_VOXELS to raise it)" in line
    monkeypatch.setenv("SAMORA_MAX_VOXELS", "lots")
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(tmp_path / "o"),
                               "--engine", "eager"])
    assert "SAMORA_MAX_VOXELS='lots' is not a number of voxels" in line
    assert _files(tmp_path / "o") == []


def test_the_voxel_limit_is_checked_before_reading(tmp_path):
    """A header announcing more voxels than the limit is refused from the header: the file holds a
    few voxels only, so reading them would have failed with another message."""
    from samora_components.data import io

    path = _raw_nifti(tmp_path / "giant.nii", _volume(), shape=(30000, 30000, 3000))
    with pytest.raises(io.VolumeError, match="above the limit"):
        io.read_volume(path)
    with pytest.raises(io.VolumeError, match="above the limit"):
        io.axial_slices(path)  # training and stage 1 index their volumes with it


# ---- infer: odd but valid volumes ----------------------------------------------------------------


def test_a_constant_volume_is_segmented_not_refused(bundle, tmp_path, capsys):
    """A blank scan is a valid input: refusing it would drop a case from a folder without a reason."""
    src = _save(np.full(SHAPE, -1000.0, np.float32), tmp_path / "blank.nii.gz")
    cli(["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(tmp_path / "out"), "--engine", "eager"])
    out = nib.load(tmp_path / "out" / "blank.nii.gz")
    assert out.shape == SHAPE and out.get_data_dtype() == np.uint8
    label = np.asarray(out.dataobj)
    assert np.array_equal(label[..., 0], label[..., 1])  # identical slices, identical labels
    assert "error" not in capsys.readouterr().err


class _Background(torch.nn.Module):
    """A network that finds no foreground anywhere."""

    def forward(self, x):
        scores = torch.zeros(x.shape[0], 9, *x.shape[-2:])
        scores[:, 0] = 1.0
        return scores


def test_a_volume_without_foreground_gets_an_empty_label_map(bundle, tmp_path):
    predictor = BundlePredictor.from_bundle(bundle, engine="eager")
    predictor.network = _Background()
    src = _save(_volume(), tmp_path / "case.nii.gz", np.diag([0.7, 0.8, 3.0, 1.0]))
    label = predict_file(predictor, src, tmp_path / "out" / "case.nii.gz")
    written = nib.load(tmp_path / "out" / "case.nii.gz")
    assert label.shape == SHAPE and not label.any()
    assert written.shape == SHAPE and not np.asarray(written.dataobj).any()
    assert np.allclose(written.affine, np.diag([0.7, 0.8, 3.0, 1.0]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_bundle_is_enough_for_infer(bundle, tmp_path):
    copy = tmp_path / "ro_bundle"
    shutil.copytree(bundle, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        src = _good(tmp_path / "in")
        cli(["infer", "--bundle", str(copy), "--input", str(src), "--output", str(tmp_path / "out"), "--engine", "eager"])
        assert (tmp_path / "out" / "good.nii.gz").is_file()
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


# ---- infer: output folder ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["the input folder", "inside the input folder"])
def test_output_may_not_be_or_lie_inside_the_input_folder(bundle, tmp_path, capsys, where):
    inputs = tmp_path / "in"
    _good(inputs)
    out = inputs if where == "the input folder" else inputs / "labels"
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(inputs), "--output", str(out),
                               "--engine", "eager", "--overwrite"])
    assert ("is the input folder" if where == "the input folder" else "lies inside the input folder") in line
    assert _files(inputs) == ["good.nii.gz"]


def test_output_that_would_replace_the_input_file_is_refused(bundle, tmp_path, capsys):
    src = _good(tmp_path)
    before = src.read_bytes()
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(tmp_path),
                               "--engine", "eager", "--overwrite"])
    assert f"would replace the input {src}" in line
    assert src.read_bytes() == before


def test_an_output_folder_under_a_regular_file_is_one_line_naming_it(bundle, tmp_path, capsys):
    src = _good(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(blocker / "out"),
                               "--engine", "eager"])
    assert f"cannot write into the output folder {blocker / 'out'}" in line
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_an_unwritable_output_folder_is_one_line_naming_it(bundle, tmp_path, capsys):
    src = _good(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(out),
                                   "--engine", "eager"])
    finally:
        out.chmod(0o755)
    assert f"cannot write into the output folder {out}" in line and _files(out) == []


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(bundle, tmp_path, capsys, monkeypatch):
    src = _good(tmp_path / "in")

    def full_disk(image, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inference.nib, "save", full_disk)
    out = tmp_path / "out"
    line = _one_error(capsys, ["infer", "--bundle", str(bundle), "--input", str(src), "--output", str(out),
                               "--engine", "eager"])
    assert line == f"error: cannot write {out / 'good.nii.gz'} (No space left on device)"
    assert _files(out) == []


def test_a_folder_run_stopped_half_way_leaves_complete_files_and_a_rerun_completes_it(bundle, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    for name in ("a", "b", "c"):
        _save(_volume(seed=ord(name)), inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    original = inference.save_like
    calls = []

    def interrupted(label, source, target, affine=None):
        calls.append(source.name)
        if len(calls) == 2:  # stopped while writing the second volume
            with inference.atomic_path(target) as tmp:
                tmp.write_bytes(b"half a file")
                raise KeyboardInterrupt
        original(label, source, target, affine)

    monkeypatch.setattr(inference, "save_like", interrupted)
    with pytest.raises(KeyboardInterrupt):
        inference.main(str(bundle), str(inputs), str(out), engine="eager")
    assert _files(out) == ["a.nii.gz"]
    first = (out / "a.nii.gz").read_bytes()
    killed = out / ".partial-4194999-1-b.nii.gz"  # what a SIGKILL leaves: the temporary file of a dead process
    killed.write_bytes(b"half a file")
    monkeypatch.setattr(inference, "save_like", original)
    inference.main(str(bundle), str(inputs), str(out), engine="eager")
    captured = capsys.readouterr()
    assert f"skip: {out / 'a.nii.gz'} exists" in captured.err
    assert _files(out) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert (out / "a.nii.gz").read_bytes() == first
    assert all(nib.load(out / f"{n}.nii.gz").shape == SHAPE for n in "abc")


def test_infer_help_says_how_a_stopped_run_resumes():
    from samora_components.apps.cli import _infer

    assert "without --overwrite to skip the" in _infer.__doc__ and "SAMORA_MAX_VOXELS" in _infer.__doc__


def test_a_folder_with_a_symlink_loop_writes_the_good_volumes(bundle, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _loop(inputs)
    _good(inputs)
    with pytest.raises(SystemExit) as exit_info:
        cli(["infer", "--bundle", str(bundle), "--input", str(inputs), "--output", str(tmp_path / "out"), "--engine", "eager"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loop.nii.gz: cannot be opened" in err and "1 of 2 volumes failed" in err
    assert _files(tmp_path / "out") == ["good.nii.gz"]


# ---- infer: weights and model card ---------------------------------------------------------------


def _bundle_with(tmp_path: Path, bundle: Path, weights=None, card=None, raw: bytes | None = None) -> Path:
    """A copy of ``bundle`` whose model.pt holds ``weights`` (a network's state dict, or ``raw`` bytes)
    and whose model.json holds ``card`` (a dict, or text)."""
    root = tmp_path / "bundle"
    shutil.copytree(bundle, root)
    if raw is not None:
        (root / "models" / "model.pt").write_bytes(raw)
    elif weights is not None:
        torch.save(weights, root / "models" / "model.pt")
    if card is not None:
        (root / "models" / "model.json").write_text(card if isinstance(card, str) else json.dumps(card))
    return root


MODELS = {  # kind -> (bundle change, fragment of the error line)
    "corrupt model.pt": (lambda b: {"raw": b"not a pytorch file" * 10}, "model.pt: not a readable weights file"),
    "truncated model.pt": (lambda b: {"raw": (b / "models" / "model.pt").read_bytes()[:2000]},
                           "model.pt: not a readable weights file, truncated or corrupt?"),
    "weights of another class count": (lambda b: {"weights": _network(4).state_dict()},
                                       "model.pt does not fit the network its model card"),
    "weights of another backbone": (lambda b: {"weights": _network(backbone="tiny_vit").state_dict()},
                                    "model.pt does not fit the network its model card"),
    "card that disagrees with the weights": (lambda b: {"card": {**CARD, "method": "samora", "expert_levels": ["image"]}},
                                             "missing (e.g. encoder."),
    "card that is not JSON": (lambda b: {"card": "{'method': samed"}, "model.json is not valid JSON"),
    "card of another backbone checkpoint": (lambda b: {"card": {**CARD, "backbone_sha256": "0" * 64}},
                                            "model.json does not describe the network of inference.yaml: backbone weights"),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_infer_refuses_weights_that_do_not_fit_in_one_line(bundle, tmp_path, capsys, kind):
    change, fragment = MODELS[kind]
    root = _bundle_with(tmp_path, bundle, **change(bundle))
    out = tmp_path / "out"
    line = _one_error(capsys, ["infer", "--bundle", str(root), "--input", str(_good(tmp_path / "in")), "--output", str(out),
                               "--engine", "eager"])
    assert fragment in line, line
    assert _files(out) == []


def test_another_class_count_names_the_tensor_shapes(bundle, tmp_path, capsys):
    root = _bundle_with(tmp_path, bundle, weights=_network(4).state_dict())
    line = _one_error(capsys, ["infer", "--bundle", str(root), "--input", str(_good(tmp_path / "in")), "--output",
                               str(tmp_path / "out"), "--engine", "eager"])
    assert "num_classes=9" in line and "tensors of another shape" in line


# ---- evaluate ------------------------------------------------------------------------------------


def _labels(seed=0) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:12, 5:12, :] = 1
    label[14:20, 3:9, 1:] = 2
    return label


def test_evaluate_with_no_matching_names_is_one_line(tmp_path, capsys):
    _save(_labels(), tmp_path / "pred" / "case01.nii.gz")
    _save(_labels(), tmp_path / "label" / "case02.nii.gz")
    line = _one_error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                               "--out", str(tmp_path / "eval")])
    assert "no prediction matches a label by name: predictions case01; labels case02" in line
    assert _files(tmp_path / "eval") == []


def test_evaluate_refuses_a_prediction_on_another_grid(tmp_path, capsys):
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    _save(_labels(), tmp_path / "pred" / "case01.nii.gz", flipped)
    _save(_labels(), tmp_path / "label" / "case01.nii.gz")
    line = _one_error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                               "--out", str(tmp_path / "eval")])
    assert "case case01: prediction case01.nii.gz lies on another voxel grid than its label" in line
    assert _files(tmp_path / "eval") == []


def test_evaluate_refuses_negative_label_values(tmp_path, capsys):
    label = _labels().astype(np.int16)
    label[0, 0, 0] = -3
    _save(_labels(), tmp_path / "pred" / "case01.nii.gz")
    _save(label, tmp_path / "label" / "case01.nii.gz")
    line = _one_error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                               "--out", str(tmp_path / "eval")])
    assert "case01.nii.gz: negative label values (down to -3)" in line
    assert _files(tmp_path / "eval") == []


def test_evaluate_stopped_by_a_bad_case_leaves_no_overlay(tmp_path, capsys):
    for name in ("case01", "case02"):
        _save(_labels(), tmp_path / "pred" / f"{name}.nii.gz")
        _save(_volume(), tmp_path / "image" / f"{name}.nii.gz")
    _save(_labels(), tmp_path / "label" / "case01.nii.gz")
    (tmp_path / "label" / "case02.nii.gz").write_bytes(gzip.compress(b"broken"))
    line = _one_error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                               "--image", str(tmp_path / "image"), "--out", str(tmp_path / "eval")])
    assert "case02.nii.gz: not a readable volume" in line
    assert _files(tmp_path / "eval") == []  # the first case's overlay is gone with the run


def test_evaluate_into_a_folder_under_a_regular_file_is_one_line_naming_it(tmp_path, capsys):
    _save(_labels(), tmp_path / "pred" / "case01.nii.gz")
    _save(_labels(), tmp_path / "label" / "case01.nii.gz")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    line = _one_error(capsys, ["evaluate", "--pred", str(tmp_path / "pred"), "--label", str(tmp_path / "label"),
                               "--out", str(blocker / "eval")])
    assert line.startswith(f"error: cannot create the folder {blocker / 'eval'}")
    assert blocker.read_text() == "a file, not a folder"


# ---- convert -------------------------------------------------------------------------------------


def test_convert_names_a_truncated_h5_file(tmp_path, capsys):
    good = tmp_path / "la" / "case01" / "mri_norm2.h5"
    good.parent.mkdir(parents=True)
    with h5py.File(good, "w") as handle:
        handle["image"] = _volume()
        handle["label"] = _labels()
    cut = tmp_path / "la" / "case02" / "mri_norm2.h5"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:1000])
    line = _one_error(capsys, ["convert", "--kind", "la", "--src", str(tmp_path / "la")])
    assert f"{cut}: not a readable HDF5 file, truncated or corrupt?" in line
    assert not (tmp_path / "la" / "datalist.json").exists()


def test_convert_refuses_a_label_on_another_grid_before_writing_copies(tmp_path, capsys):
    src = tmp_path / "amos"
    _save(_volume(), src / "a_ct.nii.gz")
    _save(_labels(), src / "a_label_amos15.nii.gz")
    _save(_volume(), src / "b_ct.nii.gz")
    _save(_labels()[:, :, :2], src / "b_label_amos15.nii.gz")
    line = _one_error(capsys, ["convert", "--kind", "amos", "--src", str(src)])
    assert f"label {src / 'b_label_amos15.nii.gz'} has shape (24, 20, 2), its image" in line
    assert _files(src) == ["a_ct.nii.gz", "a_label_amos15.nii.gz", "b_ct.nii.gz", "b_label_amos15.nii.gz"]


# ---- train and pretrain --------------------------------------------------------------------------


def _datalist(folder: Path, training=None, unlabeled=None, raw: str | None = None, **sections) -> Path:
    """A datalist over small volumes in ``folder`` (cases "a", "b" by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        if not (folder / f"{name}.nii.gz").exists():
            _save(_volume(seed=ord(name)), folder / f"{name}.nii.gz")
            _save(_labels(), folder / f"{name}_label.nii.gz")
    items = [{"image": f"{n}.nii.gz", "label": f"{n}_label.nii.gz"} for n in ("a", "b")]
    content = {"training": items if training is None else training, "validation": [], "test": [],
               "unlabeled": [{"image": it["image"]} for it in items] if unlabeled is None else unlabeled, **sections}
    path = folder / "datalist.json"
    path.write_text(raw if raw is not None else json.dumps(content))
    return path


def _train(capsys, tmp_path: Path, datalist: Path, *extra: str, written: tuple[str, ...] = ()) -> str:
    """Run `train` on a tiny configuration, expect one error line; nothing but ``written`` appears."""
    root = tmp_path / "trained"
    line = _one_error(capsys, ["train", "--bundle", str(CT), "--bundle_root", str(root), "--datalist", str(datalist),
                               "--backbone", "tiny_tinyvit", "--img_size", "32", "--epochs", "1", "--batch_size", "2",
                               *extra])
    assert _files(root) == list(written)  # folders may be prepared
    return line


TRAIN_DATALISTS = {  # kind -> (datalist writer, fragment)
    "datalist with a missing file": (
        lambda d: _datalist(d, training=[{"image": "a.nii.gz", "label": "a_label.nii.gz"},
                                         {"image": "gone.nii.gz", "label": "b_label.nii.gz"}]),
        "1 file(s) of 'training' not found: "),
    "datalist with a duplicate case": (
        lambda d: _datalist(d, training=[{"image": "a.nii.gz", "label": "a_label.nii.gz"},
                                         {"image": "./a.nii.gz", "label": "b_label.nii.gz"}]),
        "./a.nii.gz appears twice in 'training' (also as a.nii.gz)"),
    "datalist whose test cases are training cases": (
        lambda d: _datalist(d, test=[{"image": "b.nii.gz", "label": "b_label.nii.gz"}]),
        "b.nii.gz is in both 'training' and 'test'"),
    "datalist that is not JSON": (lambda d: _datalist(d, raw='{"training": ['), "is not valid JSON"),
    "label on another grid than its image": (
        lambda d: _datalist(d, training=[{"image": "a.nii.gz", "label": str(_save(_labels()[:, :, :2], d / "short.nii.gz"))}]),
        "short.nii.gz has shape (24, 20, 2), its image"),
    "NaN in a training image": (
        lambda d: _datalist(d, training=[{"image": str(_save(np.full(SHAPE, np.nan, np.float32), d / "nan.nii.gz")),
                                          "label": "a_label.nii.gz"}]),
        "nan.nii.gz: image contains NaN or infinite voxels"),
}


@pytest.mark.parametrize("kind", list(TRAIN_DATALISTS))
def test_train_refuses_a_bad_datalist_in_one_line(tmp_path, capsys, kind):
    write, fragment = TRAIN_DATALISTS[kind]
    line = _train(capsys, tmp_path, write(tmp_path / "data"))
    assert fragment in line, line


def test_train_refuses_label_values_outside_the_classes(tmp_path, capsys):
    data = tmp_path / "data"
    big = _labels()
    big[0, 0, 0] = 12
    path = _datalist(data, training=[{"image": "a.nii.gz", "label": str(_save(big, data / "big.nii.gz"))}])
    line = _train(capsys, tmp_path, path, "--train#dataset#num_classes", "@num_classes")
    assert "big.nii.gz: label values 0..12 outside the 9 classes (0..8)" in line


def test_train_names_a_corrupt_expert_file_in_one_line(tmp_path, capsys):
    expert = tmp_path / "lora_image.safetensors"
    expert.write_bytes(b"\xff" * 64)
    line = _train(capsys, tmp_path, _datalist(tmp_path / "data"), "--method", "samora", "--expert_levels", "['image']",
                  "--experts", json.dumps({"image": str(expert)}),
                  written=("runs/samora/train_slices.json",))  # the slice selection, written with the data set
    assert "Error while deserializing header" in line  # safetensors' message (see the module notes)


def test_pretrain_refuses_a_pool_with_a_missing_or_broken_volume(tmp_path, capsys):
    data = tmp_path / "data"
    bad = _raw_nifti(data / "huge_mm.nii", _volume(), np.diag([1e6, 1.0, 1.0, 1.0]))
    for unlabeled, fragment in (([{"image": "a.nii.gz"}, {"image": "gone.nii.gz"}], "1 file(s) of 'unlabeled' not found"),
                                ([{"image": "a.nii.gz"}, {"image": str(bad)}], "huge_mm.nii: voxel spacing (1e+06, 1, 1) mm")):
        root = tmp_path / "pretrained"
        line = _one_error(capsys, ["pretrain", "--bundle", str(CT), "--level", "pixel", "--bundle_root", str(root),
                                   "--datalist", str(_datalist(data, unlabeled=unlabeled)), "--backbone", "tiny_tinyvit",
                                   "--img_size", "32", "--epochs", "1"])
        assert fragment in line, line
        assert _files(root) == []
