"""``configs/evaluate.yaml`` of both bundles: a MONAI ``SupervisedEvaluator`` that loads the trained
weights with ``CheckpointLoader``, writes each prediction on its input's grid and scores the written
files with :func:`samora_components.metrics.reports.evaluate_cases`."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

from samora_components.bundle.inference import BundlePredictor
from samora_components.bundle.workflow import run_config
from samora_components.data.phantom import generate
from samora_components.metrics.reports import Case, evaluate, evaluate_cases
from samora_components.networks.samora_net import SAMoraNet
from samora_components.utils import user_error

REPO = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32}
REPORTS = ("metrics.csv", "summary.csv", "summary.json", "dice_bar.png")


def _evaluate(bundle: str, **overrides) -> None:
    """``python -m monai.bundle run evaluating --config_file bundles/<bundle>/configs/evaluate.yaml``."""
    root = REPO / "bundles" / bundle
    run("evaluating", config_file=str(root / "configs" / "evaluate.yaml"), bundle_root=str(root), **overrides)


def _same_summary(found: dict, expected: dict) -> None:
    """Equal per-class and mean Dice/HD95 (to 1e-6) and case counts."""
    assert found["protocol"] == expected["protocol"] and found["cases"] == expected["cases"]
    assert list(found["classes"]) == list(expected["classes"])
    pairs = [(found["mean"], expected["mean"])]
    pairs += [(found["classes"][c], expected["classes"][c]) for c in expected["classes"]]
    for got, want in pairs:
        for key in ("dice", "hd95"):
            if math.isnan(want[key]):
                assert math.isnan(got[key])
            else:
                assert got[key] == pytest.approx(want[key], abs=1e-6)


@pytest.fixture(scope="module")
def mr_trained(tmp_path_factory) -> tuple[str, Path]:
    """An MR phantom (non-square slices) and weights trained on it through ``train.yaml``."""
    tmp = tmp_path_factory.mktemp("mr")
    datalist = generate(str(tmp / "phantom_mr"), "mr", cases=3, unlabeled=0, shape=(36, 30, 8))
    root = tmp / "bundle"
    run_config(
        str(REPO / "bundles" / "samora_mr"), "train", run_id="training", quick=True, bundle_root=str(root),
        datalist=datalist, **{"method": "samed", "epochs": 1, "batch_size": 4, "warmup_iters": 1, **TINY},
    )
    return datalist, root / "models" / "model.pt"


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory) -> dict:
    """A CT phantom test case plus a copy stored in another orientation (A, L, S), and untrained
    tiny weights with their model card: a network whose labels vary in space."""
    tmp = tmp_path_factory.mktemp("ct")
    phantom = Path(generate(str(tmp / "phantom_ct"), "ct", cases=3, unlabeled=0, shape=(40, 36, 8))).parent
    case = json.loads((phantom / "datalist.json").read_text())["test"][0]
    image, label = phantom / case["image"], phantom / case["label"]
    ref = nib.load(str(image))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ref.affine), nib.orientations.axcodes2ornt("ALS"))
    turned = {key: tmp / "turned" / f"{key}s" / "turned.nii.gz" for key in ("image", "label")}
    for key, source in (("image", image), ("label", label)):
        turned[key].parent.mkdir(parents=True)
        nib.save(nib.load(str(source)).as_reoriented(ornt), str(turned[key]))
    datalist = tmp / "datalist.json"
    items = [{"image": str(image), "label": str(label)}, {k: str(v) for k, v in turned.items()}]
    datalist.write_text(json.dumps({"test": items}))

    torch.manual_seed(1)
    net = SAMoraNet(9, backbone="tiny_tinyvit", img_size=32, checkpoint="", method="samed")
    weights = tmp / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save(net.state_dict(), weights)
    card = {"method": "samed", "backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32, "num_classes": 9}
    weights.with_suffix(".json").write_text(json.dumps(card))
    return {"datalist": str(datalist), "weights": weights, "image": image, "label": label, "turned": turned,
            "ornt": ornt}


def test_mr_evaluation_writes_predictions_on_the_input_grid_and_the_reports(tmp_path, mr_trained):
    datalist, weights = mr_trained
    phantom = Path(datalist).parent
    out = tmp_path / "eval"
    _evaluate("samora_mr", dataset_dir=str(phantom), weights=str(weights), output_dir=str(out), precision="fp32")

    items = json.loads(Path(datalist).read_text())["test"]
    assert items
    for item in items:
        source = nib.load(str(phantom / item["image"]))
        pred = nib.load(str(out / "pred" / Path(item["image"]).name))
        assert pred.shape == source.shape == (36, 30, 8)
        assert np.array_equal(pred.affine, source.affine) and pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
    for name in REPORTS:
        assert (out / name).is_file()
    assert (out / "overlays" / f"{Path(items[0]['image']).name.removesuffix('.nii.gz')}.png").is_file()
    with open(out / "metrics.csv") as handle:
        assert next(csv.reader(handle))[0] == "case"  # evaluate_cases' table, not MONAI's
    with open(out / "key_metric" / "metrics.csv") as handle:
        assert next(csv.reader(handle))[0] == "val_mean_dice"

    # what `python -m samora_components evaluate --pred OUT/pred --label labelsTr` gives on the same files
    expected = evaluate(str(out / "pred"), str(phantom / "labelsTr"), "transunet", str(tmp_path / "check"),
                        classes=str(REPO / "bundles" / "samora_mr"))
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["classes"]) == ["left_atrium"]
    _same_summary(summary, expected)


def test_ct_evaluation_predicts_like_infer_on_each_inputs_own_grid(tmp_path, ct_case):
    out = tmp_path / "eval"
    torch.manual_seed(0)  # the tiny backbone's frozen weights are random: build both networks alike
    _evaluate("samora_ct", datalist=ct_case["datalist"], weights=str(ct_case["weights"]), output_dir=str(out),
              precision="fp32", label_map="btcv_to_synapse")
    torch.manual_seed(0)
    predictor = BundlePredictor.from_bundle(REPO / "bundles" / "samora_ct", str(ct_case["weights"]), precision="fp32")

    source = nib.load(str(ct_case["image"]))
    pred = nib.load(str(out / "pred" / ct_case["image"].name))
    labels = np.asarray(pred.dataobj)
    assert np.array_equal(labels, predictor(str(ct_case["image"])))  # the `infer` path, voxel for voxel
    assert len(np.unique(labels)) > 2  # labels vary in space, so the grids below are really compared
    assert pred.shape == source.shape and np.array_equal(pred.affine, source.affine)

    turned_source = nib.load(str(ct_case["turned"]["image"]))
    turned = nib.load(str(out / "pred" / "turned.nii.gz"))
    assert turned.shape == turned_source.shape == (36, 40, 8)
    assert np.array_equal(turned.affine, turned_source.affine)
    assert turned.header["qform_code"] == turned_source.header["qform_code"]
    assert turned.header["sform_code"] == turned_source.header["sform_code"]
    assert np.array_equal(np.asarray(turned.dataobj), np.asarray(pred.as_reoriented(ct_case["ornt"]).dataobj))

    cases = [Case("phantom", out / "pred" / ct_case["image"].name, ct_case["label"]),
             Case("turned", out / "pred" / "turned.nii.gz", ct_case["turned"]["label"])]
    expected = evaluate_cases(cases, "transunet", str(tmp_path / "check"), str(REPO / "bundles" / "samora_ct"),
                              "btcv_to_synapse")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2 and len(summary["classes"]) == 8
    _same_summary(summary, expected)


def _cause(tmp_path, bundle: str = "samora_ct", **overrides) -> BaseException:
    """The error a user can fix behind MONAI's wrapping of a failed ``evaluating`` run."""
    with pytest.raises(Exception) as info:
        _evaluate(bundle, output_dir=str(tmp_path / "eval"), precision="fp32", **overrides)
    cause = user_error(info.value)
    assert cause is not None, info.value
    return cause


def test_missing_weights_or_model_card_is_a_one_line_error(tmp_path, ct_case):
    absent = tmp_path / "absent.pt"
    cause = _cause(tmp_path, datalist=ct_case["datalist"], weights=str(absent))
    assert isinstance(cause, FileNotFoundError) and str(absent) in str(cause) and "\n" not in str(cause)

    bare = tmp_path / "bare.pt"  # weights without their model card
    shutil.copy(ct_case["weights"], bare)
    cause = _cause(tmp_path, datalist=ct_case["datalist"], weights=str(bare))
    assert isinstance(cause, FileNotFoundError) and str(tmp_path / "bare.json") in str(cause)
    assert "\n" not in str(cause)
    assert not (tmp_path / "eval").exists()  # nothing written


def test_an_empty_section_is_named_in_the_error(tmp_path, ct_case):
    cause = _cause(tmp_path, datalist=ct_case["datalist"], weights=str(ct_case["weights"]), section="validation")
    assert isinstance(cause, ValueError) and "'validation'" in str(cause) and ct_case["datalist"] in str(cause)
