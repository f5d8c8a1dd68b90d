"""Tests of the synthetic CT / MR phantom generator (samora_components.data.phantom)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from samora_components.data import phantom
from samora_components.data.phantom import CT_TISSUE_HU, SYNAPSE_CLASSES, generate, main, make_ct_case, make_mr_case

ORGANS = {name: index for index, name in enumerate(SYNAPSE_CLASSES)}
TISSUE = {name: index for index, name in enumerate(CT_TISSUE_HU)}

# generous voxel-count bounds at the default 4 x 4 x 5 mm grid (80 mm^3 per voxel)
COUNT_BOUNDS = {
    "spleen": (800, 8000),
    "right_kidney": (600, 5000),
    "left_kidney": (600, 5000),
    "gallbladder": (120, 1500),
    "liver": (10000, 45000),
    "stomach": (1000, 10000),
    "aorta": (700, 3000),
    "pancreas": (250, 2500),
}
# tissue whose design HU an organ's voxels are compared with
MAIN_TISSUE = {
    "spleen": "spleen",
    "right_kidney": "kidney_cortex",
    "left_kidney": "kidney_cortex",
    "gallbladder": "gallbladder",
    "liver": "liver",
    "stomach": "stomach_content",
    "aorta": "aorta",
    "pancreas": "pancreas",
}


@pytest.fixture(scope="module")
def ct_cases():
    """Six CT cases (image, label, tissue) of seed 0."""
    return [phantom._ct_case(np.random.default_rng([0, i]), phantom.CT_SHAPE, phantom.CT_SPACING) for i in range(6)]


def _centroid_mm(mask: np.ndarray, shape=phantom.CT_SHAPE, spacing=phantom.CT_SPACING) -> np.ndarray:
    """World (RAS, mm) centroid of a mask on the centred default grid."""
    index = np.argwhere(mask).mean(axis=0)
    return (index - (np.asarray(shape) - 1) / 2) * np.asarray(spacing)


# ------------------------------------------------------------------------------------------ CT


def test_ct_case_shapes_types_and_determinism():
    image, label = make_ct_case(np.random.default_rng([5, 1]))
    assert image.shape == label.shape == (96, 96, 48)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    again_image, again_label = make_ct_case(np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    other_image, other_label = make_ct_case(np.random.default_rng([6, 1]))
    assert not np.array_equal(label, other_label)
    assert np.abs(image - other_image).mean() > 20.0


def test_ct_every_organ_present_with_sensible_size(ct_cases):
    for _, label, _ in ct_cases:
        assert set(np.unique(label).tolist()) == set(range(9))
        for name, (low, high) in COUNT_BOUNDS.items():
            count = int((label == ORGANS[name]).sum())
            assert low <= count <= high, (name, count)


def test_ct_organ_mean_hu_matches_design(ct_cases):
    for image, label, tissue in ct_cases:
        for name, tissue_name in MAIN_TISSUE.items():
            voxels = image[(label == ORGANS[name]) & (tissue == TISSUE[tissue_name])]
            assert voxels.size > 50, name
            assert abs(float(voxels.mean()) - CT_TISSUE_HU[tissue_name]) <= 25.0, (name, float(voxels.mean()))
        # organs painted from one tissue: the whole label has the design HU
        for name in ("spleen", "gallbladder", "liver", "aorta", "pancreas"):
            mean = float(image[label == ORGANS[name]].mean())
            assert abs(mean - CT_TISSUE_HU[name]) <= 25.0, (name, mean)
        # kidneys: bright cortex around a darker medulla, both labelled
        for name in ("right_kidney", "left_kidney"):
            kidney = label == ORGANS[name]
            cortex = image[kidney & (tissue == TISSUE["kidney_cortex"])].mean()
            medulla = image[kidney & (tissue == TISSUE["kidney_medulla"])]
            assert medulla.size > 20 and cortex - medulla.mean() > 100.0
        stomach = label == ORGANS["stomach"]
        wall = image[stomach & (tissue == TISSUE["stomach_wall"])].mean()
        assert abs(wall - CT_TISSUE_HU["stomach_wall"]) <= 25.0
        air = stomach & (tissue == TISSUE["stomach_air"])
        if air.any():
            assert image[air].mean() < -800.0


def test_ct_body_background_and_noise(ct_cases):
    for image, label, tissue in ct_cases:
        corner = image[:8, :8, :]  # air outside the body
        assert abs(float(corner.mean()) + 1000.0) < 8.0
        assert 8.0 < float(corner.std()) < 15.0  # Gaussian noise sd ~12 HU (lower tail clipped at -1024)
        body = tissue != TISSUE["air"]
        assert 0.35 < body.mean() < 0.75  # ~32 x 24 cm ellipse in a 38 x 38 cm field
        assert abs(float(image[tissue == TISSUE["fat"]].mean()) + 100.0) < 20.0
        assert float(image[tissue == TISSUE["bone"]].mean()) > 400.0
        # organs lie inside the abdominal cavity: never on air, subcutaneous fat or the field edge
        organs = label > 0
        assert not (organs & np.isin(tissue, [TISSUE["air"], TISSUE["fat"], TISSUE["bone"]])).any()
        assert not organs[[0, 1, -2, -1]].any() and not organs[:, [0, 1, -2, -1]].any()


def test_ct_anatomical_layout(ct_cases):
    """RAS: +x patient left, +y anterior, +z superior."""
    for _, label, _ in ct_cases:
        c = {name: _centroid_mm(label == index) for name, index in ORGANS.items() if index}
        assert c["liver"][0] < -20 and c["spleen"][0] > 50 and c["stomach"][0] > 20
        assert c["right_kidney"][0] < -40 and c["left_kidney"][0] > 40
        assert c["right_kidney"][2] < c["left_kidney"][2]  # right kidney lower
        assert c["liver"][2] > c["right_kidney"][2] + 40 and c["spleen"][2] > c["left_kidney"][2] + 40
        assert c["spleen"][1] < c["stomach"][1]  # spleen posterior to stomach
        assert c["right_kidney"][1] < -20 and c["left_kidney"][1] < -20
        assert c["stomach"][1] > 0 and c["gallbladder"][1] > 0
        assert c["gallbladder"][2] < c["liver"][2]
        assert -5 < c["aorta"][0] < 35 and -40 < c["aorta"][1] < 5
        assert c["pancreas"][1] > c["aorta"][1]  # pancreas anterior to the aorta
        aorta = label == ORGANS["aorta"]
        assert aorta.any(axis=(0, 1)).all()  # aorta in every slice


# ------------------------------------------------------------------------------------------ MR


def test_mr_case_binary_fraction_intensity_and_determinism():
    for index in range(4):
        image, label = make_mr_case(np.random.default_rng([0, index]))
        assert image.shape == label.shape == (96, 96, 40)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.005 <= label.mean() <= 0.15
        assert image.min() >= 0.0 and 300.0 < image.max() < 1500.0
        assert image[label == 1].mean() > 2.0 * image[label == 0].mean()
        centre = _centroid_mm(label == 1, (96, 96, 40), (1.25, 1.25, 2.5))
        assert np.all(np.abs(centre) < 25.0)
    first = make_mr_case(np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(first[0], make_mr_case(np.random.default_rng([0, 0]))[0])
    assert not np.array_equal(first[1], make_mr_case(np.random.default_rng([1, 0]))[1])


# ------------------------------------------------------------------------------------------ dataset


def test_generate_ct_dataset(tmp_path):
    out = tmp_path / "phantom_ct"
    path = generate(str(out), kind="ct", cases=5, seed=3, unlabeled=2)
    assert path == os.path.join(str(out), "datalist.json")
    content = json.loads((out / "datalist.json").read_text())
    assert content["name"] == "SAMora phantom CT" and content["kind"] == "ct" and content["seed"] == 3
    assert content["classes"] == list(SYNAPSE_CLASSES)
    assert [len(content[key]) for key in ("training", "validation", "test", "unlabeled")] == [3, 1, 1, 2]
    names = [os.path.basename(item["image"]) for key in ("training", "validation", "test") for item in content[key]]
    assert names == [f"phantom_ct_{i:03d}.nii.gz" for i in range(5)]
    assert [item["image"] for item in content["unlabeled"]] == ["imagesUn/phantom_ct_005.nii.gz", "imagesUn/phantom_ct_006.nii.gz"]
    assert all(set(item) == {"image"} for item in content["unlabeled"])
    for key in ("training", "validation", "test"):
        for item in content[key]:
            assert set(item) == {"image", "label"}
            assert item["image"] == "imagesTr/" + os.path.basename(item["label"]) and item["label"].startswith("labelsTr/")
    for key in ("training", "validation", "test", "unlabeled"):
        for item in content[key]:
            for rel in item.values():
                assert not os.path.isabs(rel) and (out / rel).is_file()
    assert not list(out.rglob("*.partial.*"))

    image = nib.load(str(out / "imagesTr" / "phantom_ct_000.nii.gz"))
    label = nib.load(str(out / "labelsTr" / "phantom_ct_000.nii.gz"))
    expected_affine = np.diag([4.0, 4.0, 5.0, 1.0])
    expected_affine[:3, 3] = [-190.0, -190.0, -117.5]
    for img in (image, label):
        assert img.shape == (96, 96, 48)
        np.testing.assert_allclose(img.affine, expected_affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    # the file is case 0 drawn from its own generator, rounded to integer HU
    ref_image, ref_label = make_ct_case(np.random.default_rng([3, 0]))
    np.testing.assert_array_equal(np.asarray(label.dataobj), ref_label)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.round(ref_image).astype(np.int16))
    # the liver (label 5) lies on the patient's right: negative world x through the affine
    liver_index = np.argwhere(np.asarray(label.dataobj) == 5).mean(axis=0)
    assert (label.affine @ np.r_[liver_index, 1.0])[0] < -20.0

    # MONAI reads it as a decathlon datalist with absolute paths
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training", base_dir=str(out))
    assert len(items) == 3 and all(os.path.isfile(item["label"]) for item in items)


def test_generate_is_deterministic(tmp_path):
    first = generate(str(tmp_path / "a"), cases=2, seed=7, unlabeled=1)
    second = generate(str(tmp_path / "b"), cases=2, seed=7, unlabeled=1)
    third = generate(str(tmp_path / "c"), cases=2, seed=8, unlabeled=1)
    base_a, base_b, base_c = (os.path.dirname(p) for p in (first, second, third))
    for rel in ("imagesTr/phantom_ct_000.nii.gz", "labelsTr/phantom_ct_001.nii.gz", "imagesUn/phantom_ct_002.nii.gz"):
        with open(os.path.join(base_a, rel), "rb") as a, open(os.path.join(base_b, rel), "rb") as b, open(os.path.join(base_c, rel), "rb") as c:
            data_a = a.read()
            assert data_a == b.read()
            assert data_a != c.read()
    assert json.load(open(first))["training"] == json.load(open(second))["training"]


def test_generate_mr_dataset(tmp_path):
    path = generate(str(tmp_path / "phantom_mr"), kind="mr", cases=3, seed=1)
    content = json.load(open(path))
    assert content["classes"] == ["background", "foreground"] and content["name"] == "SAMora phantom MR"
    assert [len(content[key]) for key in ("training", "validation", "test", "unlabeled")] == [1, 1, 1, 0]
    item = content["test"][0]
    assert item["image"] == "imagesTr/phantom_mr_002.nii.gz"
    image = nib.load(os.path.join(tmp_path, "phantom_mr", item["image"]))
    label = np.asarray(nib.load(os.path.join(tmp_path, "phantom_mr", item["label"])).dataobj)
    assert image.shape == (96, 96, 40) and image.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.diag(image.affine)[:3], [1.25, 1.25, 2.5])
    assert set(np.unique(label).tolist()) == {0, 1} and 0.005 <= label.mean() <= 0.15


def test_generate_custom_shape_keeps_field_of_view(tmp_path):
    path = generate(str(tmp_path / "small"), cases=2, seed=0, shape=(64, 64, 32))
    item = json.load(open(path))["training"][0]
    label = nib.load(os.path.join(tmp_path, "small", item["label"]))
    assert label.shape == (64, 64, 32)
    np.testing.assert_allclose(np.diag(label.affine)[:3], [6.0, 6.0, 7.5])
    np.testing.assert_allclose(label.affine[:3, 3], [-189.0, -189.0, -116.25])
    assert set(np.unique(np.asarray(label.dataobj)).tolist()) == set(range(9))


@pytest.mark.parametrize(
    "cases, test_fraction, val_cases, expected",
    [
        (2, 0.2, 1, (1, 0, 1)),
        (3, 0.2, 1, (1, 1, 1)),
        (10, 0.2, 1, (7, 1, 2)),
        (12, 0.2, 2, (8, 2, 2)),
        (4, 1.0, 1, (1, 0, 3)),
        (6, 0.0, 9, (1, 4, 1)),
    ],
)
def test_split_sizes(cases, test_fraction, val_cases, expected):
    assert phantom._split_sizes(cases, test_fraction, val_cases) == expected


def test_generate_rejects_bad_arguments(tmp_path):
    for cases in (0, 1):
        with pytest.raises(ValueError, match="at least 2"):
            generate(str(tmp_path / "x"), cases=cases)
    with pytest.raises(ValueError, match="kind"):
        generate(str(tmp_path / "x"), kind="pet")
    with pytest.raises(ValueError, match="test_fraction"):
        generate(str(tmp_path / "x"), test_fraction=1.5)
    assert not (tmp_path / "x" / "datalist.json").exists()


def test_main_prints_summary(tmp_path, capsys):
    out = str(tmp_path / "phantom_mr")
    main(out, kind="mr", cases=2, seed=0, unlabeled=1)
    line = capsys.readouterr().out.strip()
    assert line == f"wrote 2 labeled (+1 unlabeled) mr phantom cases to {out} (datalist: {os.path.join(out, 'datalist.json')})"
    assert os.path.isfile(os.path.join(out, "imagesUn", "phantom_mr_002.nii.gz"))
