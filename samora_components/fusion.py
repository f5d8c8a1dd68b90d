"""The SAMora block: base attention plus expert deltas, fused by HL-Attn or a baseline (SPEC §4).

For an attention site with normalised input ``u`` (one window, or the whole grid for global blocks)::

    a0  = Attn_θ(u)                        # frozen base attention
    d_e = Attn_{θ+Δe}(u) - a0              # e in the configured expert levels
    f   = Fusion({d_e}, u)                 # HL-Attn (default), LAC, LoRAHub or MoLE
    out = a0 + γ · f                       # γ learnable, 0 at start

:class:`ExpertAttention` replaces the site's attention module, so the block around it (window
partition, residual, MLP) is SAM's own code: the block computes ``x' = x + a0 + γ·f`` and
``x' + MLP(LN(x'))``. The base and expert variants share one qkv projection of ``u``; the experts
add their low-rank q/v updates and the V = 1 + E attention variants run as one batched product
against the shared keys.

HL-Attn fuses sequentially with cross-attention in a bottleneck width (default 128, 4 heads)::

    h1 = d_a + CA(LN(d_a), LN(d_b))        # step 1: the two levels fused first
    f  = d_c + CA(LN(d_c), LN(h1))         # step 2: the level fused last

The fusion order is the paper's notation over (image, patch, pixel): ``"2-1-1"`` fuses the image
level last (default), ``"1-2-1"`` the patch level, ``"1-1-2"`` the pixel level. Within step 1 the
higher level (image > patch > pixel) is the query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from .lora import LEVELS, LoRAExpert, QKVRows, qkv_rows

__all__ = [
    "CrossAttention",
    "HLAttn",
    "LACFusion",
    "LoRAHubFusion",
    "MoLEFusion",
    "SingleExpertFusion",
    "ExpertAttention",
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


class CrossAttention(nn.Module):
    """Multi-head cross-attention in a bottleneck width.

    (B, N, C) queries and (B, M, C) keys/values -> (B, N, C). Both inputs are layer-normalised;
    q/k/v project C -> width, the output projects width -> C.
    """

    def __init__(self, dim: int, width: int = 128, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"bottleneck width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, width)
        self.k = nn.Linear(dim, width)
        self.v = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = query.shape
        m = context.shape[1]
        kv = self.norm_kv(context)
        q = self.q(self.norm_q(query)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(kv).view(b, m, self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(b, m, self.heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
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
        for (query, kv), attend in zip(self.steps, self.cross):
            q = deltas[query]
            c = h if kv == "h" else deltas[kv]
            h = q + attend(q, c)
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

    import numpy as np

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


class ExpertAttention(nn.Module):
    """Replaces one attention module of a SAM encoder by the SAMora site computation.

    Accepts and returns what the replaced module does: (B, H, W, C) for SAM's ViT attention,
    (B, N, C) for TinyViT's (which normalises its input itself).

    Args:
        base: the frozen attention module (its ``qkv``, ``proj`` and position terms are used).
        levels: expert levels, one :class:`LoRAExpert` each.
        fusion: a module from :func:`build_fusion`.
        rank: expert rank.
    """

    def __init__(self, base: nn.Module, levels: tuple[str, ...], fusion: nn.Module, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.vit = not hasattr(base, "key_dim")
        rows: QKVRows = qkv_rows(base)
        self.geometry = (rows.num_heads, rows.dq, rows.dv)
        self.register_buffer("q_rows", rows.q, persistent=False)
        self.register_buffer("k_rows", rows.k, persistent=False)
        self.register_buffer("v_rows", rows.v, persistent=False)
        self.levels = tuple(levels)
        self.experts = nn.ModuleDict(
            {lv: LoRAExpert(base.qkv.in_features, rows.q.numel(), rows.v.numel(), rank) for lv in self.levels}
        )
        self.fusion = fusion
        self.gate = nn.Parameter(torch.zeros(()))

    def _rel_pos_terms(self, q: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's decomposed relative-position bias written as extra q/k channels.

        The bias ``q_i . R_h[y_i - y_j] + q_i . R_w[x_i - x_j]`` equals the dot product of
        ``[rel_h(q_i), rel_w(q_i)]`` with the one-hot rows ``[e(y_j), e(x_j)]``, so appending those
        channels lets one fused attention kernel apply it without an (N, N) bias tensor.

        q: (..., N, dq) unscaled queries -> (q_extra (..., N, H + W), k_extra (N, H + W)).
        """
        base = self.base
        hh, ww = hw
        rh = get_rel_pos(hh, hh, base.rel_pos_h)  # (H, H, dq)
        rw = get_rel_pos(ww, ww, base.rel_pos_w)  # (W, W, dq)
        qg = q.unflatten(-2, (hh, ww))
        rel_h = torch.einsum("...yxc,ykc->...yxk", qg, rh).flatten(-3, -2)
        rel_w = torch.einsum("...yxc,xkc->...yxk", qg, rw).flatten(-3, -2)
        ys = torch.arange(hh, device=q.device).repeat_interleave(ww)
        xs = torch.arange(ww, device=q.device).repeat(hh)
        k_extra = torch.cat([F.one_hot(ys, hh), F.one_hot(xs, ww)], dim=-1).to(q.dtype)
        return torch.cat([rel_h, rel_w], dim=-1), k_extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.vit:
            b, hh, ww, c = x.shape
            u = x.reshape(b, hh * ww, c)
            hw = (hh, ww)
        else:
            u = base.norm(x)
            b, _, c = u.shape
            hw = (0, 0)
        n = u.shape[1]
        heads, dq, dv = self.geometry
        nv = 1 + len(self.levels)
        qkv = base.qkv(u)
        if self.vit:  # [q | k | v]: views, no gather
            q0, k, v0 = qkv.chunk(3, dim=-1)
        else:
            q0, k, v0 = qkv[..., self.q_rows], qkv[..., self.k_rows], qkv[..., self.v_rows]
        # all experts' low-rank updates in two small matmuls: (E, B, N, nq) and (E, B, N, nv)
        experts = [self.experts[lv] for lv in self.levels]
        rank = experts[0].rank
        z = F.linear(u, torch.cat([e.a_q for e in experts] + [e.a_v for e in experts]))
        z = z.view(b, n, 2, len(experts), rank)
        dq_all = torch.einsum("bner,eor->ebno", z[:, :, 0], torch.stack([e.b_q for e in experts]))
        dv_all = torch.einsum("bner,eor->ebno", z[:, :, 1], torch.stack([e.b_v for e in experts]))
        q = torch.cat([q0.unsqueeze(0), q0 + dq_all]).view(nv * b, n, heads, dq).transpose(1, 2)  # (V*B, h, N, dq)
        vv = torch.cat([v0.unsqueeze(0), v0 + dv_all]).view(nv * b, n, heads, dv).transpose(1, 2)
        k = k.view(b, n, heads, dq).transpose(1, 2)  # shared by every variant
        mask, scale = None, base.scale
        if not self.vit:
            mask = base.attention_biases[:, base.attention_bias_idxs] if base.training or not hasattr(base, "ab") else base.ab
            mask = mask.to(q.dtype)
        elif base.use_rel_pos:
            q_extra, k_extra = self._rel_pos_terms(q, hw)
            q = torch.cat([q * scale, q_extra], dim=-1)
            k = torch.cat([k, k_extra.expand(b, heads, -1, -1)], dim=-1)
            scale = 1.0
        k = k.unsqueeze(0).expand(nv, -1, -1, -1, -1).reshape(nv * b, heads, n, -1)
        if q.shape[-1] != dv:  # the fused attention kernels want equal q/k and v widths
            vv = F.pad(vv, (0, q.shape[-1] - dv))
        o = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=scale)[..., :dv]
        o = o.transpose(1, 2).reshape(nv, b, n, heads * dv)
        out = base.proj(o)  # (V, B, N, C)
        a0 = out[0]
        deltas = {lv: out[i + 1] - a0 for i, lv in enumerate(self.levels)}
        fused = a0 + self.gate * self.fusion(deltas, u)
        return fused.view(b, hh, ww, -1) if self.vit else fused
