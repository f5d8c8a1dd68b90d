"""Speed benchmark: SAMed vs SAMora encoder + decoder latency in one process (SPEC §4).

``python -m samora_components bench --backbone sam_vit_b|litemedsam --batch N --dtype auto|fp32|bf16
[--decoder samed|hsam] [--engine eager|compile|torchscript|onnxruntime|openvino]`` prints one JSON
object (``--decoder hsam``: both models carry H-SAM's two-stage decoder, i.e. H-SAM vs H-SAMora,
timed in eval mode, where it returns the stages' combination; ``--engine``: both models run by that
inference engine, exported from the same weights, as ``infer --engine`` runs a bundle; FLOPs are
counted on the PyTorch network either way, so that ``fraction_of_peak`` compares engines on the
same arithmetic):

* ``samed`` / ``samora``: per-slice latency (median over ``repeats`` timed forward passes after
  ``warmup`` untimed ones; the two models alternate, so both see the same machine conditions),
  FLOPs per slice (counted by ``torch.utils.flop_counter``), achieved GFLOP/s, total and stage-2
  trainable parameter counts;
* ``latency_ratio`` (ratio of the medians), ``latency_ratio_per_round`` (median/min/max of the
  ratios of back-to-back runs) and ``flop_ratio`` (SAMora / SAMed);
* ``matmul_peak_gflops``: the best rate of a large square matmul in the same dtype, timed in the
  same run, and each model's ``fraction_of_peak``.

Weights are random for SAM ViTs (no checkpoint is needed to time them) and the embedded ones for
LiteMedSAM; SAMora's experts get random non-zero updates and a non-zero gate so that nothing is
skipped. Both models run in inference mode on the same input.

``python -m samora_components bench-precision --bundle B --datalist D [--section test]`` segments a
datalist section with a trained bundle twice, in float32 and with bfloat16 autocast, and prints the
fraction of voxels whose label (the argmax) is the same, overall and among voxels that either run
labels foreground.

``python -m samora_components bench-infer --bundle B --input FOLDER [--weights W] [--precision P]
[--limit N]`` runs ``infer``'s own per-volume path (read, orient, scale, slice, model, post-process,
invert, write) on every volume and then, in the same process, the network alone on the very batches
it was given (captured on the way in, replayed in the same order). Per volume and in total it prints
the end-to-end seconds, the model's seconds inside the pipeline and alone, ``overhead`` (end to end /
model alone), and the process's user and system CPU seconds around the end-to-end run
(``system_fraction`` = system / user), with the peak RSS so far.

``python -m samora_components bench-engines --bundle B --input FOLDER [--engines eager,torchscript,
onnxruntime,openvino,compile] [--precision fp32]`` segments every volume of FOLDER with each engine
(the engines alternate volume by volume) and prints, per engine, the seconds per volume (median),
the time to get ready (export and compilation included) and the fraction of voxels labelled as by
``eager`` in the same precision.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from samora_components.bundle.cards import check_weights, model_card_path
from samora_components.bundle.export import ENGINES, export_model, network_engine
from samora_components.bundle.inference import BundlePredictor, find_volumes, predict_file
from samora_components.data.datasets import read_datalist
from samora_components.data.io import volume_stem
from samora_components.networks.precision import cpu_summary, native_bf16, resolve_precision
from samora_components.networks.samora_net import SAMoraNet

__all__ = ["benchmark", "matmul_peak", "main", "precision_agreement", "infer_overhead", "engine_comparison"]


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` timed (size x size) @ (size x size) products in
    ``dtype`` (``torch.utils.benchmark.Timer``, which warms up first), on the current threads."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its CUDA notice on CPU machines
    from torch.utils.benchmark import Timer  # imported here, after quietening that notice

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    timer = Timer(stmt="torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                            num_threads=torch.get_num_threads())
    best = min(timer.timeit(1).mean for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one steady-state forward pass as executed (padding included): a first, uncounted pass
    builds what inference keeps between calls (merged or stacked LoRA weights), as the timed passes
    had. PyTorch's counter has no formula for the CPU fused-attention kernel, so one is registered here."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.inference_mode():
        net(x)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            net(x)
    return int(counter.get_total_flops())


def _model(method: str, backbone: str, img_size: int | None, dtype: str, num_classes: int,
           decoder: str = "samed") -> SAMoraNet:
    checkpoint = None if backbone == "litemedsam" else ""
    net = SAMoraNet(num_classes, backbone=backbone, img_size=img_size, checkpoint=checkpoint, method=method,
                    precision=dtype, decoder=decoder)
    if method == "samora":
        with torch.no_grad():
            for site in net.sites:
                site.gate.fill_(0.1)
                for expert in site.experts.values():
                    expert.b_q.normal_(std=0.01)
                    expert.b_v.normal_(std=0.01)
    return net.eval()


#: engines that run an exported float32 network (OpenVINO may compute it in bf16)
_EXPORTED = ("torchscript", "onnxruntime", "openvino")


def benchmark(backbone: str = "sam_vit_b", batch: int = 8, dtype: str = "auto", img_size: int | None = None,
              warmup: int = 2, repeats: int = 7, num_classes: int = 9, decoder: str = "samed",
              engine: str = "eager") -> dict:
    """Time SAMed and SAMora forward passes on one batch; see the module docstring for the fields.
    ``dtype`` auto | fp32 | bf16 (auto: bf16 only where the CPU has it natively); ``decoder`` samed |
    hsam (the decoder of both models); ``engine``: what runs both (see the module docstring)."""
    choice = resolve_precision(dtype, "cpu")
    dtype = choice.precision
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be >= 1, warmup >= 0")
    if engine not in ENGINES or engine == "auto":  # before anything is built or timed
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(e for e in ENGINES if e != 'auto')}")
    if engine in ("torchscript", "onnxruntime") and dtype != "fp32":
        raise ValueError(f"engine {engine} runs float32 only; pass --dtype fp32")
    if engine == "openvino" and dtype == "bf16" and not native_bf16("cpu")[0]:
        raise ValueError("OpenVINO computes bf16 only on CPUs with native bf16 (AVX512-BF16 or AMX); pass --dtype fp32")
    if engine != "eager":
        warmup = max(warmup, 1)  # the first call exports, compiles or loads: never timed
    torch.manual_seed(0)
    result: dict = {"backbone": backbone, "decoder": decoder, "engine": engine, "batch": batch, "dtype": dtype,
                    "dtype_requested": choice.requested, "dtype_reason": choice.reason,
                    "threads": torch.get_num_threads(), "device": "cpu", "cpu": cpu_summary(), "warmup": warmup,
                    "repeats": repeats}
    built = "fp32" if engine in _EXPORTED else dtype  # exported engines start from the float32 network
    nets = {m: _model(m, backbone, img_size, built, num_classes, decoder) for m in ("samed", "samora")}
    size = nets["samed"].img_size
    result["img_size"] = size
    x = torch.rand(batch, 1, size, size)
    peak = matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
    with tempfile.TemporaryDirectory(prefix="samora-bench-") as tmp:
        runs = {}
        for method, net in nets.items():
            (Path(tmp) / method).mkdir()
            runs[method] = network_engine(net, engine, batch, Path(tmp) / method, dtype)
        times = _alternate(runs, x, warmup, repeats)
    for method, net in nets.items():
        median = statistics.median(times[method])
        flops = _flops(net, x)
        result[method] = {
            "latency_ms_per_slice": 1e3 * median / batch,
            "latency_ms_per_batch": {"median": 1e3 * median, "min": 1e3 * min(times[method]), "max": 1e3 * max(times[method])},
            "gflop_per_slice": flops / batch / 1e9,
            "gflops_achieved": flops / median / 1e9,
            "fraction_of_peak": flops / median / 1e9 / peak,
            "params_total": sum(p.numel() for p in net.parameters()),
            "params_trainable": sum(p.numel() for p in net.trainable_parameters()),
        }
    ratios = [a / b for a, b in zip(times["samora"], times["samed"])]
    result["latency_ratio_per_round"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    result["latency_ratio"] = result["samora"]["latency_ms_per_slice"] / result["samed"]["latency_ms_per_slice"]
    result["flop_ratio"] = result["samora"]["gflop_per_slice"] / result["samed"]["gflop_per_slice"]
    result["params_added_by_samora"] = result["samora"]["params_total"] - result["samed"]["params_total"]
    result["matmul_peak_gflops"] = peak
    return result


def _alternate(runs: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of every model in ``runs`` on ``x``, the models taking
    turns (so that all see the same machine conditions), after ``warmup`` untimed rounds."""
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs.values():
                run(x)
        times: dict[str, list[float]] = {m: [] for m in runs}
        for _ in range(repeats):
            for method, run in runs.items():
                start = time.perf_counter()
                run(x)
                times[method].append(time.perf_counter() - start)
    return times


def main(backbone: str = "sam_vit_b", batch: int = 8, dtype: str = "auto", img_size: int | None = None,
         warmup: int = 2, repeats: int = 7, decoder: str = "samed", engine: str = "eager") -> dict:
    """CLI entry: run :func:`benchmark` and print its JSON on one line."""
    result = benchmark(backbone, batch, dtype, img_size, warmup, repeats, decoder=decoder, engine=engine)
    print(json.dumps(result))
    return result


def precision_agreement(bundle: str, datalist: str, section: str = "test", weights: str | None = None) -> dict:
    """Labels of a bundle's model in float32 vs bfloat16 autocast on every volume of a datalist section.

    Returns ``{"bundle", "weights", "section", "cases", "voxels", "agreement", "foreground_agreement",
    "per_case": {case: agreement}}``; ``agreement`` is the fraction of all voxels with the same label,
    ``foreground_agreement`` the same fraction over voxels that either run labels non-background.
    """
    items = read_datalist(datalist, section)
    if not items:
        raise ValueError(f"{datalist} has no '{section}' items")
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # identical networks even where frozen weights are random (test backbones)
        runs[precision] = BundlePredictor.from_bundle(bundle, weights, precision=precision)
    same = total = fg_same = fg_total = 0
    per_case = {}
    for item in items:
        a, b = (runs[p](item["image"]) for p in ("fp32", "bf16"))
        fg = (a > 0) | (b > 0)
        per_case[volume_stem(Path(item["image"]))] = float((a == b).mean())
        same, total = same + int((a == b).sum()), total + a.size
        fg_same, fg_total = fg_same + int((a == b)[fg].sum()), fg_total + int(fg.sum())
    return {
        "bundle": str(bundle), "weights": str(weights or Path(bundle) / "models" / "model.pt"), "section": section,
        "cases": len(items), "voxels": total, "agreement": same / total,
        "foreground_agreement": fg_same / fg_total if fg_total else 1.0, "per_case": per_case,
    }


#: engine -> the export format it runs (None: none needed)
_ENGINE_FORMAT = {"eager": None, "compile": None, "torchscript": "torchscript", "onnxruntime": "onnx", "openvino": "onnx"}


def engine_comparison(bundle: str, input: str, engines: str | tuple = ("eager", "torchscript", "onnxruntime", "openvino"),
                      weights: str | None = None, precision: str = "fp32", limit: int | None = None) -> dict:
    """Each engine on every volume of ``input`` (a file or folder), against ``eager``.

    The weights and their card are copied to a temporary folder, where the exported models are
    written. Returns ``{"cpu", "precision", "volumes", "voxels", "engines": {engine: {"ready_s",
    "s_per_volume", "s_per_volume_all", "agreement", "min_agreement"}}}``; ``agreement`` is the
    fraction of all voxels labelled as by eager, ``min_agreement`` the lowest per volume.
    """
    engines = tuple(e.strip() for e in engines.split(",")) if isinstance(engines, str) else tuple(engines)
    unknown = [e for e in engines if e not in _ENGINE_FORMAT]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; choose among {', '.join(_ENGINE_FORMAT)}")
    engines = ("eager",) + tuple(e for e in engines if e != "eager")
    sources = find_volumes(input)[: limit or None]
    weights = check_weights(weights or Path(bundle) / "models" / "model.pt")
    with tempfile.TemporaryDirectory(prefix="samora-engines-") as tmp:
        local = Path(tmp) / "model.pt"
        shutil.copy(weights, local)
        shutil.copy(model_card_path(weights), model_card_path(local))
        runs, ready = {}, {}
        for engine in engines:
            started = time.perf_counter()
            torch.manual_seed(0)  # identical networks even where frozen weights are random (test backbones)
            fmt = _ENGINE_FORMAT[engine]
            if fmt and not local.with_suffix(".onnx" if fmt == "onnx" else ".ts").is_file():
                # exported for the bundle's slice batch: a smaller one would be padded to the exported size
                export_model(local, fmt, batch=runs["eager"].inferer.sw_batch_size)
            runs[engine] = BundlePredictor.from_bundle(bundle, str(local), precision=precision, engine=engine)
            ready[engine] = time.perf_counter() - started
        seconds = {e: [] for e in engines}
        same = {e: 0 for e in engines}
        worst = {e: 1.0 for e in engines}
        total = 0
        for source in tqdm(sources, desc="engines", unit="vol", disable=len(sources) < 2):
            labels = {}
            for engine in engines:
                started = time.perf_counter()
                labels[engine] = runs[engine](str(source))
                seconds[engine].append(time.perf_counter() - started)
            total += labels["eager"].size
            for engine in engines:
                agree = labels[engine] == labels["eager"]
                same[engine] += int(agree.sum())
                worst[engine] = min(worst[engine], float(agree.mean()))
    return {
        "cpu": cpu_summary(), "precision": precision, "volumes": len(sources), "voxels": total,
        "engines": {e: {"ready_s": round(ready[e], 2), "s_per_volume": round(statistics.median(seconds[e]), 3),
                        "s_per_volume_all": [round(t, 3) for t in seconds[e]],
                        "agreement": same[e] / total, "min_agreement": worst[e]} for e in engines},
    }


class _ForwardLog:
    """Forward hooks on a network: the seconds spent in its forward passes and, when ``keep``, a copy
    of every input batch (to replay the same slices on the model alone)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.seconds = 0.0
        self.batches: list[torch.Tensor] = []
        self.keep = True
        self._started = 0.0
        self._handles = [network.register_forward_pre_hook(self._pre), network.register_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        if self.keep:
            self.batches.append(args[0].detach().clone())
        self._started = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _cpu_seconds() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def infer_overhead(bundle: str, input: str, weights: str | None = None, precision: str | None = None,
                   limit: int | None = None) -> dict:
    """``infer`` end to end against the model alone on the same slices (see the module docstring).

    Each volume is first segmented once untimed (warm-up: allocator, kernels' first-call costs), then
    end to end with the hooks recording, then the recorded batches are replayed through the network.
    Returns ``{"cpu", "precision", "volumes": [{"name", "slices", "end_to_end_s", "model_in_pipeline_s",
    "model_alone_s", "overhead", "user_s", "system_s", "system_fraction"}], "total": {...},
    "peak_rss_gb"}``.
    """
    predictor = BundlePredictor.from_bundle(bundle, weights, precision=precision)
    network = predictor.network
    if not isinstance(network, torch.nn.Module):
        raise ValueError("bench-infer times the eager engine (a torch.nn.Module network)")
    sources = find_volumes(input)[: limit or None]
    rows = []
    with tempfile.TemporaryDirectory(prefix="samora-bench-infer-") as tmp:
        log = _ForwardLog(network)
        try:
            for source in tqdm(sources, desc="bench-infer", unit="vol", disable=len(sources) < 2):
                target = Path(tmp) / "label.nii.gz"
                log.keep = False
                predict_file(predictor, source, target)  # warm-up
                log.batches, log.seconds, log.keep = [], 0.0, True
                user0, sys0 = _cpu_seconds()
                started = time.perf_counter()
                predict_file(predictor, source, target)
                end_to_end = time.perf_counter() - started
                user1, sys1 = _cpu_seconds()
                log.keep = False
                batches, in_pipeline = log.batches, log.seconds
                log.batches = []
                with torch.no_grad():
                    started = time.perf_counter()
                    for batch in batches:
                        network(batch)
                    alone = time.perf_counter() - started
                user, system = user1 - user0, sys1 - sys0
                rows.append({"name": volume_stem(source), "slices": int(sum(b.shape[0] for b in batches)),
                             "end_to_end_s": round(end_to_end, 4), "model_in_pipeline_s": round(in_pipeline, 4),
                             "model_alone_s": round(alone, 4), "overhead": end_to_end / alone if alone else float("nan"),
                             "user_s": round(user, 2), "system_s": round(system, 2),
                             "system_fraction": system / user if user else float("nan")})
        finally:
            log.remove()
    if not rows:
        raise ValueError(f"{input}: no volumes")
    total = {key: sum(r[key] for r in rows) for key in ("slices", "end_to_end_s", "model_in_pipeline_s", "model_alone_s",
                                                        "user_s", "system_s")}
    total["overhead"] = total["end_to_end_s"] / total["model_alone_s"] if total["model_alone_s"] else float("nan")
    total["system_fraction"] = total["system_s"] / total["user_s"] if total["user_s"] else float("nan")
    return {"cpu": cpu_summary(), "precision": getattr(network, "precision", precision),
            "threads": torch.get_num_threads(), "volumes": rows, "total": total,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}
