"""Low-rank experts on the q and v rows of SAM's fused ``qkv`` projections (SPEC §3).

An *expert* is one LoRA per attention site of an encoder. Each site's update is

    qkv'(x) = qkv(x) + scatter_q(B_q A_q x) + scatter_v(B_v A_v x)

with A (r, C) Kaiming-uniform (a = sqrt 5) and B (n, r) zeros, no scaling, so a fresh expert
leaves the encoder unchanged. The rows of q and v inside the fused output depend on the layout the
backbone declares: ``[q | k | v]`` for SAM's ViT and SAM2's Hiera, head-interleaved ``[q_h k_h v_h]``
for TinyViT. C is the width of the site's input and n the number of q (or v) rows; they differ at
Hiera's stage-transition blocks, whose qkv maps ``dim`` to ``3 * dim_out``.

Experts are saved as safetensors files with their metadata (backbone, checkpoint hash, rank,
targets, level, input size, data summary) so that they can be moved between tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from samora_components.utils import atomic_path

__all__ = [
    "ATTENTION_LAYOUTS", "QKVRows", "cache_key", "qkv_rows", "LoRAExpert", "LoRAQKV", "attach_lora", "save_expert", "load_expert", "read_expert_metadata",
    "LEVELS",
]

LEVELS = ("image", "patch", "pixel")


@dataclass(frozen=True)
class QKVRows:
    """Row indices of q, k and v inside a fused qkv projection's output, plus head geometry.

    Shapes: ``q``/``k`` (H * dq,), ``v`` (H * dv,), ordered head-major so that
    ``out[..., q].view(..., H, dq)`` gives per-head queries.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_heads: int
    dq: int
    dv: int


#: how an attention module lays out its fused qkv output (declared by each backbone):
#: ``sam_vit`` = ``[q | k | v]``, ``tinyvit`` = per head ``[q_h(kd) k_h(kd) v_h(d)]``,
#: ``hiera`` = ``[q | k | v]`` of ``dim_out`` rows each (SAM2's ``MultiScaleAttention``)
ATTENTION_LAYOUTS = ("sam_vit", "tinyvit", "hiera")


def qkv_rows(attn: nn.Module, layout: str) -> QKVRows:
    """Locate the q, k, v rows of ``attn.qkv`` for an attention module of the given layout.

    ``sam_vit`` and ``hiera`` split the fused output into three equal head-major blocks (SAM2's
    ``MultiScaleAttention`` reshapes it to (..., 3, heads, head_dim)); ``tinyvit`` interleaves the
    three per head."""
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention layout must be one of {', '.join(ATTENTION_LAYOUTS)}, got {layout!r}")
    out = attn.qkv.out_features
    heads = attn.num_heads
    if layout == "tinyvit":
        kd, d = attn.key_dim, attn.d
        stride = 2 * kd + d
        base = torch.arange(heads)[:, None] * stride
        q = (base + torch.arange(kd)).flatten()
        k = (base + kd + torch.arange(kd)).flatten()
        v = (base + 2 * kd + torch.arange(d)).flatten()
        return QKVRows(q, k, v, heads, kd, d)
    dim = out // 3  # SAM ViT and Hiera: [q | k | v], each head-major (Hiera: dim_out rows each)
    ar = torch.arange(dim)
    return QKVRows(ar, ar + dim, ar + 2 * dim, heads, dim // heads, dim // heads)


class LoRAExpert(nn.Module):
    """Rank-r updates of q and v for one attention site.

    Args:
        in_features: width C of the site's input.
        q_features / v_features: number of q / v rows.
        rank: r.
    """

    def __init__(self, in_features: int, q_features: int, v_features: int, rank: int = 4) -> None:
        super().__init__()
        self.rank = rank
        self.a_q = nn.Parameter(torch.empty(rank, in_features))
        self.b_q = nn.Parameter(torch.zeros(q_features, rank))
        self.a_v = nn.Parameter(torch.empty(rank, in_features))
        self.b_v = nn.Parameter(torch.zeros(v_features, rank))
        nn.init.kaiming_uniform_(self.a_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.a_v, a=math.sqrt(5))

    def deltas(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank q and v updates for input x (..., C) -> ((..., nq), (..., nv))."""
        return F.linear(F.linear(x, self.a_q), self.b_q), F.linear(F.linear(x, self.a_v), self.b_v)


class LoRAQKV(nn.Module):
    """A fused qkv linear plus one trainable :class:`LoRAExpert` (SAMed-style adaptation).

    The low-rank update is merged into the weight, so the forward costs one matmul of the original
    size: (..., C) -> (..., 3 * C'). While training (or whenever gradients are recorded) the merge
    happens on every call, so gradients stay exact; in inference the merged weight is kept and
    rebuilt only when a weight changes (an optimizer step, a loaded state dict, a device move).
    """

    def __init__(self, base: nn.Linear, rows: QKVRows, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("q_rows", rows.q, persistent=False)
        self.register_buffer("v_rows", rows.v, persistent=False)
        self.expert = LoRAExpert(base.in_features, rows.q.numel(), rows.v.numel(), rank)
        self._merged: tuple[tuple, torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """(out, in) weight update with q and v rows filled."""
        e = self.expert
        delta = self.base.weight.new_zeros(self.base.weight.shape)
        delta = delta.index_add(0, self.q_rows, (e.b_q @ e.a_q).to(delta.dtype))
        return delta.index_add(0, self.v_rows, (e.b_v @ e.a_v).to(delta.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The base weight plus the update, kept between inference calls while no weight changes
        (also dropped by every ``train()``/``eval()`` switch, for optimizers that update in place
        without a version bump)."""
        key = cache_key((self.base.weight, *self.expert.parameters()))
        if key is None or self._merged is None or self._merged[0] != key:
            with torch.no_grad():
                merged = self.base.weight + self.delta_weight()
            self._merged = None if key is None else (key, merged)
            return merged
        return self._merged[1]

    def train(self, mode: bool = True) -> "LoRAQKV":
        self._merged = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)
        return F.linear(x, self.merged_weight(), self.base.bias)


def cache_key(tensors) -> tuple | None:
    """What identifies the current values of ``tensors`` (storage, in-place version, dtype), or None
    when they cannot be tracked (inference-mode tensors)."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def attach_lora(sites: list[nn.Module], layout: str, rank: int = 4) -> list[LoRAQKV]:
    """Wrap the ``qkv`` projection of every attention module in ``sites`` (of the backbone's
    ``layout``) with a :class:`LoRAQKV`.

    Returns the wrappers in site order; their experts are the only new trainable parameters.
    """
    wrapped = []
    for attn in sites:
        attn.qkv = LoRAQKV(attn.qkv, qkv_rows(attn, layout), rank)
        wrapped.append(attn.qkv)
    return wrapped


def save_expert(experts: list[LoRAExpert], path: str | Path, metadata: dict) -> None:
    """Write a list of per-site experts to a safetensors file.

    Tensor names are ``sites.{i}.{a_q|b_q|a_v|b_v}``; ``metadata`` values are stored as JSON
    strings (safetensors metadata is str -> str).
    """
    tensors = {}
    for i, e in enumerate(experts):
        for name in ("a_q", "b_q", "a_v", "b_v"):
            tensors[f"sites.{i}.{name}"] = getattr(e, name).detach().float().contiguous().cpu()
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["num_sites"] = json.dumps(len(experts))
    meta["rank"] = json.dumps(experts[0].rank if experts else 0)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_expert_metadata(path: str | Path) -> dict:
    """Metadata of an expert file, JSON-decoded."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def load_expert(path: str | Path, experts: list[LoRAExpert]) -> dict:
    """Copy an expert file's tensors into ``experts`` (one per site, same shapes); return its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert file not found: {path}")
    try:
        meta = read_expert_metadata(path)
    except (SafetensorError, ValueError) as err:  # truncated, not safetensors, or bad metadata JSON
        raise ValueError(f"{path}: not a readable expert file, truncated or corrupt? ({str(err).splitlines()[0]})") from err
    if meta.get("num_sites") != len(experts):
        raise ValueError(
            f"{path} holds {meta.get('num_sites')} sites but the encoder has {len(experts)} "
            f"(expert backbone: {meta.get('backbone')})"
        )
    with safe_open(str(path), framework="pt") as handle:
        with torch.no_grad():
            for i, e in enumerate(experts):
                for name in ("a_q", "b_q", "a_v", "b_v"):
                    tensor = handle.get_tensor(f"sites.{i}.{name}")
                    param = getattr(e, name)
                    if tensor.shape != param.shape:
                        raise ValueError(f"{path}: site {i} {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                    param.copy_(tensor)
    return meta
