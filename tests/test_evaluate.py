"""``evaluate``: file matching, CSV/JSON/PNG reports, class lists and the CLI's error handling."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from samora_components.apps.cli import main as cli
from samora_components.metrics.plots import choose_slices, overlay
from samora_components.metrics.reports import evaluate, format_table, match_cases, parse_classes

SHAPE = (20, 18, 8)
SPACING = (2.0, 1.0, 1.5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _save(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def _truth() -> np.ndarray:
    """Class 1: a 6x6x4 box (144 voxels); class 2: a 4x4x4 box (64 voxels)."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:8, 2:8, 2:6] = 1
    gt[12:16, 10:14, 1:5] = 2
    return gt


def _medpy_hd95(pred, gt, spacing=None):
    from medpy.metric.binary import hd95

    return hd95(pred, gt, voxelspacing=spacing)


@pytest.fixture()
def dataset(tmp_path: Path) -> dict:
    """Three cases plus one unmatched file on each side.

    case01: perfect. case02: class 1 misses its first slice (108 of 144 voxels: Dice 216/252 = 6/7).
    case03: class 2 not predicted.
    """
    gt = _truth()
    pred02 = gt.copy()
    pred02[2:8, 2:8, 2] = 0
    pred03 = gt.copy()
    pred03[pred03 == 2] = 0
    for name, pred in (("case01", gt), ("case02", pred02), ("case03", pred03)):
        _save(tmp_path / "labels" / f"{name}.nii.gz", gt)
        _save(tmp_path / "preds" / f"{name}.nii.gz", pred)
        image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32) + 3.0 * (gt > 0)
        _save(tmp_path / "images" / f"{name}_0000.nii.gz", image)
    _save(tmp_path / "labels" / "case04.nii.gz", gt)  # no prediction
    _save(tmp_path / "preds" / "case99.nii.gz", gt)  # no label
    (tmp_path / "preds" / "notes.txt").write_text("not a volume")
    return {"root": tmp_path, "gt": gt, "pred02": pred02}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _png_ok(path: Path, coloured: bool = True) -> np.ndarray:
    """A decodable PNG of a real figure; ``coloured``: it shows colour (bars, contours), not only grey."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    if coloured:
        assert ((pixels.max(-1) - pixels.min(-1)) > 0.3).sum() > 20, f"{path}: no coloured pixels"
    return pixels


def test_evaluate_folders_transunet(dataset, capsys):
    root = dataset["root"]
    out = root / "eval"
    summary = evaluate(str(root / "preds"), str(root / "labels"), "transunet", str(out), image=str(root / "images"))
    err = capsys.readouterr().err
    assert "warning: 1 prediction(s) without a label" in err and "case99" in err
    assert "warning: 1 label(s) without a prediction" in err and "case04" in err

    h = _medpy_hd95(dataset["pred02"] == 1, dataset["gt"] == 1)  # voxels
    assert h > 0
    assert set(summary) == {"protocol", "cases", "classes", "mean"}
    assert summary["protocol"] == "transunet" and summary["cases"] == 3
    assert list(summary["classes"]) == ["class_1", "class_2"]
    assert summary["classes"]["class_1"]["dice"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    assert summary["classes"]["class_1"]["hd95"] == pytest.approx(h / 3)
    assert summary["classes"]["class_2"] == pytest.approx({"dice": 2 / 3, "hd95": 0.0})  # missed -> (0, 0)
    assert summary["mean"]["dice"] == pytest.approx(((1 + 6 / 7 + 1) / 3 + 2 / 3) / 2)
    assert json.loads((out / "summary.json").read_text()) == summary  # floats round-trip exactly

    rows = _read_csv(out / "metrics.csv")
    columns = ["case", "dice_class_1", "hd95_class_1", "dice_class_2", "hd95_class_2", "mean_dice", "mean_hd95"]
    assert list(rows[0]) == columns
    assert [r["case"] for r in rows] == ["case01", "case02", "case03"]
    by_case = {r["case"]: {k: float(v) for k, v in r.items() if k != "case"} for r in rows}
    assert by_case["case01"] == pytest.approx(dict(zip(columns[1:], [1, 0, 1, 0, 1, 0])))
    assert by_case["case02"]["dice_class_1"] == pytest.approx(6 / 7)
    assert by_case["case02"]["hd95_class_1"] == pytest.approx(h)
    assert by_case["case02"]["mean_dice"] == pytest.approx((6 / 7 + 1) / 2)
    assert by_case["case03"]["dice_class_2"] == 0.0 and by_case["case03"]["mean_dice"] == 0.5

    summary_rows = _read_csv(out / "summary.csv")
    assert [r["class"] for r in summary_rows] == ["class_1", "class_2", "mean"]
    assert float(summary_rows[-1]["dice"]) == pytest.approx(summary["mean"]["dice"])
    assert float(summary_rows[0]["hd95"]) == pytest.approx(h / 3)

    _png_ok(out / "dice_bar.png")
    for name in ("case01", "case02", "case03"):
        _png_ok(out / "overlays" / f"{name}.png")
    assert not list(out.glob(".*.tmp")) and not list((out / "overlays").glob(".*.tmp"))


def test_evaluate_spacing_protocol_and_named_classes(dataset):
    root = dataset["root"]
    summary = evaluate(str(root / "preds"), str(root / "labels"), "spacing", str(root / "mm"), classes="liver,spleen")
    h_mm = _medpy_hd95(dataset["pred02"] == 1, dataset["gt"] == 1, SPACING)
    assert list(summary["classes"]) == ["liver", "spleen"]
    assert summary["classes"]["liver"] == pytest.approx({"dice": (1 + 6 / 7 + 1) / 3, "hd95": h_mm / 3})
    # case03 misses the spleen: Dice 0 counts, HD95 is undefined and left out of the mean
    assert summary["classes"]["spleen"] == pytest.approx({"dice": 2 / 3, "hd95": 0.0})
    rows = _read_csv(root / "mm" / "metrics.csv")
    assert list(rows[0])[1:3] == ["dice_liver", "hd95_liver"]
    assert rows[2]["dice_spleen"] == "0.0" and math.isnan(float(rows[2]["hd95_spleen"]))
    assert "HD95 (mm)" in format_table(summary)


def test_file_and_folder_matching(dataset, tmp_path):
    root = dataset["root"]
    single = tmp_path / "other" / "my_prediction.nii.gz"
    _save(single, dataset["pred02"])
    summary = evaluate(str(single), str(root / "labels" / "case02.nii.gz"), out=str(tmp_path / "one"))
    assert summary["cases"] == 1
    assert summary["classes"]["class_1"]["dice"] == pytest.approx(6 / 7)
    # a file against a folder is matched by name
    cases = match_cases(root / "preds" / "case03.nii.gz", root / "labels")
    assert [(c.name, c.label.name) for c in cases] == [("case03", "case03.nii.gz")]
    with pytest.raises(ValueError, match="no prediction matches"):
        match_cases(single, root / "labels")


def test_nothing_matches_lists_names(tmp_path):
    _save(tmp_path / "p" / "alpha.nii.gz", _truth())
    _save(tmp_path / "l" / "beta.nii.gz", _truth())
    with pytest.raises(ValueError, match="alpha.*beta"):
        evaluate(str(tmp_path / "p"), str(tmp_path / "l"), out=str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no volume files"):
        evaluate(str(tmp_path / "empty"), str(tmp_path / "l"), out=str(tmp_path / "out"))


def test_shape_mismatch_names_the_case(tmp_path):
    _save(tmp_path / "p" / "c7.nii.gz", _truth()[:, :, :6])
    _save(tmp_path / "l" / "c7.nii.gz", _truth())
    with pytest.raises(ValueError, match="c7.*shape"):
        evaluate(str(tmp_path / "p"), str(tmp_path / "l"), out=str(tmp_path / "out"))


def test_h5_predictions_under_label_key(tmp_path):
    h5py = pytest.importorskip("h5py")
    gt = _truth()
    _save(tmp_path / "l" / "case05.nii.gz", gt)
    (tmp_path / "p").mkdir()
    with h5py.File(tmp_path / "p" / "case05.h5", "w") as handle:
        handle["label"] = (gt > 0).astype(np.uint8)
    summary = evaluate(str(tmp_path / "p"), str(tmp_path / "l"), out=str(tmp_path / "out"), classes="binary")
    # "binary" scores id 1 only: the truth's class 2 is not foreground, the prediction (all 1) spills into it
    assert list(summary["classes"]) == ["foreground"]
    assert summary["classes"]["foreground"]["dice"] == pytest.approx(2 * 144 / (208 + 144))


def test_class_presets_and_json(tmp_path):
    synapse = parse_classes("synapse")
    assert list(synapse) == list(range(1, 9))
    organs = ["spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas"]
    assert list(synapse.values()) == organs
    assert parse_classes("binary") == {1: "foreground"}
    assert parse_classes("liver, spleen") == {1: "liver", 2: "spleen"}
    assert parse_classes(("a", "b")) == {1: "a", 2: "b"}  # Fire turns a,b into a tuple
    assert parse_classes(None) is None

    plain = tmp_path / "classes.json"
    plain.write_text(json.dumps({"0": "background", "2": "kidney", "1": "spleen", "52": "aorta"}))
    assert parse_classes(str(plain)) == {1: "spleen", 2: "kidney", 52: "aorta"}

    bundle = tmp_path / "bundle" / "configs"
    bundle.mkdir(parents=True)
    channels = {"0": "background", "1": "gland", "2": "zone"}
    metadata = {"network_data_format": {"outputs": {"pred": {"channel_def": channels}}}}
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    assert parse_classes(str(bundle / "metadata.json")) == {1: "gland", 2: "zone"}
    assert parse_classes(str(tmp_path / "bundle")) == {1: "gland", 2: "zone"}

    with pytest.raises(FileNotFoundError):
        parse_classes(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="repeated"):
        parse_classes("liver,liver")
    (tmp_path / "bad.json").write_text(json.dumps({"network_data_format": {}}))
    with pytest.raises(ValueError, match="channel_def"):
        parse_classes(str(tmp_path / "bad.json"))


def test_synapse_preset_scores_all_eight_classes(dataset):
    root = dataset["root"]
    summary = evaluate(str(root / "preds"), str(root / "labels"), out=str(root / "syn"), classes="synapse")
    assert len(summary["classes"]) == 8
    assert summary["classes"]["spleen"]["dice"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    assert summary["classes"]["liver"] == {"dice": 0.0, "hd95": 0.0}  # never present: TransUNet rule (0, 0)
    rows = _read_csv(root / "syn" / "metrics.csv")
    assert len(rows[0]) == 1 + 2 * 8 + 2


def test_main_missing_path_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--pred", str(tmp_path / "nope"), "--label", str(tmp_path / "labels"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert captured.out == ""


def test_main_unknown_protocol_and_success(dataset, capsys):
    root = dataset["root"]
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--pred", str(root / "preds"), "--label", str(root / "labels"), "--protocol", "dice-only",
             "--out", str(root / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown protocol 'dice-only'")

    cli(["evaluate", "--pred", str(root / "preds"), "--label", str(root / "labels"), "--out", str(root / "ok"),
         "--classes", "liver,spleen"])
    out = capsys.readouterr().out
    assert "liver" in out and "mean" in out and "metrics.csv" in out and "dice_bar.png" in out


def test_format_table_layout():
    summary = {
        "protocol": "spacing",
        "cases": 2,
        "classes": {"liver": {"dice": 0.91234, "hd95": 4.5}, "gallbladder": {"dice": 0.5, "hd95": float("nan")}},
        "mean": {"dice": 0.70617, "hd95": 4.5},
    }
    lines = format_table(summary).splitlines()
    assert "spacing" in lines[0] and "2 case" in lines[0]
    body = [line for line in lines if line.startswith(("liver", "gallbladder", "mean"))]
    assert len(body) == 3 and len({len(line) for line in body}) == 1  # fixed width
    assert "0.9123" in body[0] and "4.50" in body[0] and "nan" in body[1] and "0.7062" in body[2]


def test_choose_slices_and_overlay_without_truth(tmp_path):
    volume = np.zeros((6, 6, 10), np.uint8)
    volume[:, :, 7] = 1  # 36 voxels
    volume[:4, :, 2] = 2  # 24
    volume[:2, :2, 5] = 1  # 4
    volume[0, 0, 9] = 1  # 1
    assert choose_slices(volume, n=3) == [2, 5, 7]
    assert choose_slices(volume, n=1) == [7]
    assert choose_slices(np.zeros((4, 4, 5)), n=1) == [2]  # nothing: the middle slice
    assert choose_slices(volume, n=50) == list(range(10))

    image = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32)
    names = {1: "a", 2: "b"}
    overlay(image, None, volume[:, :, 2], tmp_path / "o" / "p.png", title="prediction only", class_names=names)
    overlay(image, volume[:, :, 7], volume[:, :, 2], tmp_path / "o" / "both.png")
    for name in ("p.png", "both.png"):  # the contours are drawn in the class colours over a grey slice
        _png_ok(tmp_path / "o" / name)
    blank = np.zeros((6, 6), dtype=np.uint8)
    overlay(image, blank, blank, tmp_path / "o" / "none.png")

    def coloured(name: str) -> int:
        pixels = matplotlib.image.imread(tmp_path / "o" / name)[..., :3]
        return int(((pixels.max(-1) - pixels.min(-1)) > 0.3).sum())

    assert coloured("none.png") < coloured("both.png")  # the colour comes from the contours


def test_label_map_scores_btcv_ids_like_synapse_ids(tmp_path):
    """A BTCV label volume (liver 6, stomach 7, aorta 8, pancreas 11, IVC 9) remapped with
    btcv_to_synapse scores exactly like the same anatomy written in Synapse ids."""
    synapse = np.zeros(SHAPE, np.uint8)
    synapse[1:7, 1:7, 1:5] = 5  # liver
    synapse[9:13, 2:6, 2:6] = 6  # stomach
    synapse[14:17, 12:15, 0:8] = 7  # aorta
    synapse[3:6, 12:16, 3:6] = 8  # pancreas
    btcv = np.zeros_like(synapse)
    for syn_id, btcv_id in ((5, 6), (6, 7), (7, 8), (8, 11)):
        btcv[synapse == syn_id] = btcv_id
    btcv[17:19, 1:3, 1:3] = 9  # IVC: no Synapse class, must become background
    pred = synapse.copy()
    pred[1:7, 1:7, 1] = 0  # a liver slice missed
    pred[9:13, 2:6, 2] = 0
    _save(tmp_path / "pred" / "case.nii.gz", pred)
    _save(tmp_path / "syn" / "case.nii.gz", synapse)
    _save(tmp_path / "btcv" / "case.nii.gz", btcv)
    expected = evaluate(str(tmp_path / "pred"), str(tmp_path / "syn"), out=str(tmp_path / "e1"), classes="synapse")
    remapped = evaluate(str(tmp_path / "pred"), str(tmp_path / "btcv"), out=str(tmp_path / "e2"), classes="synapse",
                        label_map="btcv_to_synapse")
    raw = evaluate(str(tmp_path / "pred"), str(tmp_path / "btcv"), out=str(tmp_path / "e3"), classes="synapse")
    assert remapped == expected
    assert expected["classes"]["liver"]["dice"] == pytest.approx(2 * 108 / (144 + 108))
    # without the remap BTCV's liver (6) is scored as the Synapse stomach (6)
    assert raw["classes"]["stomach"]["dice"] == 0.0 and raw["mean"]["dice"] < expected["mean"]["dice"]


def test_cli_label_map_unknown_preset_is_one_line(tmp_path, capsys):
    _save(tmp_path / "p.nii.gz", _truth())
    _save(tmp_path / "l.nii.gz", _truth())
    with pytest.raises(SystemExit) as exit_info:
        cli(["evaluate", "--pred", str(tmp_path / "p.nii.gz"), "--label", str(tmp_path / "l.nii.gz"), "--out",
             str(tmp_path / "e"), "--label_map", "nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown label map 'nope'") and "\n" not in err
