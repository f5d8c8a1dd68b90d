"""A real MONAI Label server serving the CT bundle, called over HTTP as a client (3D Slicer) would.

The server runs in the label environment (.venv-label) on a free 127.0.0.1 port; this test process
is only its client. It takes a few minutes on a CPU, so it runs with `make test-label` (which
builds .venv-label first and sets SAMORA_LABEL_TEST=1) and is skipped by a plain `make test`.

The served bundles are a copy of bundles/samora_ct with a small untrained network (LiteMedSAM at
64 px, SAMed), which checks the plumbing, and the MR bundle as shipped (bundles/samora_mr with its
trained left-atrium model), which must answer an MR study the way `samora_components infer` does.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LABEL_PYTHON = Path(os.environ.get("SAMORA_LABEL_PYTHON", REPO / ".venv-label" / "bin" / "python"))
STARTUP_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600
MODEL = "samora_ct"
STUDY = "case01"
MR_MODEL = "samora_mr"
MR_STUDY = "mr01"
SHIPPED_MR = REPO / "bundles" / MR_MODEL

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("SAMORA_LABEL_TEST") != "1",
        reason="MONAI Label server test: run `make test-label` (or set SAMORA_LABEL_TEST=1)",
    ),
    pytest.mark.skipif(
        not LABEL_PYTHON.is_file(),
        reason=f"MONAI Label environment {LABEL_PYTHON} is absent: `make test-label` builds it",
    ),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _make_bundle(root: Path) -> tuple[Path, dict[str, int]]:
    """Copy of the CT bundle's configs with a small network's weights and model card."""
    import torch

    from samora_components.networks.samora_net import SAMoraNet

    bundle = root / MODEL
    shutil.copytree(REPO / "bundles" / MODEL / "configs", bundle / "configs")
    config = bundle / "configs" / "inference.yaml"  # the served architecture is written out: a 64 px network
    config.write_text(config.read_text().replace("\nimg_size: 256\n", "\nimg_size: 64\n"))
    (bundle / "models").mkdir()
    card = {"method": "samed", "backbone": "litemedsam", "backbone_checkpoint": None, "img_size": 64, "num_classes": 9}
    (bundle / "models" / "model.json").write_text(json.dumps(card))
    torch.manual_seed(0)
    net = SAMoraNet(num_classes=9, backbone="litemedsam", img_size=64, method="samed")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    return bundle, {name: int(index) for index, name in channel_def.items()}


def _make_study(folder: Path) -> Path:
    """A small phantom CT whose axes are permuted and flipped relative to RAS."""
    from samora_components.data.phantom import make_ct_case

    folder.mkdir()
    image, _ = make_ct_case(np.random.default_rng(0), shape=(48, 40, 12), spacing=(8.0, 9.6, 20.0))
    affine = np.array(
        [[-8.0, 0.0, 0.0, 100.0], [0.0, 0.0, -20.0, 50.0], [0.0, -9.6, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    path = folder / f"{STUDY}.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    return path


def _make_mr_study(folder: Path) -> Path:
    """A small synthetic MR volume (one bright structure) in RAS."""
    from samora_components.data.phantom import make_mr_case

    image, _ = make_mr_case(np.random.default_rng(1), shape=(64, 56, 10), spacing=(1.9, 2.1, 10.0))
    path = folder / f"{MR_STUDY}.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.9, 2.1, 10.0, 1.0])), str(path))
    return path


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    bundle, classes = _make_bundle(root / "bundles")
    untrained = root / "bundles" / "samora_untrained"  # configs but no weights: must be skipped
    shutil.copytree(bundle / "configs", untrained / "configs")
    served = [str(bundle), str(untrained)]
    if (SHIPPED_MR / "models" / "model.pt").is_file():
        served.append(str(SHIPPED_MR))
    study = _make_study(root / "studies")
    mr_study = _make_mr_study(root / "studies")
    port = _free_port()
    log_path = root / "server.log"
    env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(root / "sessions"), PYTHONUNBUFFERED="1")
    command = [
        str(LABEL_PYTHON), "-m", "samora_components.apps.label_server",
        "--studies", str(root / "studies"), "--port", str(port),
        "--bundles", *served, "--app-dir", str(root / "app"),
    ]  # fmt: skip
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                _get_json(f"{url}/info/")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        print(f"MONAI Label ready after {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield {"url": url, "study": study, "mr_study": mr_study, "bundle": bundle, "classes": classes,
               "log": log_path, "port": port, "mr_served": str(SHIPPED_MR) in served, "pid": process.pid,
               "studies": root / "studies"}
    finally:
        _stop(process)
    assert process.poll() is not None, "server still running after SIGKILL"
    assert not _port_open(port), f"port {port} still open after the server stopped"


def test_info_lists_the_bundle_and_its_labels(server):
    info = _get_json(f"{server['url']}/info/")
    expected = {MODEL, MR_MODEL} if server["mr_served"] else {MODEL}
    assert set(info["models"]) == expected  # the weightless bundle is not served, and no SAM2 models
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    foreground = {name: index for name, index in server["classes"].items() if name != "background"}
    assert model["labels"] == foreground
    assert info["trainers"] == {}
    assert info["datastore"]["total"] == 2
    log = server["log"].read_text()
    assert "skip:" in log and "samora_untrained" in log and "models/model.pt" in log
    if server["mr_served"]:
        assert info["models"][MR_MODEL]["labels"] == {"left_atrium": 1}


def _infer(server: dict, model: str, study: str, tmp_path: Path) -> tuple[dict, Path]:
    """POST /infer/<model>?image=<study> as 3D Slicer's MONAI Label module does (options in a form
    field); returns the answer's params and the label file written to ``tmp_path``."""
    query = urllib.parse.urlencode({"image": study})
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n"
        f"{json.dumps({'client_id': 'samora-test'})}\r\n--{boundary}--\r\n"
    ).encode()
    request = urllib.request.Request(
        f"{server['url']}/infer/{model}?{query}",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        payload = response.read()
    assert content_type.startswith("multipart/form-data")
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + payload, policy=email.policy.HTTP
    )
    parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
    assert set(parts) >= {"params", "image"}
    params = json.loads(parts["params"].get_payload(decode=True))
    label_file = tmp_path / parts["image"].get_filename()
    assert label_file.name.endswith(".nii.gz")
    label_file.write_bytes(parts["image"].get_payload(decode=True))
    return params, label_file


def test_infer_returns_a_label_volume_on_the_study_grid(server, tmp_path):
    params, label_file = _infer(server, MODEL, STUDY, tmp_path)
    assert params["label_names"] == {k: v for k, v in server["classes"].items() if k != "background"}
    study = nib.load(str(server["study"]))
    label = nib.load(str(label_file))
    values = np.asarray(label.dataobj)
    assert label.shape == study.shape
    assert set(np.unique(values).tolist()) <= set(server["classes"].values())
    np.testing.assert_allclose(label.affine, study.affine, atol=1e-3)

    # the server's answer is what `python -m samora_components infer` gives for the same bundle
    from samora_components.bundle.inference import BundlePredictor

    expected = BundlePredictor.from_bundle(server["bundle"])(str(server["study"]))
    assert (values == expected).mean() > 0.99


def test_shipped_mr_model_segments_an_mr_study(server, tmp_path):
    if not server["mr_served"]:
        pytest.skip("bundles/samora_mr has no models/model.pt")
    params, label_file = _infer(server, MR_MODEL, MR_STUDY, tmp_path)
    assert params["label_names"] == {"left_atrium": 1}
    study = nib.load(str(server["mr_study"]))
    label = nib.load(str(label_file))
    values = np.asarray(label.dataobj)
    assert label.shape == study.shape and set(np.unique(values).tolist()) <= {0, 1}
    np.testing.assert_allclose(label.affine, study.affine, atol=1e-3)

    from samora_components.bundle.inference import BundlePredictor

    expected = BundlePredictor.from_bundle(SHIPPED_MR)(str(server["mr_study"]))
    assert (values == expected).mean() > 0.99


CONCURRENT_REQUESTS = 20
# Peak resident memory of the server's process group during the tests above and the concurrent
# requests (small 64 px network, 48x40x12 study, CPU). Measured 2252 MiB
# (sum of VmHWM); the bound leaves about a third more.
PEAK_RSS_BOUND_MIB = 3072


def _peak_rss_mib(group: int) -> float:
    """Sum of VmHWM (peak resident set) over the processes of the server's process group."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) != group:  # pgrp
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def test_concurrent_infer_requests_all_get_the_same_labels(server, tmp_path, capsys):
    # a 4-slice study, uploaded like a viewer would, keeps 20 CPU inferences short
    small = tmp_path / "small.nii.gz"
    study = nib.load(str(server["study"]))
    nib.save(nib.Nifti1Image(np.asarray(study.dataobj)[:, :4, :], study.affine), str(small))
    assert _upload(server, "small", small.name, small.read_bytes()) == (200, {"image": "small"})
    _, reference_file = _infer(server, MODEL, "small", tmp_path)
    reference = nib.load(str(reference_file))
    expected = np.asarray(reference.dataobj)
    folders = [tmp_path / f"r{i:02d}" for i in range(CONCURRENT_REQUESTS)]
    for folder in folders:
        folder.mkdir()

    def one(folder: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        _, label_file = _infer(server, MODEL, "small", folder)
        label = nib.load(str(label_file))
        return label.shape, np.asarray(label.dataobj), label.affine

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CONCURRENT_REQUESTS) as pool:
        answers = list(pool.map(one, folders))
    elapsed = time.monotonic() - started
    assert len(answers) == CONCURRENT_REQUESTS
    for shape, values, affine in answers:
        assert shape == reference.shape
        np.testing.assert_array_equal(values, expected)
        np.testing.assert_allclose(affine, reference.affine, atol=1e-3)
    peak = _peak_rss_mib(server["pid"])
    with capsys.disabled():
        print(
            f"\nMONAI Label: {CONCURRENT_REQUESTS} concurrent /infer answered in {elapsed:.1f} s; "
            f"server peak RSS {peak:.0f} MiB (bound {PEAK_RSS_BOUND_MIB} MiB)"
        )
    assert 0 < peak < PEAK_RSS_BOUND_MIB


def _post(url: str, body: bytes = b"", content_type: str | None = None, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            text = response.read()
            is_json = response.headers.get("Content-Type", "").startswith("application/json")
            return response.status, json.loads(text) if is_json else {"bytes": len(text)}
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"detail": text.decode(errors="replace")}


def _infer_status(server: dict, model: str, query: dict) -> tuple[int, dict]:
    return _post(f"{server['url']}/infer/{model}?{urllib.parse.urlencode(query)}")


def test_unknown_model_is_a_404(server):
    status, answer = _infer_status(server, "no_such_model", {"image": STUDY})
    assert status == 404, answer
    assert "no_such_model" in answer["detail"]


def test_unknown_image_is_a_404(server):
    for image in ("no_such_study", str(server["study"]), "../studies/case01"):
        status, answer = _infer_status(server, MODEL, {"image": image})
        assert status == 404, (image, answer)
        assert "study" in answer["detail"]
    status, answer = _infer_status(server, MODEL, {})
    assert status == 400, answer


def _upload(server: dict, image: str, filename: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\n\r\n{{}}\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    url = f"{server['url']}/datastore/image?{urllib.parse.urlencode({'image': image})}"
    return _post(url, body, f"multipart/form-data; boundary={boundary}", method="PUT")


def test_bad_uploads_never_reach_the_model(server):
    good = server["study"].read_bytes()
    uploads = {
        "garbage": b"this is not a NIfTI volume" * 40,
        "truncated": good[: len(good) // 2],
    }
    for image, data in uploads.items():
        status, answer = _upload(server, image, f"{image}.nii.gz", data)
        assert status == 200 and answer == {"image": image}, answer  # stored as sent ...
        status, answer = _infer_status(server, MODEL, {"image": image})
        assert status == 422, (image, answer)  # ... but refused before the model runs
        assert answer["detail"].startswith(f"study '{image}' is not a readable NIfTI volume"), answer
    log = server["log"].read_text()
    assert "Infer Request: {'model': 'samora_ct', 'image': 'garbage'" not in log
    assert "Infer Request: {'model': 'samora_ct', 'image': 'truncated'" not in log
    # a good upload under the same id replaces the bad one (the model run on an uploaded study is
    # tested by test_concurrent_infer_requests_all_get_the_same_labels)
    assert _upload(server, "garbage", "garbage.nii.gz", good) == (200, {"image": "garbage"})
