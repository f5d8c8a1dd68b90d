"""Bundle workflows end to end on tiny configurations: stage-2 training through ``train.yaml`` for
both methods and a fusion baseline, the model card, inference with the trained weights, and the MR
bundle's protocol profiles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from samora_components.bundle.inference import BundlePredictor
from samora_components.bundle.workflow import config_files, run_config
from samora_components.data.phantom import generate
from samora_components.networks.lora import save_expert
from samora_components.networks.precision import resolve_precision
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]
TINY = {"backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32}


@pytest.fixture(scope="module")
def ct_phantom(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data") / "phantom_ct"
    return generate(str(root), "ct", cases=3, unlabeled=0, shape=(40, 40, 8))


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, str]:
    """Three random expert files for the tiny backbone (non-zero B, so that they change the encoder)."""
    folder = tmp_path_factory.mktemp("experts")
    net = SAMoraNet(9, backbone="tiny_tinyvit", img_size=32, checkpoint="", method="samed")
    paths = {}
    for i, level in enumerate(("image", "patch", "pixel")):
        torch.manual_seed(i)
        site_experts = net.site_experts(level)  # samed: the one LoRA per site, same layout as an expert
        with torch.no_grad():
            for e in site_experts:
                e.b_q.normal_(0, 0.02)
                e.b_v.normal_(0, 0.02)
        paths[level] = str(folder / f"lora_{level}.safetensors")
        save_expert(site_experts, paths[level], {"level": level, "backbone": net.backbone_name})
    return paths


def _train(tmp_path: Path, datalist: str, method: str, **extra) -> Path:
    root = tmp_path / "bundle"
    run_config(
        "bundles/samora_ct", "train", run_id="training", quick=True, bundle_root=str(root), datalist=datalist,
        **{"method": method, "epochs": 2, "batch_size": 4, "warmup_iters": 2, **TINY, **extra},
    )
    return root


@pytest.mark.parametrize("method,fusion", [("samed", "hl_attn"), ("samora", "hl_attn"), ("samora", "lorahub")])
def test_stage2_training_writes_weights_card_and_segments(tmp_path, ct_phantom, experts, method, fusion):
    root = _train(tmp_path, ct_phantom, method, fusion=fusion, experts=experts, lorahub_batches=1, lorahub_iterations=3)
    weights, card_file = root / "models" / "model.pt", root / "models" / "model.json"
    assert weights.is_file() and card_file.is_file()
    card = json.loads(card_file.read_text())
    assert (card["method"], card["fusion"], card["img_size"], card["num_classes"]) == (method, fusion, 32, 9)
    # the card records what training ran in: auto resolved for this machine's CPU
    assert card["epochs"] == 2 and card["precision_requested"] == "auto"
    assert card["precision"] == resolve_precision("auto").precision

    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state and all(not k.endswith(".attn.base.qkv.weight") for k in state)  # frozen base left out
    assert any(k.startswith("decoder.") for k in state)
    if method == "samora":
        assert any(".experts.pixel." in k for k in state)  # experts travel with the weights
        if fusion == "hl_attn":
            assert any(".fusion." in k for k in state)
    resumable = torch.load(root / "runs" / method / "last.pt", map_location="cpu", weights_only=True)
    assert resumable["trainer"]["max_epochs"] == 2 and resumable["trainer"]["iteration"] > 0

    predictor = BundlePredictor.from_bundle(_with_configs(root))
    image = ConfigParser.load_config_file(ct_phantom)["test"][0]["image"]
    label = predictor(str(Path(ct_phantom).parent / image))
    assert label.shape == (40, 40, 8) and label.dtype == np.uint8
    # the phantom is stored in RAS: the label is the network's argmax on each CT-windowed axial slice
    path = Path(ct_phantom).parent / image
    assert nib.aff2axcodes(nib.load(path).affine) == ("R", "A", "S")
    window = np.clip((nib.load(path).get_fdata() + 125.0) / 400.0, 0.0, 1.0)
    with torch.no_grad():
        logits = predictor.network(torch.as_tensor(window, dtype=torch.float32).permute(2, 0, 1)[:, None])
    expected = logits.argmax(1).permute(1, 2, 0).numpy()
    assert (label == expected).mean() > 0.999


def _with_configs(root: Path) -> Path:
    """The trained folder plus the CT bundle's configs: a complete bundle."""
    if not (root / "configs").exists():
        shutil.copytree(REPO / "bundles" / "samora_ct" / "configs", root / "configs")
    return root


def test_profiles_merge_in_order_and_stage1_adds_its_part():
    mr = "bundles/samora_mr/configs/"
    assert config_files("bundles/samora_mr", "train", profile="la,la_cpu") == [mr + "train.yaml", mr + "la.yaml", mr + "la_cpu.yaml"]
    assert config_files("bundles/samora_mr", ["pretrain", "pretrain_patch"], quick=True, profile=("la",)) == [
        mr + "pretrain.yaml", mr + "pretrain_patch.yaml", mr + "quick.yaml", mr + "quick_pretrain.yaml", mr + "la.yaml",
    ]
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        config_files("bundles/samora_mr", "train", profile="nope")


def _parse(files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(files)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_mr_la_profile_settings():
    parser = _parse(config_files("bundles/samora_mr", "train", profile="la,la_cpu"))
    assert parser.get_parsed_content("num_classes") == 2
    assert parser.get_parsed_content("class_names") == ["background", "left_atrium"]
    assert parser.get_parsed_content("first_cases") == 4 and parser.get_parsed_content("img_size") == 128
    assert parser["intensity"]["_target_"] == "ScaleIntensityRangePercentilesd"
    stage1 = ["pretrain", "cpt_simclr"]
    cpt = _parse(config_files("bundles/samora_mr", stage1, profile="la,la_cpu"))
    expert = _parse(config_files("bundles/samora_mr", ["pretrain", "pretrain_pixel"], profile="la,la_cpu"))
    assert (cpt.get_parsed_content("batch_size"), cpt.get_parsed_content("epochs")) == (64, 15)
    assert (expert.get_parsed_content("batch_size"), expert.get_parsed_content("epoch_length")) == (8, 50)
    promise = _parse(config_files("bundles/samora_mr", "train", profile="promise12"))
    assert promise.get_parsed_content("first_cases") == 3 and promise["class_names"][1] == "prostate"


def test_mr_inference_preprocessing_scales_percentiles_of_an_h5_scan(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(30, 26, 8)).astype(np.float32)
    volume[0, 0, 0] = 50.0  # an outlier beyond the 99.5th percentile is clipped, not used as the maximum
    path = tmp_path / "mri_norm2.h5"
    with h5py.File(path, "w") as handle:
        handle["image"] = volume
    parser = _parse([str(REPO / "bundles" / "samora_mr" / "configs" / "inference.yaml")])
    image = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    assert tuple(image.shape) == (1, 30, 26, 8)
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    lo, hi = np.percentile(volume, [0.5, 99.5])
    mid = float(np.median(volume))
    assert float(image[0].median()) == pytest.approx((mid - lo) / (hi - lo), abs=0.02)


def test_precision_agreement_counts_every_voxel(tmp_path, ct_phantom):
    from samora_components.apps.bench import precision_agreement

    root = _with_configs(_train(tmp_path, ct_phantom, "samed", epochs=1))
    result = precision_agreement(str(root), ct_phantom, "test")
    assert result["cases"] == 1 and result["voxels"] == 40 * 40 * 8
    assert result["agreement"] >= 0.95
    assert result["agreement"] == pytest.approx(result["per_case"]["phantom_ct_002"])  # one case: its number
    # every disagreement lies where one run labels foreground, so that fraction agrees less often
    assert result["foreground_agreement"] <= result["agreement"] + 1e-12
    assert set(result["per_case"]) == {"phantom_ct_002"}


def test_fp16_export_halves_the_file_and_predicts_the_same(tmp_path, ct_phantom):
    from samora_components.bundle.cards import export_weights

    root = _with_configs(_train(tmp_path, ct_phantom, "samed", epochs=1))
    weights = root / "models" / "model.pt"
    half = export_weights(weights, root / "models" / "half.pt")
    assert half.stat().st_size < 0.6 * weights.stat().st_size
    assert json.loads((root / "models" / "half.json").read_text())["weights_dtype"] == "float16"
    nets = []
    for w in (weights, half):
        torch.manual_seed(0)  # the tiny backbone's frozen weights are random: build both alike
        nets.append(BundlePredictor.from_bundle(root, str(w)).network)
    full, halved = nets
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a, b = full(x), halved(x)
    assert (a - b).abs().max() < 1e-2 * a.abs().max()  # fp16 rounding of the weights only
    with pytest.raises(ValueError, match="dtype"):
        export_weights(weights, dtype="int8")


def test_mr_postprocessing_keeps_the_largest_structure_on_the_input_grid(tmp_path):
    volume = np.random.default_rng(0).normal(size=(30, 26, 8)).astype(np.float32)
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as handle:
        handle["image"] = volume
    parser = _parse([str(REPO / "bundles" / "samora_mr" / "configs" / "inference.yaml")])
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    labels = torch.zeros(1, 30, 26, 8, dtype=torch.uint8)  # what the SliceLabelInferer gives
    labels[0, 2:12, 2:12, 1:6] = 1  # the structure
    labels[0, 20:23, 20:23, 2:4] = 1  # a separate false positive
    data["pred"] = labels
    label = parser.get_parsed_content("postprocessing")(data)["pred"]
    assert tuple(label.shape) == (1, 30, 26, 8) and label.dtype == torch.uint8
    assert int(label.sum()) == 10 * 10 * 5 and int(label[0, 20:23, 20:23].sum()) == 0


def test_mr_bundle_trains_on_the_mr_phantom_and_segments_h5(tmp_path):
    datalist = generate(str(tmp_path / "phantom_mr"), "mr", cases=3, unlabeled=0, shape=(32, 32, 8))
    root = tmp_path / "bundle"
    run_config(
        "bundles/samora_mr", "train", run_id="training", quick=True, bundle_root=str(root), datalist=datalist,
        **{"method": "samed", "epochs": 1, "batch_size": 4, "warmup_iters": 1, **TINY},
    )
    card = json.loads((root / "models" / "model.json").read_text())
    assert card["num_classes"] == 2 and card["class_names"] == ["background", "left_atrium"]
    shutil.copytree(REPO / "bundles" / "samora_mr" / "configs", root / "configs")
    scan = tmp_path / "mri_norm2.h5"
    with h5py.File(scan, "w") as handle:  # a UA-MT style file: z-scored image, no geometry
        handle["image"] = np.random.default_rng(0).normal(size=(36, 30, 8)).astype(np.float32)
    torch.manual_seed(0)
    label = BundlePredictor.from_bundle(root)(str(scan))
    assert label.shape == (36, 30, 8) and set(np.unique(label).tolist()) <= {0, 1}
    assert ndimage.label(label, np.ones((3, 3, 3)))[1] <= 1  # post-processing keeps one connected structure
