"""The label-server launcher's own logic (no MONAI Label needed; runs with `make test`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from samora_components.apps import label_server as ls

REPO = Path(__file__).resolve().parents[2]
CT_BUNDLE = REPO / "bundles" / "samora_ct"


def _bundle(root: Path, name: str, weights: bool) -> Path:
    """A bundle folder with the CT configs and, optionally, a (dummy) model.pt."""
    folder = root / name
    shutil.copytree(CT_BUNDLE / "configs", folder / "configs")
    (folder / "models").mkdir()
    if weights:
        (folder / "models" / "model.pt").write_bytes(b"weights")
    return folder


def test_bundles_without_weights_are_skipped_with_a_message(tmp_path):
    ct = _bundle(tmp_path, "samora_ct", weights=True)
    mr = _bundle(tmp_path, "samora_mr", weights=False)
    served, skipped = ls.find_bundles([str(ct), str(mr)])
    assert [b.name for b in served] == ["samora_ct"]
    assert len(skipped) == 1 and "samora_mr" in skipped[0] and "models/model.pt" in skipped[0]


def test_folder_that_is_not_a_bundle_is_an_error(tmp_path):
    with pytest.raises(ls.LabelServerError, match="not a SAMora bundle"):
        ls.find_bundles([str(tmp_path)])


def test_two_bundles_with_one_name_are_refused(tmp_path):
    a = _bundle(tmp_path / "a", "samora_ct", weights=True)
    b = _bundle(tmp_path / "b", "samora_ct", weights=True)
    with pytest.raises(ls.LabelServerError, match="share the model name"):
        ls.find_bundles([str(a), str(b)])


def test_labels_come_from_metadata_channel_def():
    labels = ls._labels(CT_BUNDLE)
    channels = json.loads((CT_BUNDLE / "configs" / "metadata.json").read_text())
    channel_def = channels["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert labels == {v: int(k) for k, v in channel_def.items() if v != "background"}


def test_app_folder_links_the_served_bundles_only(tmp_path):
    sample = tmp_path / "sample"
    (sample / "lib").mkdir(parents=True)
    (sample / "main.py").write_text("# app\n")
    ct = _bundle(tmp_path, "samora_ct", weights=True)
    app_dir = tmp_path / "app"
    (app_dir / "model").mkdir(parents=True)
    (app_dir / "model" / "stale").symlink_to(tmp_path, target_is_directory=True)
    app = ls.prepare_app(app_dir, [ls.ServedBundle(ct.resolve(), "samora_ct")], sample)
    assert (app / "main.py").is_file()
    links = sorted(p.name for p in (app / "model").iterdir())
    assert links == ["samora_ct"]
    assert (app / "model" / "samora_ct").resolve() == ct.resolve()
    assert (app / "model" / "samora_ct" / "configs" / "inference.yaml").is_file()


def test_server_command_stays_local_and_offline(tmp_path):
    bundles = [ls.ServedBundle(tmp_path / name, name) for name in ("samora_ct", "samora_mr")]
    argv = ls.server_argv(tmp_path / "app", tmp_path / "studies", bundles, "127.0.0.1", 8123)
    assert argv[:2] == ["monailabel", "start_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8123"
    conf = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--conf"}
    assert conf["models"] == "samora_ct,samora_mr"
    assert conf["zoo_source"] != "monaihosting"  # no model-zoo listing
    assert conf["sam2"] == "false"  # no SAM2 models (their weights would be downloaded)
    assert conf["skip_trainers"] == "true"


def test_default_bind_is_loopback():
    assert ls._parse(["--studies", "x"]).host == "127.0.0.1"
    assert ls._is_loopback("127.0.0.1") and ls._is_loopback("localhost") and ls._is_loopback("::1")
    assert not ls._is_loopback("0.0.0.0")


def test_missing_studies_folder_is_one_error_line(tmp_path, capsys):
    assert ls.main(["--studies", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def _small_card(bundle: Path, num_classes: int = 9) -> None:
    card = {"method": "samed", "backbone": "litemedsam", "img_size": 64, "num_classes": num_classes}
    (bundle / "models" / "model.json").write_text(json.dumps(card))


def test_weights_are_checked_against_the_model_card(tmp_path):
    import torch

    from samora_components.networks.samora_net import SAMoraNet

    bundle = _bundle(tmp_path, "samora_ct", weights=False)
    _small_card(bundle)
    served = ls.ServedBundle(bundle, "samora_ct")
    weights = bundle / "models" / "model.pt"
    torch.save(SAMoraNet(num_classes=9, backbone="litemedsam", img_size=64).state_dict(), weights)
    with pytest.raises(ls.LabelServerError, match=r"img_size=64 \(config: 256\)"):  # the card and the config disagree
        ls.check_bundle(served)

    config = bundle / "configs" / "inference.yaml"
    config.write_text(config.read_text().replace("\nimg_size: 256\n", "\nimg_size: 64\n"))
    ls.check_bundle(served)  # fits: no error
    assert served.labels["spleen"] == 1 and "background" not in served.labels

    torch.save(SAMoraNet(num_classes=3, backbone="litemedsam", img_size=64).state_dict(), weights)
    with pytest.raises(ls.LabelServerError, match="does not fit the network"):
        ls.check_bundle(served)

    torch.save({"net": object()}, weights)  # not loadable with weights_only=True
    with pytest.raises(ls.LabelServerError, match="plain state dict"):
        ls.check_bundle(served)


def test_infer_requests_are_checked_before_the_model():
    models, studies = {"samora_ct", "samora_mr"}, ["case01"]
    assert ls.infer_problem(models, studies, "samora_ct", "case01") is None
    assert ls.infer_problem(models, studies, "nope", "case01")[0] == 404
    assert ls.infer_problem(models, studies, "samora_ct", "nope")[0] == 404
    assert ls.infer_problem(models, studies, "samora_ct", "/etc/passwd")[0] == 404  # no server-side paths
    assert ls.infer_problem(models, studies, "samora_ct", "")[0] == 400


def test_damaged_volumes_are_named(tmp_path):
    import nibabel as nib
    import numpy as np

    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), str(good))
    assert ls.volume_problem(str(good)) is None
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a volume" * 50)
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(flat))
    for name in ("garbage.nii.gz", "cut.nii.gz", "flat.nii.gz", "absent.nii.gz"):
        assert ls.volume_problem(str(tmp_path / name)), name
