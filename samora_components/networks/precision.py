"""Which floating-point precision to compute in, chosen by the hardware.

``precision: auto`` (the default of training, inference, the demo and the benchmark) uses bfloat16
autocast only where bfloat16 arithmetic is native:

* a CUDA device that supports bfloat16;
* a CPU whose flags show ``avx512_bf16`` or ``amx_bf16`` (asked from PyTorch's own CPU capability
  query, ``torch.cpu.get_capabilities()``), *and* whose kernels are allowed to use them: PyTorch's
  dispatch level (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``)
  must be AVX-512 and oneDNN must not be capped below AVX-512 (``ONEDNN_MAX_CPU_ISA``).

Everywhere else bfloat16 is emulated (about 75x slower than float32 on an AVX2-only CPU), so
``auto`` means float32 there. An explicit ``fp32`` or ``bf16`` is always obeyed.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("samora")

__all__ = ["PRECISIONS", "PrecisionChoice", "native_bf16", "resolve_precision", "check_precision", "cpu_summary"]

#: what a config or the command line may ask for
PRECISIONS = ("auto", "fp32", "bf16")
#: environment variable that fixes what ``auto`` means on this machine (``fp32`` or ``bf16``), e.g.
#: to reproduce a run from another CPU kind; explicit ``fp32``/``bf16`` requests still win
ENV_VAR = "SAMORA_PRECISION"

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that keep its bfloat16 kernels native
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                     "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")


@dataclass(frozen=True)
class PrecisionChoice:
    """The outcome of :func:`resolve_precision`: ``precision`` is ``"fp32"`` or ``"bf16"``."""

    precision: str
    requested: str
    reason: str

    def __str__(self) -> str:
        return f"precision {self.precision} ({self.reason})"


def check_precision(requested: str | None) -> str:
    """``None`` -> ``"auto"``; anything outside :data:`PRECISIONS` raises ``ValueError``."""
    requested = "auto" if requested is None else str(requested)
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    return requested


def _cpu_capabilities() -> dict:
    getter = getattr(torch.cpu, "get_capabilities", None)
    if getter is None:  # older PyTorch: the private query behind it
        getter = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    try:
        return dict(getter()) if getter is not None else {}
    except Exception:  # pragma: no cover - a query that fails means "unknown"
        return {}


def _cpuinfo_flags() -> set[str]:
    """Flags of /proc/cpuinfo (Linux), the fallback when PyTorch cannot tell."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether bfloat16 arithmetic is native on ``device``, and why (one short phrase)."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return False, "the CUDA device has no bf16 support"
    if device.type != "cpu":
        return False, f"bf16 support of {device.type} devices is not checked"
    caps = _cpu_capabilities()
    if caps:
        flags = {name for name in ("avx512_bf16", "amx_bf16") if caps.get(name)}
    else:
        flags = _cpuinfo_flags() & {"avx512_bf16", "amx_bf16"}
    if not flags:
        return False, "this CPU has no avx512_bf16/amx_bf16: bf16 would be emulated"
    dispatch = torch.backends.cpu.get_cpu_capability()
    if not dispatch.upper().startswith("AVX512"):
        return False, f"PyTorch kernels run at the {dispatch} level (ATEN_CPU_CAPABILITY): bf16 would be emulated"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(var, "").strip().upper()
        if cap and cap not in _ONEDNN_BF16_ISAS:
            return False, f"{var}={cap} keeps oneDNN below its bf16 kernels"
    return True, f"CPU has {' and '.join(sorted(flags))}"


@functools.lru_cache(maxsize=None)
def _resolve(requested: str, device_type: str, forced: str) -> PrecisionChoice:
    native, why = native_bf16(device_type)
    if requested == "auto" and forced in ("fp32", "bf16"):
        choice = PrecisionChoice(forced, requested, f"auto: {ENV_VAR}={forced}")
    elif requested == "fp32":
        choice = PrecisionChoice("fp32", requested, "asked for fp32")
    elif requested == "bf16":
        note = "" if native else "; slow here: " + why
        choice = PrecisionChoice("bf16", requested, "asked for bf16" + note)
    else:
        choice = PrecisionChoice("bf16" if native else "fp32", requested, "auto: " + why)
    logger.info("%s on %s", choice, device_type)
    return choice


def resolve_precision(requested: str | None = "auto", device: str | torch.device | None = None) -> PrecisionChoice:
    """Turn ``auto``/``fp32``/``bf16`` into the precision to run in on ``device`` (default: CUDA when
    available, else the CPU). Logs one line per distinct request and device saying what was chosen
    and why."""
    requested = check_precision(requested)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in PRECISIONS:
        raise ValueError(f"{ENV_VAR}={forced!r}: must be one of {', '.join(PRECISIONS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _resolve(requested, torch.device(device).type, forced)


def cpu_summary() -> dict:
    """What timing reports name: CPU model, its bf16 flags, PyTorch's kernel level, threads."""
    caps = _cpu_capabilities()
    model = caps.get("cpu_name") or ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    flags = _cpuinfo_flags()
    return {
        "model": model,
        "avx512_bf16": bool(caps.get("avx512_bf16", "avx512_bf16" in flags)),
        "amx_bf16": bool(caps.get("amx_bf16", "amx_bf16" in flags)),
        "kernel_level": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "threads": torch.get_num_threads(),
    }
