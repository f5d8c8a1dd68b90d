"""Precision chosen by the hardware: bf16 autocast only where it is native, never inherited onto a
CPU that would emulate it; explicit fp32/bf16 always obeyed."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from samora_components.networks import precision as P
from samora_components.networks.samora_net import SAMoraNet


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(P.ENV_VAR, raising=False)  # the suite pins auto to fp32 (conftest); here auto is tested
    P._resolve.cache_clear()
    yield
    P._resolve.cache_clear()


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_the_environment_fixes_what_auto_means(monkeypatch, forced):
    monkeypatch.setenv(P.ENV_VAR, forced)
    assert P.resolve_precision("auto", "cpu").precision == forced
    other = "bf16" if forced == "fp32" else "fp32"
    assert P.resolve_precision(other, "cpu").precision == other  # explicit requests still win
    monkeypatch.setenv(P.ENV_VAR, "fp64")
    with pytest.raises(ValueError, match="SAMORA_PRECISION"):
        P.resolve_precision("auto", "cpu")


def _cpu(monkeypatch, flags: dict, level: str = "AVX512", onednn: str | None = None) -> None:
    monkeypatch.setattr(P, "_cpu_capabilities", lambda: dict(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if onednn is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)


@pytest.mark.parametrize(
    "flags,level,onednn,native",
    [
        ({"avx2": True, "avx512_bf16": False, "amx_bf16": False}, "AVX2", None, False),  # AVX2-only CPU
        ({"avx512_bf16": True, "amx_bf16": False}, "AVX512", None, True),  # AVX-512 bf16 (e.g. Zen 4)
        ({"avx512_bf16": True, "amx_bf16": True}, "AVX512", None, True),  # AMX (Sapphire Rapids)
        ({"avx512_bf16": True, "amx_bf16": True}, "AVX2", "AVX2", False),  # AMX CPU told to use AVX2 kernels
        ({"avx512_bf16": True, "amx_bf16": True}, "AVX512", "AVX2", False),  # oneDNN capped below bf16
        ({"avx512_bf16": True, "amx_bf16": True}, "AVX512", "AVX512_CORE_AMX", True),
        ({"avx512_f": True, "avx512_bf16": False}, "AVX512", None, False),  # AVX-512 without bf16
    ],
)
def test_native_bf16_follows_flags_kernel_level_and_onednn_cap(monkeypatch, flags, level, onednn, native):
    _cpu(monkeypatch, flags, level, onednn)
    found, reason = P.native_bf16("cpu")
    assert found is native and reason
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == ("bf16" if native else "fp32") and choice.reason.startswith("auto: ")


def test_explicit_choices_win_and_bad_names_are_refused(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16": False, "amx_bf16": False}, "AVX2")
    assert P.resolve_precision("bf16", "cpu").precision == "bf16"
    assert "slow here" in P.resolve_precision("bf16", "cpu").reason
    assert P.resolve_precision("fp32", "cpu").precision == "fp32"
    assert P.resolve_precision(None, "cpu").requested == "auto"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        P.resolve_precision("fp16", "cpu")


def test_one_log_line_says_what_was_chosen_and_why(monkeypatch, caplog):
    _cpu(monkeypatch, {"avx512_bf16": False, "amx_bf16": False}, "AVX2")
    with caplog.at_level(logging.INFO, logger="samora"):
        P.resolve_precision("auto", "cpu")
        P.resolve_precision("auto", "cpu")  # asked again: no second line
    lines = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert lines == ["precision fp32 (auto: this CPU has no avx512_bf16/amx_bf16: bf16 would be emulated) on cpu"]


def test_the_network_resolves_auto_and_autocasts_only_when_bf16(monkeypatch):
    _cpu(monkeypatch, {"avx512_bf16": False, "amx_bf16": False}, "AVX2")
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samed")  # default: auto
    assert net.precision == "fp32"
    seen = []
    net.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    net(torch.rand(1, 1, 64, 64))
    assert seen == [torch.float32]
    P._resolve.cache_clear()
    _cpu(monkeypatch, {"avx512_bf16": True, "amx_bf16": True}, "AVX512")
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samed")
    assert net.precision == "bf16"
    seen.clear()
    net.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert net(torch.rand(1, 1, 64, 64)).dtype == torch.float32  # logits come back in fp32
    assert seen == [torch.bfloat16]


def test_the_real_cpu_is_described():
    summary = P.cpu_summary()
    assert set(summary) >= {"model", "avx512_bf16", "amx_bf16", "kernel_level", "threads"}
    assert isinstance(summary["avx512_bf16"], bool)


def test_inference_does_not_inherit_training_bf16_on_an_avx2_cpu(monkeypatch):
    """The shipped MR model was trained in bf16 (its card says so); an AVX2-only CPU runs it in fp32."""
    from pathlib import Path

    from samora_components.bundle.inference import BundlePredictor

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "samora_mr"
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip("bundles/samora_mr ships no model")
    _cpu(monkeypatch, {"avx512_bf16": False, "amx_bf16": False}, "AVX2")
    assert json.loads((bundle / "models" / "model.json").read_text())["precision"] == "bf16"
    assert BundlePredictor.from_bundle(bundle).network.precision == "fp32"
    P._resolve.cache_clear()
    assert BundlePredictor.from_bundle(bundle, precision="bf16").network.precision == "bf16"  # asked for: obeyed


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != "avx2",
                    reason="only under ATEN_CPU_CAPABILITY=avx2 (the second pass of .ci/run)")
def test_avx2_kernels_really_selected_and_fp32_chosen():
    """Under the AVX2 restriction torch reports AVX2 kernels and ``auto`` never picks bf16 on the CPU."""
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32"
