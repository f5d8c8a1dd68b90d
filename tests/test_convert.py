"""Datalists for the MR protocols: LA (UA-MT layout) and PROMISE12 folders as released."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from samora_components.convert import la_datalist, main, promise12_datalist


def _h5(path: Path, label: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["image"] = np.zeros((8, 8, 8), np.float32)
        if label:
            handle["label"] = np.zeros((8, 8, 8), np.uint8)


@pytest.fixture()
def la_folder(tmp_path) -> tuple[Path, list[str]]:
    """Six listed training scans (the 1st, 2nd, 4th and 5th labeled), two test scans, one unlisted."""
    ids = [f"SCAN{i:02d}" for i in range(6)]
    for i, scan in enumerate(ids):
        _h5(tmp_path / "la" / scan / "mri_norm2.h5", label=i in (0, 1, 3, 4))
    for scan in ("TEST00", "TEST01"):
        _h5(tmp_path / "la" / scan / "mri_norm2.h5", label=True)
    (tmp_path / "la" / "train.list").write_text("\n".join(ids) + "\nMISSING\n")
    (tmp_path / "la" / "test.list").write_text("TEST00\nTEST01\n")
    return tmp_path / "la", ids


def _ids(items: list[dict]) -> list[str]:
    return [Path(item["image"]).parent.name for item in items]


def test_la_keeps_list_order_labels_and_pool(la_folder):
    src, ids = la_folder
    content = la_datalist(src, validation=1, labeled=4)
    assert _ids(content["training"]) == ["SCAN00", "SCAN01", "SCAN03"]  # list order, labeled only
    assert _ids(content["validation"]) == ["SCAN04"]  # the last of the first 4 labeled
    assert _ids(content["test"]) == ["TEST00", "TEST01"]
    assert _ids(content["unlabeled"]) == ["SCAN00", "SCAN01", "SCAN02", "SCAN03", "SCAN05"]  # no validation scan
    assert content["classes"] == ["background", "left_atrium"]
    with pytest.raises(ValueError, match="cannot hold out"):
        la_datalist(src, validation=4, labeled=4)


def test_cli_writes_relative_paths(la_folder, capsys):
    src, _ = la_folder
    out = src / "datalist.json"
    main("la", str(src), str(out), validation=1)
    content = json.loads(out.read_text())
    assert content["training"][0] == {"image": "SCAN00/mri_norm2.h5", "label": "SCAN00/mri_norm2.h5"}
    assert "3 training, 1 validation, 2 test, 5 unlabeled" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main("brats", str(src))


def test_promise12_split_and_labels(tmp_path):
    for i in range(10):
        image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
        nib.save(image, tmp_path / f"Case{i:02d}.nii.gz")
        if i != 9:
            nib.save(image, tmp_path / f"Case{i:02d}_segmentation.nii.gz")
    content = promise12_datalist(tmp_path, validation=1, labeled=3)
    names = lambda items: [Path(it["image"]).name[:6] for it in items]  # noqa: E731
    assert names(content["training"]) == [f"Case{i:02d}" for i in (0, 1, 3, 4, 5, 6)]  # 80 % of 9 labeled = 7, less 1
    assert names(content["validation"]) == ["Case02"]
    assert names(content["test"]) == ["Case07", "Case08"]
    assert "Case09" in names(content["unlabeled"]) and "Case02" not in names(content["unlabeled"])


def test_real_la_release(shared_data, tmp_path):
    src = shared_data / "la2018"
    if not src.is_dir():
        pytest.skip("LA data absent")
    content = la_datalist(src, validation=1)
    assert len(content["training"]) == 3 and len(content["validation"]) == 1
    assert len(content["unlabeled"]) == 19 and content["test"] == []
    listed = (src / "train.list").read_text().split()
    assert _ids(content["training"]) + _ids(content["validation"]) == listed[:4]
