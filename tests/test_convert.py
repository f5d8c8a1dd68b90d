"""Datalist converters: LA / PROMISE12 (few-shot budget) and the Synapse-8 CT kinds (synapse, amos,
totalseg), each on a tiny synthetic tree of its release layout, plus the real folders when present."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from samora_components.apps.cli import main as cli
from samora_components.data.datalists import (
    BTCV_TEST,
    BTCV_TRAINING,
    KINDS,
    amos_datalist,
    la_datalist,
    main,
    promise12_datalist,
    synapse_datalist,
    totalseg_datalist,
)
from samora_components.data.transforms import SYNAPSE_CLASSES

AFFINE = np.array([[0.8, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def _h5(path: Path, label: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["image"] = np.zeros((4, 4, 4), np.float32)
        if label:
            handle["label"] = np.zeros((4, 4, 4), np.uint8)


def _nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _label_volume(values: list[int]) -> np.ndarray:
    """An 8x8x4 uint8 volume holding each of ``values`` in its own voxel (value i at flat index i)."""
    array = np.zeros(8 * 8 * 4, np.uint8)
    array[: len(values)] = values
    return array.reshape(8, 8, 4)


def _flat_values(path: str | Path, count: int) -> list[int]:
    return [int(v) for v in np.asarray(nib.load(str(path)).dataobj).reshape(-1)[:count]]


def _ids(items: list[dict]) -> list[str]:
    return [Path(item["image"]).parent.name for item in items]


def _names(items: list[dict], key: str = "image") -> list[str]:
    return [Path(item[key]).name for item in items]


# ---------------------------------------------------------------- LA / PROMISE12: the few-shot budget


@pytest.fixture()
def la_folder(tmp_path) -> Path:
    """Eight listed training scans (SCAN02 and SCAN05 unlabeled), two test scans, one listed but absent."""
    for i in range(8):
        _h5(tmp_path / "la" / f"SCAN{i:02d}" / "mri_norm2.h5", label=i not in (2, 5))
    for scan in ("TEST00", "TEST01"):
        _h5(tmp_path / "la" / scan / "mri_norm2.h5", label=True)
    (tmp_path / "la" / "train.list").write_text("\n".join(f"SCAN{i:02d}" for i in range(8)) + "\nMISSING\n")
    (tmp_path / "la" / "test.list").write_text("TEST00\nTEST01\n")
    return tmp_path / "la"


def test_la_budget_validation_after_the_budget(la_folder):
    content = la_datalist(la_folder, validation=1, labeled=4)
    assert _ids(content["training"]) == ["SCAN00", "SCAN01", "SCAN03", "SCAN04"]  # the first 4 labeled, list order
    assert _ids(content["validation"]) == ["SCAN06"]  # the next labeled scan after the budget
    assert _ids(content["test"]) == ["TEST00", "TEST01"]
    # every training-list image but the validation scan, budget scans included
    assert _ids(content["unlabeled"]) == ["SCAN00", "SCAN01", "SCAN02", "SCAN03", "SCAN04", "SCAN05", "SCAN07"]
    assert all(set(item) == {"image"} for item in content["unlabeled"])
    assert content["classes"] == ["background", "left_atrium"] and content["kind"] == "mr"
    assert _ids(la_datalist(la_folder, validation=2)["validation"]) == ["SCAN06", "SCAN07"]
    with pytest.raises(ValueError, match="cannot hold out 3 validation scans: only 2"):
        la_datalist(la_folder, validation=3, labeled=4)
    with pytest.raises(ValueError, match="budget of 7 labeled scans, but the training list has only 6"):
        la_datalist(la_folder, labeled=7)


def test_la_evaluation_scans_are_test_only_and_outside_the_pool(la_folder):
    content = la_datalist(la_folder, validation=1, labeled=4, evaluation=1)
    assert _ids(content["validation"]) == ["SCAN06"]
    assert _ids(content["test"]) == ["SCAN07", "TEST00", "TEST01"]  # after the budget and the validation scan
    assert "SCAN07" not in _ids(content["unlabeled"]) and "SCAN06" not in _ids(content["unlabeled"])
    assert _ids(la_datalist(la_folder, labeled=4, evaluation=2)["test"])[:2] == ["SCAN06", "SCAN07"]
    with pytest.raises(ValueError, match="cannot hold out 2 evaluation scans: only 1"):
        la_datalist(la_folder, validation=1, labeled=4, evaluation=2)


def test_la_fully_supervised(la_folder):
    for labeled in (None, 0):
        content = la_datalist(la_folder, labeled=labeled)
        assert _ids(content["training"]) == ["SCAN00", "SCAN01", "SCAN03", "SCAN04", "SCAN06", "SCAN07"]
        assert content["validation"] == [] and len(content["unlabeled"]) == 8
    with pytest.raises(ValueError, match="cannot hold out 1"):
        la_datalist(la_folder, validation=1, labeled=None)


def test_la_budget_never_exceeds_four_labeled_scans(tmp_path):
    """80 listed scans, all labeled: the run touches the first 4 for training and the 5th for validation."""
    ids = [f"ID{i:03d}X" for i in range(80)][::-1]  # list order differs from sorted order
    for scan in ids:
        _h5(tmp_path / scan / "mri_norm2.h5", label=True)
    (tmp_path / "train.list").write_text("\n".join(ids) + "\n")
    content = la_datalist(tmp_path, validation=1)
    assert _ids(content["training"]) == ids[:4]
    assert _ids(content["validation"]) == [ids[4]]
    assert not set(_ids(content["validation"])) & set(ids[:4])
    assert len(content["unlabeled"]) == 79 and ids[4] not in _ids(content["unlabeled"])
    assert content["test"] == []


def test_cli_writes_relative_paths(la_folder, capsys):
    out = la_folder / "datalist.json"
    main("la", str(la_folder), str(out), validation=1)
    content = json.loads(out.read_text())
    assert content["training"][0] == {"image": "SCAN00/mri_norm2.h5", "label": "SCAN00/mri_norm2.h5"}
    assert content["validation"] == [{"image": "SCAN06/mri_norm2.h5", "label": "SCAN06/mri_norm2.h5"}]
    assert capsys.readouterr().out.strip() == f"wrote {out}: 4 training, 1 validation, 2 test, 7 unlabeled"
    assert not list(la_folder.glob("*.partial"))


def test_promise12_split_and_labels(tmp_path):
    for i in range(10):
        image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        nib.save(image, tmp_path / f"Case{i:02d}.nii.gz")
        if i != 9:
            nib.save(image, tmp_path / f"Case{i:02d}_segmentation.nii.gz")
    content = promise12_datalist(tmp_path, validation=1, labeled=3)
    names = lambda items: [Path(it["image"]).name[:6] for it in items]  # noqa: E731
    assert names(content["training"]) == ["Case00", "Case01", "Case02"]
    assert _names(content["training"], "label")[0] == "Case00_segmentation.nii.gz"
    assert names(content["validation"]) == ["Case03"]  # after the budget, inside the training list
    assert names(content["test"]) == ["Case07", "Case08"]  # last 20 % of the 9 labeled cases
    assert names(content["unlabeled"]) == ["Case00", "Case01", "Case02", "Case04", "Case05", "Case06", "Case09"]
    assert len(promise12_datalist(tmp_path, labeled=0)["training"]) == 7
    with pytest.raises(ValueError, match="cannot hold out 5"):
        promise12_datalist(tmp_path, validation=5, labeled=3)  # 7 training-list labeled cases: 3 + 4 at most


def test_real_la_release(shared_data, tmp_path):
    src = shared_data / "la2018"
    if not src.is_dir():
        pytest.skip("LA data absent")
    content = la_datalist(src, validation=16, labeled=4)
    listed = (src / "train.list").read_text().split()
    assert _ids(content["training"]) == listed[:4]
    assert {Path(it["image"]).parts[-3] for it in content["training"]} == {"labeled"}
    assert _ids(content["validation"]) == listed[20:36]
    assert {Path(it["image"]).parts[-3] for it in content["validation"]} == {"validation"}
    assert sorted(_ids(content["unlabeled"])) == sorted(listed[:20]) and content["test"] == []
    with pytest.raises(ValueError, match="cannot hold out 17"):
        la_datalist(src, validation=17)


# ---------------------------------------------------------------- synapse: TransUNet and raw BTCV


def _transunet_tree(root: Path, lists: bool) -> Path:
    data = root / "data" / "Synapse"
    for name in ("case0005_slice000", "case0005_slice001", "case0006_slice000"):
        (data / "train_npz").mkdir(parents=True, exist_ok=True)
        np.savez(data / "train_npz" / f"{name}.npz", image=np.zeros((8, 8), np.float32),
                 label=np.zeros((8, 8), np.uint8))
    for case in ("case0001", "case0002"):
        (data / "test_vol_h5").mkdir(parents=True, exist_ok=True)
        with h5py.File(data / "test_vol_h5" / f"{case}.npy.h5", "w") as handle:
            handle["image"] = np.zeros((2, 8, 8), np.float32)
            handle["label"] = np.zeros((2, 8, 8), np.uint8)
    if lists:
        folder = root / "TransUNet" / "lists" / "lists_Synapse"
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text("case0006_slice000\ncase0005_slice001\ncase0099_slice000\n")
        (folder / "test_vol.txt").write_text("case0002\n")
    return data


def test_synapse_transunet_with_lists(tmp_path, caplog):
    data = _transunet_tree(tmp_path, lists=True)
    with caplog.at_level(logging.WARNING):
        content = synapse_datalist(tmp_path)
    assert _names(content["training"]) == ["case0006_slice000.npz", "case0005_slice001.npz"]  # list order
    assert all(item["image"] == item["label"] for item in content["training"] + content["test"])
    assert content["test"] == [{"image": str(data / "test_vol_h5" / "case0002.npy.h5"),
                                "label": str(data / "test_vol_h5" / "case0002.npy.h5")}]
    assert content["unlabeled"] == [] and content["validation"] == []
    assert content["intensity"] == "scaled01" and "label_source" not in content
    assert content["classes"] == list(SYNAPSE_CLASSES) and content["kind"] == "ct"
    assert "1 scans listed in" in caplog.text  # case0099_slice000


def test_synapse_transunet_without_lists(tmp_path):
    _transunet_tree(tmp_path, lists=False)
    content = synapse_datalist(tmp_path)
    assert _names(content["training"]) == ["case0005_slice000.npz", "case0005_slice001.npz", "case0006_slice000.npz"]
    assert _names(content["test"]) == ["case0001.npy.h5", "case0002.npy.h5"]
    assert not (tmp_path / "labels_synapse8").exists()


BTCV_IDS = list(range(14))  # background + the 13 BTCV organs
BTCV_AS_SYNAPSE = [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0]


def test_synapse_raw_btcv_split_and_remap(tmp_path, caplog):
    root = tmp_path / "btcv" / "RawData" / "Training"
    for case in (1, 5, 6, 8, 41):  # 5, 6 training; 1, 8 test; 41 in neither split
        _nii(root / "img" / f"img{case:04d}.nii.gz", np.full((8, 8, 4), -100, np.int16))
        _nii(root / "label" / f"label{case:04d}.nii.gz", _label_volume(BTCV_IDS))
    _nii(root / "img" / "img0007.nii.gz", np.zeros((8, 8, 4), np.int16))  # training case without a label
    labels_dir = tmp_path / "out" / "labels_synapse8"
    with caplog.at_level(logging.WARNING):
        content = synapse_datalist(tmp_path / "btcv", labels_dir=labels_dir)
    absent = len(BTCV_TRAINING) + len(BTCV_TEST) - 4  # one warning with the count: 30 split cases, 4 complete
    assert caplog.text.count("BTCV cases") == 1 and f"{absent} BTCV cases" in caplog.text
    assert _names(content["training"]) == ["img0005.nii.gz", "img0006.nii.gz"]
    assert _names(content["test"]) == ["img0001.nii.gz", "img0008.nii.gz"]
    assert _names(content["unlabeled"]) == ["img0005.nii.gz", "img0006.nii.gz"]
    assert content["validation"] == [] and content["intensity"] == "hu" and content["label_source"] == "btcv_to_synapse"
    assert [Path(it["label"]) for it in content["training"]] == [labels_dir / f"label000{c}.nii.gz" for c in (5, 6)]
    written = nib.load(content["test"][1]["label"])
    assert written.get_data_dtype() == np.uint8 and np.allclose(written.affine, AFFINE)
    assert _flat_values(content["test"][1]["label"], 14) == BTCV_AS_SYNAPSE  # 6 -> 5, 9 -> 0, 11 -> 8, ...
    assert sorted(p.name for p in labels_dir.iterdir()) == ["label0001.nii.gz", "label0005.nii.gz", "label0006.nii.gz",
                                                            "label0008.nii.gz"]  # no temp files left


def test_cli_synapse_writes_label_copies_beside_the_datalist(tmp_path, capsys):
    for case in (5, 1):
        _nii(tmp_path / "src" / "img" / f"img{case:04d}.nii.gz", np.zeros((8, 8, 4), np.int16))
        _nii(tmp_path / "src" / "label" / f"label{case:04d}.nii.gz", _label_volume(BTCV_IDS))
    out = tmp_path / "lists" / "btcv.json"
    main("synapse", str(tmp_path / "src"), str(out))
    content = json.loads(out.read_text())
    image = str((tmp_path / "src" / "img" / "img0005.nii.gz").resolve())  # not below the datalist: absolute
    assert content["training"] == [{"image": image, "label": "labels_synapse8/label0005.nii.gz"}]
    assert content["test"][0]["label"] == "labels_synapse8/label0001.nii.gz"
    assert _flat_values(out.parent / content["test"][0]["label"], 14) == BTCV_AS_SYNAPSE
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: 1 training, 0 validation, 1 test, 1 unlabeled; "
        f"labels remapped (btcv_to_synapse) into {out.parent / 'labels_synapse8'}")


# ---------------------------------------------------------------- amos


# names drive the remap: this table is not AMOS's id order ("arota" is how AMOS22 spells it)
AMOS_NAMES = {"0": "background", "1": "liver", "2": "Spleen", "3": "kidney_left", "4": "Right Kidney",
              "5": "gall bladder", "6": "stomach", "7": "arota", "8": "pancreas", "9": "postcava", "10": "esophagus"}
AMOS_NAMES_AS_SYNAPSE = [0, 5, 1, 3, 2, 4, 6, 7, 8, 0, 0]


def _amos_release(root: Path) -> Path:
    labeled = {"Tr": ("amos_0001", "amos_0004", "amos_0507"), "Va": ("amos_0008", "amos_0510")}
    for part, cases in labeled.items():
        for case in cases:
            _nii(root / f"images{part}" / f"{case}.nii.gz", np.zeros((8, 8, 4), np.int16))
            _nii(root / f"labels{part}" / f"{case}.nii.gz", _label_volume(list(range(11))))
    for case in ("amos_0100", "amos_0600"):
        _nii(root / "imagesTs" / f"{case}.nii.gz", np.zeros((8, 8, 4), np.int16))
    (root / "dataset.json").write_text(json.dumps({"name": "AMOS", "labels": AMOS_NAMES}))
    return root


def test_amos_release_ct_only_names_drive_the_remap(tmp_path):
    root = _amos_release(tmp_path / "amos22")
    content = amos_datalist(tmp_path, labels_dir=tmp_path / "labels")
    assert _names(content["training"]) == ["amos_0001.nii.gz", "amos_0004.nii.gz"]  # amos_0507 is MR
    assert _names(content["test"]) == ["amos_0008.nii.gz"]  # labelsVa
    assert [Path(it["image"]).relative_to(root).as_posix() for it in content["unlabeled"]] == [
        "imagesTr/amos_0001.nii.gz", "imagesTr/amos_0004.nii.gz", "imagesVa/amos_0008.nii.gz",
        "imagesTs/amos_0100.nii.gz"]
    assert Path(content["test"][0]["label"]) == tmp_path / "labels" / "amos_0008.nii.gz"
    assert _flat_values(content["training"][0]["label"], 11) == AMOS_NAMES_AS_SYNAPSE
    assert content["label_source"] == "amos dataset.json names" and content["intensity"] == "hu"
    assert content["classes"] == list(SYNAPSE_CLASSES) and content["validation"] == []
    everything = amos_datalist(tmp_path, labels_dir=tmp_path / "labels", modality="all")
    assert (len(everything["training"]), len(everything["test"]), len(everything["unlabeled"])) == (3, 2, 7)


def test_amos_release_without_dataset_json_uses_the_preset(tmp_path):
    root = _amos_release(tmp_path)
    (root / "dataset.json").unlink()
    content = amos_datalist(tmp_path, labels_dir=tmp_path / "labels")
    assert content["label_source"] == "amos_to_synapse"
    assert _flat_values(content["training"][0]["label"], 11) == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 8]


def test_amos_flat_pairs(tmp_path):
    for case in ("amos_0001_s0060-0070", "amos_0013_s0050-0060"):
        _nii(tmp_path / f"{case}_ct.nii.gz", np.zeros((8, 8, 4), np.int16))
        _nii(tmp_path / f"{case}_label_amos15.nii.gz", _label_volume(list(range(16))))
    _nii(tmp_path / "amos_0020_s0001-0003_ct.nii.gz", np.zeros((8, 8, 4), np.int16))  # no label: pool only
    content = amos_datalist(tmp_path, labels_dir=tmp_path / "out" / "labels_synapse8")
    assert _names(content["training"]) == ["amos_0001_s0060-0070_ct.nii.gz", "amos_0013_s0050-0060_ct.nii.gz"]
    assert _names(content["training"], "label") == ["amos_0001_s0060-0070.nii.gz", "amos_0013_s0050-0060.nii.gz"]
    assert content["test"] == [] and len(content["unlabeled"]) == 3
    assert _flat_values(content["training"][1]["label"], 16) == [0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 8, 0, 0, 0, 0, 0]


def test_amos_nnunet_v2_dataset_json_and_bad_tables(tmp_path, caplog):
    _nii(tmp_path / "amos_0002_ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    _nii(tmp_path / "amos_0002_label_amos15.nii.gz", _label_volume([0, 1, 2, 3]))
    v2_labels = {"background": 0, "liver": 1, "spleen": 2, "bowel": 3}  # nnU-Net v2 tables map names to ids
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": v2_labels}))
    with caplog.at_level(logging.WARNING):
        content = amos_datalist(tmp_path, labels_dir=tmp_path / "labels")
    assert _flat_values(content["training"][0]["label"], 4) == [0, 5, 1, 0]
    assert "lack right_kidney, left_kidney, gallbladder, stomach, aorta, pancreas" in caplog.text
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"1": "bowel"}}))
    with pytest.raises(ValueError, match="none of the 8 Synapse organs"):
        amos_datalist(tmp_path, labels_dir=tmp_path / "labels")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": ["spleen"]}))
    with pytest.raises(ValueError, match="no readable 'labels' table"):
        amos_datalist(tmp_path, labels_dir=tmp_path / "labels")


def test_real_amos_slabs_match_the_synapse8_labels(shared_data, tmp_path):
    src = shared_data / "amos_slabs"
    if not src.is_dir():
        pytest.skip("AMOS slabs absent")
    content = amos_datalist(src, labels_dir=tmp_path / "labels_synapse8")
    assert len(content["training"]) == 2 and content["test"] == [] and len(content["unlabeled"]) == 2
    for item in content["training"]:
        expected = nib.load(item["image"].replace("_ct.nii.gz", "_label_synapse8.nii.gz"))
        written = nib.load(item["label"])
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(expected.dataobj))
        assert np.allclose(written.affine, expected.affine) and written.get_data_dtype() == np.uint8


# ---------------------------------------------------------------- totalseg


def _totalseg_subject(folder: Path, skip: tuple[str, ...] = ()) -> None:
    """ct.nii.gz + segmentations/: organ k (Synapse order) fills row k; spleen also covers the liver's row."""
    _nii(folder / "ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    organs = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas")
    for k, organ in enumerate(organs):
        if organ in skip:
            continue
        mask = np.zeros((8, 8, 4), np.uint8)
        mask[k] = 1
        if organ == "spleen":
            mask[4, :2] = 1  # overlaps the liver (row 4): liver must win
        _nii(folder / "segmentations" / f"{organ}.nii.gz", mask)
    _nii(folder / "segmentations" / "colon.nii.gz", np.ones((8, 8, 4), np.uint8))  # not a Synapse organ


def test_totalseg_masks_merge_with_overlap(tmp_path, caplog):
    _totalseg_subject(tmp_path / "s0001")
    _totalseg_subject(tmp_path / "s0002", skip=("pancreas",))
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING):
        content = totalseg_datalist(tmp_path, labels_dir=tmp_path / "out")
    assert "8 voxels lie in more than one organ mask" in caplog.text and "no mask for pancreas" in caplog.text
    assert _names(content["training"], "label") == ["s0001.nii.gz", "s0002.nii.gz"]
    assert _ids(content["training"]) == ["s0001", "s0002"] and _ids(content["unlabeled"]) == ["s0001", "s0002"]
    merged = np.asarray(nib.load(content["training"][0]["label"]).dataobj)
    assert [int(merged[k, 5, 0]) for k in range(8)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert np.all(merged[4] == 5)  # the overlap went to the liver
    assert int(np.asarray(nib.load(content["training"][1]["label"]).dataobj).max()) == 7
    assert content["label_source"] == "totalseg_masks" and content["intensity"] == "hu" and content["test"] == []


def test_totalseg_multilabel_subject(tmp_path):
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 52, 8, 90]
    _nii(tmp_path / "patient" / "patient_ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    _nii(tmp_path / "patient" / "patient_seg.nii.gz", _label_volume(ids))
    content = totalseg_datalist(tmp_path / "patient", labels_dir=tmp_path / "labels")
    assert _names(content["training"]) == ["patient_ct.nii.gz"]
    assert Path(content["training"][0]["label"]) == tmp_path / "labels" / "patient.nii.gz"
    assert _flat_values(content["training"][0]["label"], len(ids)) == [0, 1, 2, 3, 4, 5, 6, 8, 7, 0, 0]
    assert content["label_source"] == "totalseg_to_synapse"


def test_real_totalseg_example(shared_data, tmp_path):
    src = shared_data / "totalseg_example_ct"
    if not src.is_dir():
        pytest.skip("TotalSegmentator example absent")
    content = totalseg_datalist(src, labels_dir=tmp_path / "labels_synapse8")
    assert _names(content["training"]) == ["example_ct.nii.gz"] and len(content["unlabeled"]) == 1
    label = nib.load(content["training"][0]["label"])
    assert np.unique(np.asarray(label.dataobj)).tolist() == list(range(9))
    assert np.allclose(label.affine, nib.load(src / "example_seg_fast_force_split.nii.gz").affine)


def test_append_builds_one_ct_training_set_from_two_releases(tmp_path, capsys):
    """convert --append: AMOS slabs, then a TotalSegmentator subject, into one datalist; a case added
    twice, an MR datalist and a missing datalist are one-line errors."""
    amos, total, out = tmp_path / "amos", tmp_path / "total", tmp_path / "ct" / "datalist.json"
    _nii(amos / "amos_0001_ct.nii.gz", np.zeros((8, 8, 4), np.int16))
    _nii(amos / "amos_0001_label_amos15.nii.gz", _label_volume(list(range(16))))
    _totalseg_subject(total / "s0001")
    cli(["convert", "--kind", "amos", "--src", str(amos), "--out", str(out)])
    cli(["convert", "--kind", "totalseg", "--src", str(total), "--out", str(out), "--append", "True"])
    assert "2 training, 0 validation, 0 test, 2 unlabeled" in capsys.readouterr().out
    content = json.loads(out.read_text())
    assert _names(content["training"], "label") == ["amos_0001.nii.gz", "s0001.nii.gz"]
    assert content["label_source"] == "amos_to_synapse+totalseg_masks" and content["kind"] == "ct"
    assert all((out.parent / item["label"]).is_file() for item in content["training"])  # relative to the datalist
    line = _error_line(capsys, "totalseg", str(total), out=str(out), append=True)
    assert "already in the datalist" in line
    assert json.loads(out.read_text()) == content  # nothing changed by the refused call
    la = tmp_path / "la" / "datalist.json"
    line = _error_line(capsys, "amos", str(amos), out=str(tmp_path / "none.json"), append=True)
    assert "no datalist at" in line
    la.parent.mkdir()
    la.write_text(json.dumps({"kind": "mr", "classes": ["background", "left_atrium"], "training": []}))
    assert "kind 'mr'" in _error_line(capsys, "amos", str(amos), out=str(la), append=True)


# ---------------------------------------------------------------- CLI errors


def _error_line(capsys, kind, src, **options) -> str:
    argv = ["convert", "--kind", kind, "--src", src] + [f"--{k}={v}" for k, v in options.items()]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    return captured.err


@pytest.mark.parametrize("kind", KINDS)
def test_cli_empty_folder(tmp_path, capsys, kind):
    assert str(tmp_path) in _error_line(capsys, kind, str(tmp_path))
    assert not (tmp_path / "datalist.json").exists()


def test_cli_unknown_kind_missing_folder_and_refused_options(tmp_path, capsys):
    assert "--kind must be one of la, promise12, synapse, amos, totalseg" in _error_line(capsys, "brats", str(tmp_path))
    assert "no such folder" in _error_line(capsys, "la", str(tmp_path / "absent"))
    refused = _error_line(capsys, "amos", str(tmp_path), validation=2)
    assert "--validation, --evaluation and --labeled apply to la and promise12" in refused
