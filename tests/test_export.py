"""export --format onnx|torchscript and infer --engine: same labels as eager, stale files refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from samora_components.apps import bench
from samora_components.apps.cli import main as cli
from samora_components.bundle import export
from samora_components.bundle.inference import BundlePredictor
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The MR bundle's configs with a small random SAMora-free model (tiny TinyViT, 2 classes)."""
    root = tmp_path_factory.mktemp("export") / "samora_mr"
    shutil.copytree(REPO / "bundles" / "samora_mr" / "configs", root / "configs")
    (root / "models").mkdir()
    card = {"method": "samed", "backbone": "tiny_tinyvit", "backbone_checkpoint": "", "img_size": 64, "num_classes": 2}
    torch.manual_seed(0)
    net = SAMoraNet(2, backbone="tiny_tinyvit", img_size=64, checkpoint="", method="samed")
    with torch.no_grad():  # predictions that depend on the image
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    (root / "models" / "model.json").write_text(json.dumps(card))
    return root


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 40, 10)], indexing="ij")
    image = 100.0 * ((x / 0.5) ** 2 + (y / 0.4) ** 2 + (z / 0.9) ** 2 < 1) + 10 * rng.standard_normal(x.shape)
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.2, 1.2, 2.5, 1.0])), str(path))
    return path


def _in_own_process(name: str) -> bool:
    """Run test ``name`` of this file in a fresh interpreter (True: done there). Importing OpenVINO
    sets up absl logging, which breaks the log capture of later tests in the same process."""
    if os.environ.get("SAMORA_TEST_CHILD") == name:
        return False
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{name}"],
                          env={**os.environ, "SAMORA_TEST_CHILD": name}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return True


def _seeded(build, *args, **kwargs):
    """The tiny backbone is random and not in the weights: every build draws it from the same seed."""
    torch.manual_seed(0)
    return build(*args, **kwargs)


def _labels(bundle: Path, scan: Path, engine: str) -> np.ndarray:
    predictor = _seeded(BundlePredictor.from_bundle, bundle, precision="fp32", engine=engine)
    return predictor(str(scan))


@pytest.mark.parametrize("fmt, engine, module", [
    ("onnx", "onnxruntime", "onnxruntime"), ("onnx", "openvino", "openvino"), ("torchscript", "torchscript", "torch"),
])
def test_exported_engines_give_the_eager_labels(bundle, scan, fmt, engine, module):
    if engine == "openvino" and _in_own_process("test_exported_engines_give_the_eager_labels[onnx-openvino-openvino]"):
        return
    pytest.importorskip(module)
    if fmt == "onnx":
        pytest.importorskip("onnx")
    weights = bundle / "models" / "model.pt"
    path = _seeded(export.export_model, weights, fmt)
    assert path == weights.with_suffix(".onnx" if fmt == "onnx" else ".ts") and path.is_file()
    eager = _labels(bundle, scan, "eager")
    other = _labels(bundle, scan, engine)
    assert eager.shape == other.shape == (48, 40, 10)
    assert 0 < int(eager.sum()) < eager.size  # both classes present: the comparison means something
    assert float((eager == other).mean()) >= 0.999


def test_the_core_outputs_agree_to_float_precision(bundle):
    pytest.importorskip("onnxruntime")
    weights = bundle / "models" / "model.pt"
    _seeded(export.export_model, weights, "onnx")
    net = _seeded(BundlePredictor.from_bundle, bundle, precision="fp32").network
    run = export.build_engine(net, "onnxruntime", weights)
    x = torch.rand(3, 1, 50, 50)
    with torch.no_grad():
        assert torch.allclose(run(x), net(x), atol=1e-4)
        assert run(x).shape == (3, 2, 50, 50)


def test_a_stale_or_missing_export_is_refused_with_the_command_that_remakes_it(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    weights = copy / "models" / "model.pt"
    weights.with_suffix(".onnx").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="export --weights .* --format onnx"):
        BundlePredictor.from_bundle(copy, engine="onnxruntime")
    export.export_model(weights, "onnx")
    state = torch.load(weights, weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)  # the weights change after the export
    with pytest.raises(ValueError, match="exported from other weights"):
        BundlePredictor.from_bundle(copy, engine="onnxruntime")


def test_openvino_exports_once_into_the_cache(bundle, scan, tmp_path, monkeypatch):
    if _in_own_process("test_openvino_exports_once_into_the_cache"):
        return
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    monkeypatch.setenv("SAMORA_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "models" / "model.onnx").unlink(missing_ok=True)
    predictor = _seeded(BundlePredictor.from_bundle, copy, precision="fp32", engine="openvino")
    assert isinstance(predictor.network, export.EngineNet) and predictor.network.engine == "openvino"
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    BundlePredictor.from_bundle(copy, precision="fp32", engine="openvino")
    assert cached[0].stat().st_mtime_ns == stamp  # not exported again
    assert float((predictor(str(scan)) == _labels(copy, scan, "eager")).mean()) >= 0.999
    assert any((tmp_path / "cache" / "openvino").iterdir())  # the compiled model is kept too


def test_cli_export_and_engine_errors(bundle, scan, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights = bundle / "models" / "model.pt"
    cli(["export", "--weights", str(weights), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()
    with pytest.raises(SystemExit) as err:
        cli(["infer", "--bundle", str(bundle), "--input", str(scan), "--output", str(tmp_path / "o"), "--engine", "tensorrt"])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: unknown engine 'tensorrt'") and "\n" not in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        cli(["export", "--weights", str(weights), "--format", "tflite"])
    assert "unknown export format" in capsys.readouterr().err


def test_bench_engines_reports_time_and_agreement_per_engine(bundle, scan, capsys):
    pytest.importorskip("onnxruntime")
    cli(["bench-engines", "--bundle", str(bundle), "--input", str(scan), "--engines", "onnxruntime,torchscript"])
    report = json.loads(capsys.readouterr().out)
    assert report["volumes"] == 1 and report["voxels"] == 48 * 40 * 10 and report["precision"] == "fp32"
    assert list(report["engines"]) == ["eager", "onnxruntime", "torchscript"]
    for engine, row in report["engines"].items():
        assert row["s_per_volume"] > 0 and len(row["s_per_volume_all"]) == 1
        assert row["agreement"] >= 0.999 and row["min_agreement"] >= 0.999
    assert report["engines"]["eager"]["agreement"] == 1.0


def test_bench_infer_replays_the_pipeline_batches_on_the_model_alone(bundle, scan, capsys):
    cli(["bench-infer", "--bundle", str(bundle), "--input", str(scan), "--precision", "fp32"])
    report = json.loads(capsys.readouterr().out)
    (row,) = report["volumes"]
    assert row["name"] == "scan" and row["slices"] == 10 == report["total"]["slices"]  # every slice, once
    assert report["precision"] == "fp32"
    assert 0 < row["model_in_pipeline_s"] <= row["end_to_end_s"] and row["model_alone_s"] > 0
    # the JSON rounds seconds to 0.1 ms while the ratio uses the unrounded timings
    assert row["overhead"] == pytest.approx(row["end_to_end_s"] / row["model_alone_s"], rel=1e-2)
    assert row["user_s"] >= 0 and row["system_s"] >= 0 and report["peak_rss_gb"] > 0


def _tiny(precision: str = "fp32") -> SAMoraNet:
    return SAMoraNet(2, backbone="tiny_tinyvit", img_size=64, checkpoint="", method="samed", precision=precision)


def test_auto_tries_openvino_only_where_it_could_pay(bundle, tmp_path, monkeypatch):
    monkeypatch.delenv(export.AUTO_ENV, raising=False)
    monkeypatch.setenv("SAMORA_CACHE", str(tmp_path / "cache"))
    weights = bundle / "models" / "model.pt"
    weights.with_suffix(".onnx").unlink(missing_ok=True)
    installed = export.importlib.util.find_spec("openvino") is not None
    net = _tiny()
    assert export.choose_engine(net, weights, volumes=1)[0] == "eager"
    assert export.choose_engine(net, weights, volumes=export.AUTO_MIN_VOLUMES - 1)[0] == "eager"
    engine, why = export.choose_engine(net, weights, volumes=export.AUTO_MIN_VOLUMES)
    assert (engine, "could repay" in why) == (("trial", True) if installed else ("eager", False))
    assert export.choose_engine(net, weights, volumes=50, device="cuda")[0] == "eager"
    assert export.choose_engine(_tiny("bf16"), weights, volumes=50)[0] == "eager"  # autocast is eager's
    if installed:
        decision = export._trial_file(weights, 8)  # an earlier trial on this CPU decides for later folders
        decision.parent.mkdir(parents=True)
        for winner in ("eager", "openvino"):
            decision.write_text(json.dumps({"engine": winner, "eager_s": 1.0, "openvino_s": 0.5, "batch": 8}))
            assert export.choose_engine(net, weights, volumes=5) == (
                winner, "measured on this CPU before: OpenVINO 0.50 s vs eager 1.00 s per batch of 8")
            assert export.choose_engine(net, weights, volumes=1)[0] == "eager"  # one volume: eager all the same
        assert export._trial_file(weights, 4) != decision  # another batch is measured again
        decision.write_text("{broken")
        assert export.choose_engine(net, weights, volumes=5)[0] == "trial"
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None)
    assert export.choose_engine(net, weights, volumes=50) == ("eager", "OpenVINO is not installed")
    monkeypatch.setenv(export.AUTO_ENV, "torchscript")
    assert export.choose_engine(net, weights, volumes=1) == ("torchscript", "SAMORA_ENGINE=torchscript")
    monkeypatch.setenv(export.AUTO_ENV, "tensorrt")
    with pytest.raises(ValueError, match="SAMORA_ENGINE='tensorrt'"):
        export.choose_engine(net, weights)


def test_auto_falls_back_to_eager_when_openvino_fails(bundle, scan, monkeypatch, caplog):
    monkeypatch.delenv(export.AUTO_ENV, raising=False)
    monkeypatch.setattr(export, "choose_engine", lambda *a, **k: ("openvino", "test"))

    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile\nsecond line")

    monkeypatch.setattr(export, "_cached_onnx", broken)
    predictor = _seeded(BundlePredictor.from_bundle, bundle, precision="fp32", engine="auto", volumes=5)
    assert predictor.engine == "eager" and not isinstance(predictor.network, export.EngineNet)
    assert "OpenVINO is not usable for this model (cannot compile); running PyTorch eager" in caplog.text
    assert float((predictor(str(scan)) == _labels(bundle, scan, "eager")).mean()) == 1.0


def test_infer_auto_times_both_engines_once_and_keeps_the_faster(bundle, scan, tmp_path, monkeypatch, caplog):
    if _in_own_process("test_infer_auto_times_both_engines_once_and_keeps_the_faster"):
        return
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    monkeypatch.delenv(export.AUTO_ENV, raising=False)
    monkeypatch.setenv("SAMORA_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "models" / "model.onnx").unlink(missing_ok=True)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(scan, folder / f"{name}.nii.gz")
    run = ["infer", "--bundle", str(copy), "--precision", "fp32"]
    _seeded(cli, run + ["--input", str(scan), "--output", str(tmp_path / "one")])
    assert "engine: eager (1 volume: OpenVINO is tried from 3 volumes on" in caplog.text
    assert not list((tmp_path / "cache").glob("*.onnx"))
    _seeded(cli, run + ["--input", str(folder), "--output", str(tmp_path / "three")])  # a real trial
    assert "engine: timing OpenVINO against PyTorch eager on this CPU (once; 3 volumes" in caplog.text
    assert "measured now on this CPU" in caplog.text
    (decision,) = (tmp_path / "cache").glob("*.engine.json")
    found = json.loads(decision.read_text())
    assert found["engine"] in ("eager", "openvino") and found["eager_s"] > 0 and found["openvino_s"] > 0
    assert (found["engine"] == "openvino") == (found["openvino_s"] < export.AUTO_MARGIN * found["eager_s"])
    eager = nib.load(str(tmp_path / "one" / "scan.nii.gz")).get_fdata()
    for name in ("a", "b", "c"):
        assert float((nib.load(str(tmp_path / "three" / f"{name}.nii.gz")).get_fdata() == eager).mean()) >= 0.999
    caplog.clear()
    _seeded(cli, run + ["--input", str(folder), "--output", str(tmp_path / "again")])  # decided: no second trial
    assert f"engine: {found['engine']} (measured on this CPU before" in caplog.text
    assert decision.read_text() == json.dumps(found)
    for times, winner in (((1.0, 0.95), "eager"), ((1.0, 0.5), "openvino")):  # the margin: 10 % faster at least
        decision.unlink()
        monkeypatch.setattr(export, "_seconds_per_batch", lambda *a, t=times: t)
        caplog.clear()
        predictor = _seeded(BundlePredictor.from_bundle, copy, precision="fp32", engine="auto", volumes=3)
        assert predictor.engine == winner and json.loads(decision.read_text())["engine"] == winner
        assert f"engine: {winner} (OpenVINO {times[1]:.2f} s vs eager 1.00 s per batch of 8" in caplog.text
    blocker = tmp_path / "blocker"  # a cache that cannot be written: the measured engine still runs
    blocker.write_text("")
    monkeypatch.setattr(export, "_trial_file", lambda *a: blocker / "decision.engine.json")
    caplog.clear()
    predictor = _seeded(BundlePredictor.from_bundle, copy, precision="fp32", engine="auto", volumes=3)
    assert predictor.engine == "openvino" and "measured now on this CPU; not kept:" in caplog.text


def test_bench_runs_both_models_under_an_engine(tmp_path, monkeypatch):
    """bench --engine: each engine computes the network's logits (padding a short batch), and the
    benchmark reports it with the FLOPs counted on the PyTorch network."""
    for module in ("onnx", "onnxruntime", "openvino"):
        pytest.importorskip(module)
    if _in_own_process("test_bench_runs_both_models_under_an_engine"):
        return
    torch.manual_seed(0)
    net = bench._model("samora", "tiny_vit", None, "fp32", 3)
    x = torch.rand(3, 1, net.img_size, net.img_size)
    with torch.no_grad():
        expected = net(x)
    for engine in ("torchscript", "onnxruntime", "openvino"):
        (tmp_path / engine).mkdir()
        run = export.network_engine(net, engine, 2, tmp_path / engine)
        with torch.no_grad():
            got = run(x)
        assert run.engine == engine and got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4), engine
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 1.0)  # the peak is not what is tested here
    built = []

    def recorded(*args, **kwargs):
        built.append(export.network_engine(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(bench, "network_engine", recorded)
    eager = bench.benchmark("tiny_vit", batch=2, dtype="fp32", warmup=0, repeats=1)
    assert [getattr(run, "engine", "eager") for run in built] == ["eager", "eager"]
    exported = bench.benchmark("tiny_vit", batch=2, dtype="fp32", warmup=0, repeats=1, engine="openvino")
    assert [run.engine for run in built[2:]] == ["openvino", "openvino"]  # both models, as timed
    assert all(isinstance(run, export.EngineNet) and run.batch == 2 for run in built[2:])
    assert eager["engine"] == "eager" and exported["engine"] == "openvino" and exported["warmup"] == 1
    for method in ("samed", "samora"):
        assert exported[method]["gflop_per_slice"] == eager[method]["gflop_per_slice"] > 0
        assert exported[method]["latency_ms_per_slice"] > 0
    with pytest.raises(ValueError, match="float32 only"):
        bench.benchmark("tiny_vit", batch=1, dtype="bf16", engine="onnxruntime")
    with pytest.raises(ValueError, match="unknown engine"):
        export.network_engine(net, "auto", 2, tmp_path)
    monkeypatch.setattr(bench, "_model", None)  # an unknown engine is refused before any model is built
    with pytest.raises(ValueError, match="unknown engine"):
        bench.benchmark("tiny_vit", engine="tensorrt")
