"""The two bundles share what is the same once (bundles/common/configs) and differ only where the
modality does: intensity scaling, classes, flips, post-processing, default data and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CT, MR = REPO / "bundles" / "samora_ct" / "configs", REPO / "bundles" / "samora_mr" / "configs"

#: top-level keys allowed to differ between the CT and MR copy of a file
ALLOWED = {
    "train.yaml": {"bundle_root", "dataset_dir", "num_classes", "class_names", "intensity", "intensity_source",
                   "flip_prob"},
    "pretrain.yaml": {"bundle_root", "dataset_dir", "intensity", "intensity_source"},
    "inference.yaml": {"bundle_root", "method", "img_size", "num_classes", "class_names", "preprocessing",
                       "postprocessing", "inferer"},  # the slice batch follows the shipped input size (256 px CT, 128 px MR)
    "evaluate.yaml": {"bundle_root", "dataset_dir", "preprocessing", "postprocessing", "intensity", "method",
                      "img_size", "num_classes", "class_names", "inferer"},
}
SHARED = ("cpt_mae.yaml", "cpt_simclr.yaml", "pretrain_image.yaml", "pretrain_patch.yaml", "pretrain_pixel.yaml",
          "quick.yaml", "quick_pretrain.yaml", "multi_gpu_train.yaml", "multi_gpu_pretrain.yaml", "logging.conf")


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_ct_and_mr_files_differ_only_in_allowed_keys(name):
    ct, mr = (yaml.safe_load((folder / name).read_text()) for folder in (CT, MR))
    differing = {k for k in set(ct) | set(mr) if ct.get(k) != mr.get(k)}
    assert differing <= ALLOWED[name], sorted(differing - ALLOWED[name])
    assert "bundle_root" in differing  # the comparison sees real differences


@pytest.mark.parametrize("name", SHARED)
def test_shared_files_live_once(name):
    common = (REPO / "bundles" / "common" / "configs" / name).resolve()
    for folder in (CT, MR):
        assert (folder / name).is_symlink() and (folder / name).resolve() == common
        assert os.path.isfile(folder / name)  # the link resolves in a checkout


def test_the_mr_inference_config_writes_out_the_shipped_model_and_checks_its_card():
    import json

    from monai.bundle import ConfigParser

    from samora_components.bundle.cards import card_mismatches

    parser = ConfigParser()
    parser.read_config(str(MR / "inference.yaml"))
    parser["bundle_root"] = str(REPO / "bundles" / "samora_mr")
    card = json.loads((REPO / "bundles" / "samora_mr" / "models" / "model.json").read_text())
    network = parser.get_parsed_content("network_def")
    assert card_mismatches(network, card) == []
    assert parser.get_parsed_content("network") is not None  # the config's own check passes
    other = {**card, "img_size": 256, "fusion_order": "1-2-1"}
    assert card_mismatches(network, other) == ["img_size=256 (config: 128)", "fusion_order='1-2-1' (config: '2-1-1')"]
    samed = json.loads((REPO / "bundles" / "samora_mr" / "models" / "samed.json").read_text())
    assert any(m.startswith("method='samed'") for m in card_mismatches(network, samed))
