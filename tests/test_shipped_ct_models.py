"""The trained models shipped in bundles/samora_ct: plain fp16 state dicts that fit their cards, within
the 25 MB budget, no local paths in the cards, and (when the real CT data is beside the checkout) the
scores of docs/results.md section 10 on a training slab (a regression check of the shipped files;
the quality estimate on unseen volumes is the leave-one-volume-out table of the bundle README)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from samora_components.bundle.inference import BundlePredictor
from samora_components.metrics.cases import case_metrics

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "samora_ct"
MODELS = {"samora": BUNDLE / "models" / "model.pt", "samed": BUNDLE / "models" / "samed.pt"}
SLAB = "amos_slabs/amos_0013_s0050-0060"
#: Dice of spleen, right kidney, left kidney, liver on that slab in fp32 (docs/results.md section 10)
EXPECTED_DICE = {"samora": [0.8933, 0.8682, 0.9078, 0.8407], "samed": [0.8922, 0.8686, 0.9099, 0.8360]}

pytestmark = pytest.mark.skipif(not MODELS["samora"].is_file(), reason="bundles/samora_ct ships no model")


def test_sizes_cards_and_weights():
    models = BUNDLE / "models"
    shipped = [*models.glob("*.pt"), *models.glob("*.json"), *models.glob("experts/*.safetensors")]
    assert sum(p.stat().st_size for p in shipped) <= 25 * 1024 * 1024
    channel_def = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    for method, weights in MODELS.items():
        card = json.loads(weights.with_suffix(".json").read_text())
        assert card["method"] == method and card["backbone"] == "litemedsam" and card["num_classes"] == 9
        assert card["class_names"] == [channel_def[str(i)] for i in range(9)]
        assert card["weights_dtype"] == "float16" and card["img_size"] == 128
        assert not str(card.get("datalist", "")).startswith("/")  # no path of the machine that trained it
        state = torch.load(weights, map_location="cpu", weights_only=True)  # as MONAI Label loads it
        assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("method", ["samora", "samed"])
def test_shipped_model_scores_the_slab_as_recorded(shared_data, method):
    scan = shared_data / f"{SLAB}_ct.nii.gz"
    if not scan.is_file():
        pytest.skip(f"{scan} absent")
    label = BundlePredictor.from_bundle(BUNDLE, str(MODELS[method]))(str(scan))
    truth = np.asarray(nib.load(str(shared_data / f"{SLAB}_label_synapse8.nii.gz")).dataobj)
    assert label.shape == truth.shape and set(np.unique(label).tolist()) <= set(range(9))
    scores = case_metrics(label, truth, [1, 2, 3, 5], protocol="transunet")
    dice = [round(scores[c][0], 4) for c in (1, 2, 3, 5)]
    assert dice == pytest.approx(EXPECTED_DICE[method], abs=2e-3), dice  # the suite runs in fp32 (conftest)
