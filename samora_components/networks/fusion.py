"""Fusion of the expert deltas at one SAMora site: HL-Attn and the baselines (SPEC §4).

A fusion module maps the deltas ``{level: d_e}`` (each (B, N, C)) and the site input ``u`` (B, N, C)
to one fused delta ``f`` (B, N, C); :class:`~samora_components.networks.expert_attention.ExpertAttention`
computes the deltas and applies ``a0 + γ · f``.

HL-Attn fuses sequentially with cross-attention in a bottleneck width (default 128, 4 heads)::

    h1 = d_a + CA(LN(d_a), LN(d_b))        # step 1: the two levels fused first
    f  = d_c + CA(LN(d_c), LN(h1))         # step 2: the level fused last

The fusion order is the paper's notation over (image, patch, pixel): ``"2-1-1"`` fuses the image
level last (default), ``"1-2-1"`` the patch level, ``"1-1-2"`` the pixel level. Within step 1 the
higher level (image > patch > pixel) is the query.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samora_components.networks.lora import LEVELS

__all__ = [
    "CrossAttention",
    "HLAttn",
    "LACFusion",
    "LoRAHubFusion",
    "MoLEFusion",
    "SingleExpertFusion",
    "attend",
    "build_fusion",
    "lorahub_search",
    "parse_order",
    "FUSIONS",
]


def parse_order(order: str, levels: tuple[str, ...] = LEVELS) -> list[tuple[str, str]]:
    """Turn a fusion order over (image, patch, pixel) into (query, key/value) steps.

    ``"2-1-1"`` -> [("patch", "pixel"), ("image", "h")], where "h" is the previous step's result.
    With two levels, one step: the higher level queries the lower.
    """
    if len(levels) == 2:
        hi, lo = sorted(levels, key=LEVELS.index)
        return [(hi, lo)]
    parts = order.split("-")
    if sorted(parts) != ["1", "1", "2"]:
        raise ValueError(f"fusion order must be one of '2-1-1', '1-2-1', '1-1-2', got {order!r}")
    last = LEVELS[parts.index("2")]
    first = [lv for lv in LEVELS if lv != last]  # already ordered high -> low
    return [(first[0], first[1]), (last, "h")]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., N, d) queries and (..., M, d) keys/values.

    The fused kernel on GPUs and wherever no gradient is needed (on CPUs it works a block of queries
    at a time, in cache); the explicit product and softmax when training on CPUs, whose backward
    pass is much faster there than the fused kernel's.
    """
    if q.is_cuda or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class CrossAttention(nn.Module):
    """Multi-head cross-attention in a bottleneck width.

    (B, N, C) queries and (B, M, C) keys/values -> (B, N, C). Both inputs are layer-normalised;
    q/k/v project C -> width (k and v in one product), the output projects width -> C.
    """

    def __init__(self, dim: int, width: int = 128, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"bottleneck width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, width)
        self.kv = nn.Linear(dim, 2 * width)  # keys and values of the same context: one product
        self.out = nn.Linear(width, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = query.shape
        m = context.shape[1]
        q = self.q(self.norm_q(query)).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).view(b, m, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = attend(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, -1))


class HLAttn(nn.Module):
    """Hierarchical LoRA attention: sequential cross-attention fusion of expert deltas.

    Args:
        dim: token width C of the site.
        levels: expert levels present (two or three of image/patch/pixel).
        order: fusion order over three levels ("2-1-1", "1-2-1", "1-1-2").
        width / heads: bottleneck geometry.
    """

    def __init__(self, dim: int, levels: tuple[str, ...] = LEVELS, order: str = "2-1-1", width: int = 128, heads: int = 4):
        super().__init__()
        self.steps = parse_order(order, tuple(levels))
        self.cross = nn.ModuleList(CrossAttention(dim, width, heads) for _ in self.steps)

    def forward(self, deltas: dict[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        h = None
        for (query, kv), cross in zip(self.steps, self.cross):
            q = deltas[query]
            c = h if kv == "h" else deltas[kv]
            h = q + cross(q, c)
        return h


class SingleExpertFusion(nn.Module):
    """One expert (table 5 ablations): its delta passes through unchanged."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.level = level

    def forward(self, deltas: dict[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        return deltas[self.level]


class LACFusion(nn.Module):
    """Linear arithmetic composition: learned scalar weight per expert, f = sum_e w_e d_e."""

    def __init__(self, levels: tuple[str, ...]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.weights = nn.Parameter(torch.full((len(levels),), 1.0 / len(levels)))

    def forward(self, deltas: dict[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        return sum(w * deltas[lv] for w, lv in zip(self.weights, self.levels))


class LoRAHubFusion(nn.Module):
    """LoRAHub: fixed expert weights found by a gradient-free search (see ``lorahub_search``).

    The weights are a buffer, not a parameter: gradients never touch them.
    """

    def __init__(self, levels: tuple[str, ...]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.register_buffer("weights", torch.full((len(levels),), 1.0 / len(levels)))

    def forward(self, deltas: dict[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        return sum(w * deltas[lv] for w, lv in zip(self.weights, self.levels))


class MoLEFusion(nn.Module):
    """Mixture of LoRA experts: per-token softmax gate over experts from the site input.

    The gate is zero-initialised, so it starts uniform.
    """

    def __init__(self, dim: int, levels: tuple[str, ...]) -> None:
        super().__init__()
        self.levels = tuple(levels)
        self.gate = nn.Linear(dim, len(levels))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, deltas: dict[str, torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        g = self.gate(context).softmax(dim=-1)  # (B, N, E)
        return sum(g[..., i : i + 1] * deltas[lv] for i, lv in enumerate(self.levels))


def lorahub_search(
    fusions: list[LoRAHubFusion],
    objective,
    iterations: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1: float = 0.05,
) -> torch.Tensor:
    """LoRAHub's gradient-free composition search: one weight per expert, shared by every site.

    Nelder-Mead (SciPy) minimises ``objective() + l1 * |w|_1`` over the weights, clipped to
    ``bounds``, starting from the current weights; ``objective`` evaluates the network (e.g. its
    loss on a few labeled batches) with the weights in place and no gradients. The best weights
    found are left in ``fusions`` and returned (E,).
    """
    from scipy.optimize import minimize

    if not fusions:
        raise ValueError("no LoRAHub fusion modules to search")
    start = fusions[0].weights.detach().cpu().double().numpy()
    lo, hi = bounds
    best = {"value": float("inf"), "w": start.copy()}

    def set_weights(w) -> None:
        clipped = torch.as_tensor(w, dtype=torch.float32).clamp(lo, hi)
        for fusion in fusions:
            fusion.weights.copy_(clipped.to(fusion.weights.device))

    def cost(w) -> float:
        set_weights(w)
        with torch.no_grad():
            value = float(objective()) + l1 * float(abs(w.clip(lo, hi)).sum())
        if value < best["value"]:
            best.update(value=value, w=w.clip(lo, hi).copy())
        return value

    simplex = np.vstack([start, start + 0.5 * np.eye(len(start))])  # steps on the scale of the bounds
    options = {"maxfev": int(iterations), "xatol": 1e-3, "fatol": 1e-4, "initial_simplex": simplex}
    minimize(cost, start, method="Nelder-Mead", options=options)
    set_weights(best["w"])
    return fusions[0].weights.detach().clone()


FUSIONS = ("hl_attn", "lac", "lorahub", "mole")


def build_fusion(
    kind: str, dim: int, levels: tuple[str, ...], order: str = "2-1-1", width: int = 128, heads: int = 4
) -> nn.Module:
    """Fusion module for one site. A single level always gives :class:`SingleExpertFusion`."""
    levels = tuple(levels)
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels or len(set(levels)) != len(levels):
        raise ValueError(f"expert levels must be distinct names among {LEVELS}, got {levels}")
    if len(levels) == 1:
        return SingleExpertFusion(levels[0])
    if kind == "hl_attn":
        return HLAttn(dim, levels, order, width, heads)
    if kind == "lac":
        return LACFusion(levels)
    if kind == "lorahub":
        return LoRAHubFusion(levels)
    if kind == "mole":
        return MoLEFusion(dim, levels)
    raise ValueError(f"unknown fusion {kind!r}; choose one of {FUSIONS}")
