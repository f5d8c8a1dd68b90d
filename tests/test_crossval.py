"""Leave-one-volume-out: folds never see their held-out volume, every fold is scored with both
protocols and per-organ overlays, and a rerun keeps finished folds."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samora_components.apps import crossval
from samora_components.apps.cli import main as cli
from samora_components.data.phantom import generate

TINY = {"backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data") / "phantom_ct"
    return generate(str(root), "ct", cases=4, unlabeled=0, shape=(40, 40, 8))  # 2 training volumes


def test_a_fold_never_holds_its_held_out_volume():
    items = [{"image": f"/d/case{i}.nii.gz", "label": f"/d/case{i}_label.nii.gz"} for i in range(3)]
    fold = crossval.fold_datalist({"name": "x", "kind": "ct", "classes": ["background", "a"]}, items, 1)
    assert fold["test"] == [items[1]] and fold["training"] == [items[0], items[2]]
    assert [u["image"] for u in fold["unlabeled"]] == ["/d/case0.nii.gz", "/d/case2.nii.gz"]
    assert fold["kind"] == "ct" and fold["validation"] == []


def test_a_fold_takes_the_optimiser_steps_of_the_whole_datalist():
    # the real-CT recipe: 12 epochs of 134 slices at batch 8 = 192 steps (the loader drops partial batches)
    assert crossval.equal_iteration_epochs(12, 8, 134, 22) == 96          # 2 steps an epoch
    assert crossval.equal_iteration_epochs(12, 8, 134, 123) == 13         # 15 steps an epoch: 195 >= 192
    assert crossval.equal_iteration_epochs(12, 8, 134, 134) == 12
    assert crossval.equal_iteration_epochs(3, 8, 10, 5) == 3              # fewer slices than a batch: one step


def test_axial_slices_follow_the_affine_not_the_array_order(tmp_path):
    array = np.zeros((4, 6, 9), np.int16)
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "ras.nii.gz")
    sagittal_first = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 is head-foot
    nib.save(nib.Nifti1Image(array, sagittal_first), tmp_path / "z_first.nii.gz")
    assert crossval.axial_slices(str(tmp_path / "ras.nii.gz")) == 9
    assert crossval.axial_slices(str(tmp_path / "z_first.nii.gz")) == 4


def test_leave_one_out_scores_every_volume_and_resumes(phantom, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lovo"
    training = json.loads(Path(phantom).read_text())["training"]
    argv = ["lovo", "--bundle", "bundles/samora_ct", "--datalist", phantom, "--out", str(out), "--methods", "samed",
            "--profile", "quick", "--epochs", "1", "--batch_size", "4", "--warmup_iters", "1"]
    argv += [f"--{k}={v}" for k, v in TINY.items()]
    cli(argv)
    result = json.loads((out / "lovo.json").read_text())
    assert len(result["folds"]) == len(training) == 2
    spleen = result["table"]["samed"]["spleen"]
    assert set(spleen) == {"dice", "hd95_mm", "hd95_voxels"}
    assert set(spleen["dice"]) == {*result["folds"], "mean"}
    assert all(0.0 <= v <= 1.0 for v in spleen["dice"].values())
    for fold in result["folds"]:
        done = out / f"fold_{fold}"
        held = json.loads((done / "datalist.json").read_text())["test"][0]["image"]
        assert Path(held).name.startswith(fold)
        assert (done / "samed" / "pred" / f"{fold}.nii.gz").is_file()
        assert (done / "samed" / "organs" / "liver.png").is_file()  # every phantom case holds a liver
    printed = capsys.readouterr().out
    assert "| samed | liver |" in printed and "lovo.md" in printed
    table = (out / "lovo.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(crossval.workflow, "run_config", no_training)
    cli(argv)
    assert (out / "lovo.md").read_text() == table


def test_an_unknown_fold_is_a_one_line_error(phantom, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["lovo", "--bundle", "bundles/samora_ct", "--datalist", phantom, "--out", str(tmp_path / "x"),
             "--folds", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --folds nope: not a training volume") and "\n" not in err
    assert not (tmp_path / "x").exists()
