"""Exported models and the engines that run them (``export --format``, ``infer --engine``).

What is exported is the network's *core*, the part between the two resizes: model-size RGB
slices (B, 3, S, S) -> low-resolution class logits (B, C, s, s), in float32. B is fixed at export
(the encoders' reshapes bake it into the graph): :class:`EngineNet` runs other batch sizes in
pieces of B, the last one padded. Turning slices into model input and the logits back to the slice size stays in PyTorch
(:class:`EngineNet`), so every engine computes the same function and labels differ only by the
engines' arithmetic (``docs/results.md`` measures how much).

Engines (:data:`ENGINES`):

* ``eager``: the network itself, in its precision (bf16 autocast where the CPU has it natively).
* ``compile``: ``torch.compile`` (inductor) of the core; compiles on the first batch (minutes).
* ``torchscript``: a traced, frozen core, ``<weights>.ts`` (``export --format torchscript``).
* ``onnxruntime``: ``<weights>.onnx`` (``export --format onnx``) on ONNX Runtime's CPU provider.
* ``openvino``: an ONNX file compiled by OpenVINO for the CPU, in f32 (bf16 only where the
  network's precision resolved to bf16): ``<weights>.onnx`` when that exists, else one exported
  once into the cache folder (``$SAMORA_CACHE``, default ``~/.cache/samora``), keyed by the
  weights' SHA-256; OpenVINO keeps its compiled model there too (``openvino/``), so only the first
  run compiles.

``auto`` (what ``infer`` runs unless told otherwise) picks eager or OpenVINO with
:func:`choose_engine`. Which one is faster, and by how much, depends on the model and the CPU
(``docs/results.md`` §4e-4g: OpenVINO 1.1-1.2x faster on the shipped models in fp32; eager's bf16
autocast where bf16 is native), so the first run that could repay OpenVINO's one-time export (at least :data:`AUTO_MIN_VOLUMES`
volumes) times one batch under both and keeps the answer in the cache, keyed by the weights, the
batch and the CPU; later runs of as many volumes read it. Fewer volumes run eager. An OpenVINO model that cannot be built falls back to eager
with one warning line.

Every exported file records the SHA-256 of the weights it came from; a file made from other
weights is refused with the command that remakes it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samora_components.bundle.cards import check_weights, read_model_card
from samora_components.networks.backbones import file_sha256
from samora_components.networks.precision import cpu_summary
from samora_components.networks.samora_net import SAMoraNet
from samora_components.utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["AUTO_ENV", "AUTO_MARGIN", "AUTO_MIN_VOLUMES", "ENGINES", "FORMATS", "EngineNet", "ModelCore", "build_engine",
           "choose_engine", "export_model", "exported_path", "network_engine"]

ENGINES = ("auto", "eager", "compile", "torchscript", "onnxruntime", "openvino")
#: environment variable that fixes what ``auto`` means (an engine name), as SAMORA_PRECISION does for precision
AUTO_ENV = "SAMORA_ENGINE"
#: volumes in one run from which OpenVINO's one-time export and compilation can be repaid (docs/results.md
#: §4f-4g: about 48 s once against 12-17 s saved per LA volume on an AVX2 CPU)
AUTO_MIN_VOLUMES = 3
#: OpenVINO is kept when its batch takes less than this fraction of eager's (timings vary by about 10 %)
AUTO_MARGIN = 0.9
#: export format -> file suffix (beside the weights)
FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}
_META_KEY = "samora"
_OPSET = 17


class ModelCore(nn.Module):
    """The network between its two resizes: model input (B, 3, S, S) -> logits (B, C, s, s), float32."""

    def __init__(self, net: SAMoraNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.core(x).float()


class EngineNet(nn.Module):
    """``net``'s forward with its core computed by ``run`` (another engine), which takes batches of
    exactly ``batch`` slices (``None``: any).

    Shapes: slices (B, in_channels, H, W) -> logits (B, C, H, W), as :class:`SAMoraNet`.
    """

    def __init__(self, net: SAMoraNet, run: Callable[[torch.Tensor], torch.Tensor], engine: str,
                 batch: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.run = run
        self.engine = engine
        self.batch = batch

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (B, 3, S, S) -> logits (B, C, s, s), in pieces of ``batch``."""
        if self.batch is None or x.shape[0] == self.batch:
            return self.run(x).float()
        pieces = []
        for start in range(0, x.shape[0], self.batch):
            piece = x[start : start + self.batch]
            n = piece.shape[0]
            if n < self.batch:
                piece = torch.cat([piece, piece.new_zeros((self.batch - n, *piece.shape[1:]))])
            pieces.append(self.run(piece.contiguous()).float()[:n])
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.net.in_channels:
            raise ValueError(f"expected input (B, {self.net.in_channels}, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        logits = self.core(self.net.prepare(x).contiguous())
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def exported_path(weights: str | Path, fmt: str) -> Path:
    """Where ``export --format fmt`` puts the model of ``weights``: beside it, ``model.onnx`` / ``model.ts``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return Path(weights).with_suffix(FORMATS[fmt])


def _fp32_network(weights: Path) -> SAMoraNet:
    net = SAMoraNet.from_card(read_model_card(weights), precision="fp32")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def _write(core: ModelCore, fmt: str, target: Path, meta: dict, batch: int) -> None:
    example = torch.rand(batch, 3, core.net.img_size, core.net.img_size)
    with atomic_path(target) as tmp, torch.no_grad(), warnings.catch_warnings():
        # tracing warns at every Python-level shape computation of the encoders; the batch they fix is recorded
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        if fmt == "onnx":
            import onnx  # optional dependency: only export needs it

            torch.onnx.export(core, (example,), str(tmp), dynamo=False, opset_version=_OPSET,
                              input_names=["slices"], output_names=["logits"],
                              dynamic_axes={"slices": {0: "batch"}, "logits": {0: "batch"}})
            model = onnx.load(str(tmp))
            entry = model.metadata_props.add()
            entry.key, entry.value = _META_KEY, json.dumps(meta)
            onnx.save(model, str(tmp))
        else:
            traced = torch.jit.freeze(torch.jit.trace(core, example, check_trace=False))
            torch.jit.save(traced, str(tmp), _extra_files={f"{_META_KEY}.json": json.dumps(meta)})


def export_model(weights: str | Path, fmt: str = "onnx", out: str | Path | None = None, batch: int = 8,
                 net: SAMoraNet | None = None) -> Path:
    """Write the fp32 core of trained ``weights`` (its model card beside it) as ONNX or TorchScript.

    ``out``: the file to write (default :func:`exported_path`); ``batch``: slices per call (best
    equal to the inferer's ``sw_batch_size``). Returns its path. The write is atomic; the file
    records the weights' SHA-256 and the batch. ``net``: the network of ``weights`` already built
    (used when it computes in fp32; otherwise an fp32 copy is built from the model card).
    """
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    weights = check_weights(weights)
    target = Path(out) if out else exported_path(weights, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if net is None or net.precision != "fp32":
        net = _fp32_network(weights)
    meta = {"weights_sha256": file_sha256(weights), "img_size": net.img_size, "num_classes": net.num_classes,
            "batch": int(batch), "torch": torch.__version__}
    _write(ModelCore(net).eval(), fmt, target, meta, batch)
    return target


def _check_meta(meta: dict, weights: Path, path: Path, fmt: str) -> int:
    """The exported batch, once the file is known to come from ``weights``."""
    if meta.get("weights_sha256") != file_sha256(weights):
        raise ValueError(f"{path} was exported from other weights than {weights}; run `python -m samora_components "
                         f"export --weights {weights} --format {fmt}` again")
    return int(meta.get("batch", 8))


def _onnx_meta(path: Path) -> dict:
    import onnx  # optional dependency

    model = onnx.load(str(path), load_external_data=False)
    found = {p.key: p.value for p in model.metadata_props}
    return json.loads(found.get(_META_KEY, "{}"))


def _cache_dir() -> Path:
    return Path(os.environ.get("SAMORA_CACHE", Path.home() / ".cache" / "samora"))


def _cached_onnx(weights: Path, batch: int, net: SAMoraNet) -> tuple[Path, int]:
    """``<weights>.onnx`` if it exists and fits, else the cached export of these weights (made once),
    with its batch."""
    beside = exported_path(weights, "onnx")
    if beside.is_file():
        return beside, _check_meta(_onnx_meta(beside), weights, beside, "onnx")
    cache = _cache_dir()
    target = cache / f"{file_sha256(weights)[:16]}-b{batch}-torch{torch.__version__.split('+')[0]}.onnx"
    if not target.is_file():
        started = time.perf_counter()
        logger.warning("exporting the model for OpenVINO (once; cached in %s)", cache)
        export_model(weights, "onnx", target, batch, net)
        logger.info("exported %s in %.0f s", target, time.perf_counter() - started)
    return target, batch


def _onnxruntime(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort  # optional dependency

    ort.disable_telemetry_events()  # nothing written to the user's home
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"slices": x.numpy()})[0])


def _openvino(path: Path, precision: str, cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov  # optional dependency

    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    if cache:
        config["CACHE_DIR"] = str(_cache_dir() / "openvino")  # the compiled model, reused by later runs
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def _compiled(net: SAMoraNet) -> Callable[[torch.Tensor], torch.Tensor]:
    core = torch.compile(ModelCore(net).eval(), dynamic=False)
    bf16 = net.precision == "bf16"

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return core(x)

    return run


def network_engine(net: SAMoraNet, engine: str, batch: int, folder: str | Path, precision: str = "fp32") -> nn.Module:
    """``net`` (eval mode) run by ``engine`` (:data:`ENGINES` but ``auto``) without a weights file:
    what ``bench --engine`` times. TorchScript, ONNX Runtime and OpenVINO export the float32 ``net``
    (any other is refused) for batches of ``batch`` into ``folder`` and keep nothing in the cache;
    ``precision`` is OpenVINO's (``bf16`` or ``fp32``); ``eager`` and ``compile`` run ``net`` in its own
    precision. Shapes as :class:`EngineNet`."""
    if engine not in ENGINES or engine == "auto":
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(e for e in ENGINES if e != 'auto')}")
    if engine == "eager":
        return net
    if engine == "compile":
        return EngineNet(net, _compiled(net), engine, batch)
    if net.precision != "fp32":
        raise ValueError(f"engine {engine} exports the float32 network; build it with precision fp32")
    fmt = "torchscript" if engine == "torchscript" else "onnx"
    path = Path(folder) / f"core{FORMATS[fmt]}"
    _write(ModelCore(net).eval(), fmt, path, {"batch": batch}, batch)
    if engine == "torchscript":
        return EngineNet(net, torch.jit.load(str(path), map_location="cpu"), engine, batch)
    if engine == "onnxruntime":
        return EngineNet(net, _onnxruntime(path), engine, batch)
    return EngineNet(net, _openvino(path, precision, cache=False), engine, batch)


def _trial_file(weights: Path, batch: int) -> Path:
    """Where the measured choice for these weights, this batch and this CPU is kept."""
    cpu = cpu_summary()
    try:
        openvino = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        openvino = ""
    key = json.dumps([cpu["model"], cpu["kernel_level"], cpu["onednn_max_isa"], cpu["threads"], torch.__version__, openvino])
    return _cache_dir() / f"{file_sha256(weights)[:16]}-b{batch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.engine.json"


def _read_trial(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("engine") in ("eager", "openvino") else None


def _per_batch(found: dict) -> str:
    return f"OpenVINO {found['openvino_s']:.2f} s vs eager {found['eager_s']:.2f} s per batch of {found['batch']}"


def choose_engine(net: SAMoraNet, weights: str | Path, batch: int = 8, volumes: int = 1,
                  device: str | torch.device = "cpu") -> tuple[str, str]:
    """What ``auto`` runs for ``volumes`` volumes with ``net`` (from ``weights``) on ``device``, and why:
    ``"eager"``, ``"openvino"``, or ``"trial"`` (time both once: :func:`build_engine` does).

    Eager on a GPU, in bf16 (PyTorch's autocast; the other engines run fp32), without OpenVINO, or
    for fewer than :data:`AUTO_MIN_VOLUMES` volumes; otherwise what an earlier trial on this CPU
    measured, or a trial. ``$SAMORA_ENGINE`` (one of
    :data:`ENGINES` but ``auto``) overrides the choice.
    """
    forced = os.environ.get(AUTO_ENV, "").strip().lower()
    if forced:
        if forced not in ENGINES or forced == "auto":
            raise ValueError(f"{AUTO_ENV}={forced!r}: must be one of {', '.join(e for e in ENGINES if e != 'auto')}")
        return forced, f"{AUTO_ENV}={forced}"
    if torch.device(device).type != "cpu":
        return "eager", f"the network runs on {torch.device(device).type}"
    if net.precision != "fp32":
        return "eager", f"precision {net.precision}: PyTorch's autocast runs it, the other engines run fp32"
    if importlib.util.find_spec("openvino") is None:
        return "eager", "OpenVINO is not installed"
    if volumes < AUTO_MIN_VOLUMES:  # even compiled from the cache, OpenVINO gains a few seconds at most here and
        # holds about 1 GB more (docs/results.md §4g)
        return "eager", (f"{volumes} volume{'s' if volumes != 1 else ''}: OpenVINO is tried from "
                         f"{AUTO_MIN_VOLUMES} volumes on, where its one-time costs can be repaid")
    weights = Path(weights)
    found = _read_trial(_trial_file(weights, batch))
    if found is not None:
        return found["engine"], f"measured on this CPU before: {_per_batch(found)}"
    return "trial", f"{volumes} volumes could repay OpenVINO's one-time export and compilation"


def _seconds_per_batch(net: SAMoraNet, candidate: "EngineNet", batch: int) -> tuple[float, float]:
    """Eager's and ``candidate``'s seconds for one batch of ``batch`` slices of model input, as the
    bundle will run them (``candidate`` pads to its exported batch): the faster of two timed calls
    each, alternating, after one untimed call each."""
    x = torch.rand(batch, 3, net.img_size, net.img_size)
    runs = {"eager": net.core, "other": candidate.core}
    best = {name: float("inf") for name in runs}
    with torch.no_grad():
        for timed in (False, True, True):
            for name, run in runs.items():
                started = time.perf_counter()
                run(x)
                if timed:
                    best[name] = min(best[name], time.perf_counter() - started)
    return best["eager"], best["other"]


def _trial(net: SAMoraNet, weights: Path, batch: int) -> nn.Module:
    """Build OpenVINO, time it against eager, keep the answer (see the module notes); the faster runs."""
    candidate = build_engine(net, "openvino", weights, batch)
    eager_s, openvino_s = _seconds_per_batch(net, candidate, batch)
    found = {"engine": "openvino" if openvino_s < AUTO_MARGIN * eager_s else "eager", "eager_s": round(eager_s, 4),
             "openvino_s": round(openvino_s, 4), "batch": batch, "exported_batch": candidate.batch,
             "cpu": cpu_summary(), "measured": time.strftime("%Y-%m-%d %H:%M")}
    target = _trial_file(weights, batch)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Path(tmp).write_text(json.dumps(found))
        kept = f"kept in {target}"
    except OSError as err:  # the answer stands for this run; the next one measures again
        kept = f"not kept: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    logger.warning("engine: %s (%s, measured now on this CPU; %s)", found["engine"], _per_batch(found), kept)
    return candidate if found["engine"] == "openvino" else net


def build_engine(net: SAMoraNet, engine: str, weights: str | Path, batch: int = 8, volumes: int = 1,
                 device: str | torch.device = "cpu") -> nn.Module:
    """``net`` (weights loaded, eval mode) run by ``engine`` (:data:`ENGINES`); ``weights``: the file
    they came from, beside which the exported models are looked for; ``batch``: the slices per call
    the caller will use (what ``openvino`` exports for when it exports); ``volumes`` and ``device``:
    what ``auto`` decides on (:func:`choose_engine`). The engine that runs is the returned module's
    ``engine`` attribute (none: ``net`` itself, eager)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    weights = Path(weights)
    if engine == "auto":
        engine, why = choose_engine(net, weights, batch, volumes, device)
        if engine == "trial":
            logger.warning("engine: timing OpenVINO against PyTorch eager on this CPU (once; %s)", why)
        else:
            logger.warning("engine: %s (%s; --engine eager|openvino chooses)", engine, why)
        if engine in ("trial", "openvino"):
            try:
                return _trial(net, weights, batch) if engine == "trial" else build_engine(net, engine, weights, batch)
            except Exception as err:  # noqa: BLE001 - an export or compile failure: eager still works
                logger.warning("OpenVINO is not usable for this model (%s); running PyTorch eager",
                               str(err).splitlines()[0] if str(err) else type(err).__name__)
                engine = "eager"
        if engine != "eager":
            return build_engine(net, engine, weights, batch)
    if engine == "eager":
        return net
    if engine == "compile":  # one batch shape (the last batch padded), so it compiles once
        return EngineNet(net, _compiled(net), engine, batch)
    if engine == "openvino":
        path, exported = _cached_onnx(weights, batch, net)
        return EngineNet(net, _openvino(path, net.precision), engine, exported)
    fmt = "torchscript" if engine == "torchscript" else "onnx"
    path = exported_path(weights, fmt)
    if not path.is_file():
        raise FileNotFoundError(f"engine {engine} needs {path}: run `python -m samora_components export --weights "
                                f"{weights} --format {fmt}` first")
    if engine == "torchscript":
        extra = {f"{_META_KEY}.json": ""}
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        exported = _check_meta(json.loads(extra[f"{_META_KEY}.json"] or "{}"), weights, path, fmt)
        return EngineNet(net, module, engine, exported)
    exported = _check_meta(_onnx_meta(path), weights, path, fmt)
    return EngineNet(net, _onnxruntime(path), engine, exported)
