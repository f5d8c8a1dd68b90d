"""The paper's protocols run right: intensities windowed once, the recipe as published, the last
epoch written when there is no validation split, and no synthetic data behind a user's back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

from samora_components.bundle.workflow import config_files, run_config
from samora_components.data.phantom import generate
from samora_components.engines.schedules import WarmupCosine, WarmupPoly, scaled_lr

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "bundles" / "samora_ct"
TINY = {"backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 32}


def _causes(err: BaseException) -> str:
    """The messages of an exception and of everything it was raised from (MONAI wraps config errors)."""
    messages = []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(messages)


def _parsed(files: list[str], key: str, **overrides):
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for name, value in overrides.items():
        parser[name] = value
    return parser.get_parsed_content(key)


# ---- 1. TransUNet Synapse files are already windowed: never window them twice --------------------
@pytest.fixture()
def transunet_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    scaled = rng.uniform(0, 1, size=(12, 10)).astype(np.float32)  # (Y, X) in [0, 1], as TransUNet stores it
    npz = tmp_path / "case0005_slice012.npz"
    np.savez(npz, image=scaled, label=np.zeros_like(scaled, dtype=np.uint8))
    h5 = tmp_path / "case0001.npy.h5"
    volume = rng.uniform(0, 1, size=(3, 12, 10)).astype(np.float32)  # (Z, Y, X)
    with h5py.File(h5, "w") as handle:
        handle["image"] = volume
        handle["label"] = np.zeros_like(volume, dtype=np.uint8)
    hu = rng.uniform(-400, 600, size=(10, 12, 3)).astype(np.float32)
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), nii)
    return {"npz": npz, "h5": h5, "nii": nii, "scaled": scaled, "volume": volume, "hu": hu}


def test_transunet_files_are_not_windowed_again_in_training(transunet_files):
    transform = _parsed(config_files(str(CT), "train"), "train#volume_transforms")
    npz = transform({"image": str(transunet_files["npz"]), "label": str(transunet_files["npz"])})["image"]
    assert torch.allclose(npz[0, :, :, 0], torch.as_tensor(transunet_files["scaled"].T), atol=1e-6)
    h5 = transform({"image": str(transunet_files["h5"]), "label": str(transunet_files["h5"])})["image"]
    assert torch.allclose(h5[0], torch.as_tensor(transunet_files["volume"].transpose(2, 1, 0)), atol=1e-6)
    assert float(h5.max()) > 0.9 and float(h5.min()) < 0.1  # not squeezed into [0.3125, 0.315]


def test_hu_volumes_are_windowed_in_training_and_inference(transunet_files):
    expected = np.clip((transunet_files["hu"] + 125) / 400, 0, 1)
    for key, files in (("train#volume_transforms", config_files(str(CT), "train")),
                       ("preprocessing", [CT / "configs" / "inference.yaml"])):
        item = {"image": str(transunet_files["nii"])}
        if key.startswith("train"):
            item["label"] = str(transunet_files["nii"])
        image = _parsed(files, key)(item)["image"]
        assert np.allclose(np.asarray(image[0]), expected, atol=1e-5), key
    inference = _parsed([CT / "configs" / "inference.yaml"], "preprocessing")
    h5 = inference({"image": str(transunet_files["h5"])})["image"]
    assert torch.allclose(h5[0], torch.as_tensor(transunet_files["volume"].transpose(2, 1, 0)), atol=1e-6)


def test_intensity_source_can_be_forced(transunet_files):
    hu = _parsed(config_files(str(CT), "train"), "train#volume_transforms", intensity_source="hu")
    image = hu({"image": str(transunet_files["npz"]), "label": str(transunet_files["npz"])})["image"]
    assert float(image.max()) < 0.32  # the file's [0, 1] values read as HU: the window squeezes them
    with pytest.raises(Exception) as info:
        _parsed(config_files(str(CT), "train"), "train#volume_transforms", intensity_source="ct")
    assert "intensity source must be one of auto, hu, scaled01" in _causes(info.value)


# ---- 4. no validation split: the last epoch is written -------------------------------------------
@pytest.fixture(scope="module")
def phantom_without_validation(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data") / "phantom_ct"
    datalist = generate(str(root), "ct", cases=3, unlabeled=0, shape=(40, 40, 8))
    content = json.loads(Path(datalist).read_text())
    content["validation"] = []
    Path(datalist).write_text(json.dumps(content))
    return datalist


def test_training_without_validation_writes_the_last_epoch(tmp_path, phantom_without_validation):
    root = tmp_path / "bundle"
    run_config(str(CT), "train", run_id="training", quick=True, bundle_root=str(root), datalist=phantom_without_validation,
               method="samed", epochs=2, batch_size=4, warmup_iters=2, **TINY)
    weights = root / "models" / "model.pt"
    assert weights.is_file()
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["checkpoint"] == "last" and card["epochs_done"] == 2 and card["lr_power"] == 1.0
    assert not (root / "runs" / "samed" / "validation.json").exists()  # nothing to validate on
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert not any("iou_prediction_head" in k for k in state)  # the unused IoU head is gone


def test_best_checkpoint_without_validation_is_a_clear_error(tmp_path, phantom_without_validation):
    with pytest.raises(Exception) as info:
        run_config(str(CT), "train", run_id="training", quick=True, bundle_root=str(tmp_path / "b"),
                   datalist=phantom_without_validation, method="samed", epochs=1, batch_size=4, checkpoint="best", **TINY)
    assert "checkpoint: best needs validation data" in _causes(info.value)


def test_missing_datalist_is_a_clear_error_and_no_phantom_appears(tmp_path):
    missing = tmp_path / "phantom_ct" / "datalist.json"
    with pytest.raises(Exception) as info:
        run_config(str(CT), "train", run_id="training", quick=True, bundle_root=str(tmp_path / "b"), datalist=str(missing),
                   **TINY)
    assert "datalist not found" in _causes(info.value) and "phantom --out DIR" in _causes(info.value)
    assert not missing.parent.exists()


# ---- 7. the recipe as published ------------------------------------------------------------------
def test_stage2_schedule_is_eq_11_with_250_warmup_iterations_uncapped():
    parser = ConfigParser()
    parser.read_config(config_files(str(CT), "train"))
    assert parser["lr_power"] == 1.0 and parser["warmup_iters"] == 250
    assert "min(" not in parser["train"]["lr_scheduler"]["lr_lambda"]  # no silent cap on the warm-up
    schedule = WarmupPoly(warmup=250, max_iters=1000, power=1.0)
    assert schedule(0) == pytest.approx(1 / 250) and schedule(249) == pytest.approx(1.0)
    t = 600  # eq. 11: lr = I (1 - (T - WP) / MI) after the warm-up, T counted from 1
    assert schedule(t - 1) == pytest.approx(1 - (t - 250) / 1000)
    longer = WarmupPoly(warmup=250, max_iters=100)  # a warm-up longer than the run is kept, not shortened
    assert longer(99) == pytest.approx(100 / 250)
    assert WarmupCosine(warmup=30, max_iters=20)(19) == pytest.approx(20 / 30)


def test_stage1_rates_scale_the_way_each_method_defines_them():
    assert scaled_lr(1.5e-4, 512, 256, "linear") == pytest.approx(3.0e-4)  # MAE: per 256 images
    assert scaled_lr(0.075, 512, rule="sqrt") == pytest.approx(0.075 * math.sqrt(512))  # SimCLR with LARS
    assert scaled_lr(0.075, 8, rule="none") == 0.075
    with pytest.raises(ValueError):
        scaled_lr(0.1, 8, rule="cubic")
    rates = {}
    for level in ("pretrain_image", "pretrain_patch", "pretrain_pixel", "cpt_simclr", "cpt_mae"):
        parser = ConfigParser()
        parser.read_config(config_files(str(CT), ["pretrain", level]))
        rates[level] = (parser["lr_scaling"], parser["lr_reference_batch"])
    assert rates["pretrain_image"][0] == rates["cpt_simclr"][0] == "sqrt"
    assert rates["pretrain_patch"] == rates["cpt_mae"] == rates["pretrain_pixel"] == ("linear", 256)


def _samed_dice_ce(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.8) -> torch.Tensor:
    """SAMed's loss written out (its DiceLoss: softmax, squared terms in the denominator, sums over
    the whole batch, every class including background, smooth 1e-5; then mean over classes)."""
    probs = logits.softmax(dim=1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dice = 0.0
    for c in range(logits.shape[1]):
        inter = (probs[:, c] * onehot[:, c]).sum()
        denominator = (probs[:, c] ** 2).sum() + (onehot[:, c] ** 2).sum()
        dice = dice + 1 - (2 * inter + 1e-5) / (denominator + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, target)
    return (1 - dice_weight) * ce + dice_weight * dice / logits.shape[1]


def test_dice_term_is_samed_s():
    assert isinstance(_parsed(config_files(str(CT), "train"), "loss").loss, DiceCELoss)  # H-SAM's stage weighting wraps it
    loss = _parsed(config_files(str(CT), "train"), "base_loss")
    assert isinstance(loss, DiceCELoss)
    torch.manual_seed(0)
    logits, target = torch.randn(3, 9, 16, 16), torch.randint(0, 9, (3, 16, 16))
    ours = loss(logits, target[:, None])
    assert float(ours) == pytest.approx(float(_samed_dice_ce(logits, target)), rel=1e-5)


# ---- 8. the Synapse profile ----------------------------------------------------------------------
def test_synapse_profile_is_the_paper_s_few_shot_protocol():
    parser = ConfigParser()
    parser.read_config(config_files(str(CT), "train", profile="synapse"))
    assert parser["few_shot_fraction"] == 0.1 and parser["checkpoint"] == "last" and parser["seed"] == 0
    assert parser["class_names"][1:] == ["spleen", "right_kidney", "left_kidney", "gallbladder", "liver", "stomach",
                                         "aorta", "pancreas"]


def test_few_shot_selection_loads_only_the_chosen_slices(tmp_path):
    """10 % of one-slice TransUNet files: only the chosen files are read; the choice is saved."""
    from samora_components.data import SliceDataset

    items = []
    for i in range(40):
        path = tmp_path / f"case0005_slice{i:03d}.npz"
        np.savez(path, image=np.full((8, 8), i / 40, np.float32), label=np.zeros((8, 8), np.uint8))
        items.append({"image": str(path), "label": str(path)})
    loaded = []

    def volume_transform(item):
        loaded.append(item["image"])
        return _parsed(config_files(str(CT), "train"), "train#volume_transforms")(item)

    subset = tmp_path / "train_slices.json"
    dataset = SliceDataset(items, volume_transform, fraction=0.1, seed=0, subset_file=str(subset), progress=False)
    assert len(dataset) == 4 and len(loaded) == 4
    chosen = json.loads(subset.read_text())
    assert [c["case"] for c in chosen] == [Path(p).name for p in loaded]
    again = SliceDataset(items, volume_transform, fraction=0.1, seed=0, progress=False)
    assert [it["case"] for it in again.items] == [it["case"] for it in dataset.items]  # seeded


def test_cli_reports_a_wrapped_config_error_as_one_line(tmp_path, capsys):
    """MONAI wraps errors raised while it instantiates a config; the CLI still prints one line, exit 2."""
    from samora_components.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--bundle", "bundles/samora_ct", "--dataset_dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: datalist not found")
