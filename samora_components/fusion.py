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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, get_rel_pos
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
    "gates_at",
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

    The fused kernel on GPUs; on CPUs the explicit product and softmax, whose backward pass is much
    faster there than the fused kernel's.
    """
    if q.is_cuda:
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


@contextmanager
def gates_at(sites: Sequence["ExpertAttention"], value: float) -> Iterator[None]:
    """Temporarily set the gate of every SAMora site to ``value`` (restored on exit)."""
    saved = [site.gate.detach().clone() for site in sites]
    try:
        with torch.no_grad():
            for site in sites:
                site.gate.fill_(value)
        yield
    finally:
        with torch.no_grad():
            for site, gate in zip(sites, saved):
                site.gate.copy_(gate)


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

    The base and the E expert variants share one ``qkv`` projection of the input; the experts add
    their low-rank q/v updates (two small matmuls for all experts), the keys are shared, and the
    V = 1 + E attention outputs go through the output projection in one matmul. The attention core
    runs with one of two kernels, which give the same result:

    * ``"fused"``: one ``scaled_dot_product_attention`` call over all variants (SAM's relative
      position bias folded into extra q/k channels); best where a fused kernel is fast (GPUs).
    * ``"chunked"``: projections over the whole batch, but each variant's queries/values and its
      attention (SAM's own product, bias and softmax) a few images at a time, sized to stay in
      cache, written straight into the output projection's input; much faster on CPUs, where
      memory traffic rather than arithmetic limits the extra variants.
    * ``"auto"`` (default): ``fused`` on CUDA, ``chunked`` elsewhere.

    Args:
        base: the frozen attention module (its ``qkv``, ``proj`` and position terms are used).
        levels: expert levels, one :class:`LoRAExpert` each.
        fusion: a module from :func:`build_fusion`.
        rank: expert rank.
        kernel: ``"auto"``, ``"fused"`` or ``"chunked"``.
        gate_init: initial value of the gate γ. 0 starts stage 2 at the frozen encoder; a non-zero
            value is needed for experts that train in stage 2 ("scratch": B = 0 and γ = 0 give each
            other zero gradient). The authors' public code starts at 1.
        fusion_norm: LayerNorm on the fused delta before the gate (the authors' public code).
    """

    #: working set of one chunk of the ``chunked`` kernel (bytes): small enough to stay in cache
    #: for inference; larger when training, where every chunk adds autograd nodes
    chunk_bytes = 16 << 20
    chunk_bytes_training = 64 << 20

    def __init__(self, base: nn.Module, levels: tuple[str, ...], fusion: nn.Module, rank: int = 4, kernel: str = "auto",
                 gate_init: float = 0.0, fusion_norm: bool = False) -> None:
        super().__init__()
        if kernel not in ("auto", "fused", "chunked"):
            raise ValueError(f"kernel must be auto, fused or chunked, got {kernel!r}")
        self.base = base
        self.kernel = kernel
        self.vit = not hasattr(base, "key_dim")
        rows: QKVRows = qkv_rows(base)
        self.geometry = (rows.num_heads, rows.dq, rows.dv)
        self.levels = tuple(levels)
        self.experts = nn.ModuleDict(
            {lv: LoRAExpert(base.qkv.in_features, rows.q.numel(), rows.v.numel(), rank) for lv in self.levels}
        )
        self.fusion = fusion
        dim = base.qkv.in_features
        self.fusion_norm = nn.LayerNorm(dim) if fusion_norm else nn.Identity()
        self.gate = nn.Parameter(torch.full((), float(gate_init)))

    # -- attention cores: q (V, B, h, N, dq), k (B, h, N, dq), v (V, B, h, N, dv) -> (V, B, h, N, dv)
    def _bias(self, dtype: torch.dtype) -> torch.Tensor:
        """TinyViT's learned attention bias (h, N, N)."""
        base = self.base
        bias = base.attention_biases[:, base.attention_bias_idxs] if base.training or not hasattr(base, "ab") else base.ab
        return bias.to(dtype)

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

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        base = self.base
        nv, b, heads, n, dq = q.shape
        dv = v.shape[-1]
        q, v = q.reshape(nv * b, heads, n, dq), v.reshape(nv * b, heads, n, dv)
        mask, scale = None, base.scale
        if not self.vit:
            mask = self._bias(q.dtype)
        elif base.use_rel_pos:
            q_extra, k_extra = self._rel_pos_terms(q, hw)
            q = torch.cat([q * scale, q_extra], dim=-1)
            k = torch.cat([k, k_extra.expand(b, heads, -1, -1)], dim=-1)
            scale = 1.0
        k = k.unsqueeze(0).expand(nv, -1, -1, -1, -1).reshape(nv * b, heads, n, -1)
        if q.shape[-1] != dv:  # the fused kernels want equal q/k and v widths
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :dv]
        return out.view(nv, b, heads, n, dv)

    def _low_rank(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of every expert's q/v update: z (B, N, 2, E, r) = A u and the stacked B matrices."""
        experts = [self.experts[lv] for lv in self.levels]
        b, n, _ = u.shape
        z = F.linear(u, torch.cat([e.a_q for e in experts] + [e.a_v for e in experts]))
        z = z.view(b, n, 2, len(experts), experts[0].rank)
        return z[:, :, 0], z[:, :, 1], torch.stack([e.b_q for e in experts]), torch.stack([e.b_v for e in experts])

    def _fuse(self, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Projected variants (V, B, N, C) -> a0 + gate * fusion of the expert deltas."""
        a0 = out[0]
        deltas = {lv: out[i + 1] - a0 for i, lv in enumerate(self.levels)}
        return a0 + self.gate * self.fusion_norm(self.fusion(deltas, u))

    def _site_fused(self, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """All variants in one fused attention call (tokens u (B, N, C) -> (B, N, C))."""
        base = self.base
        b, n, _ = u.shape
        heads, dq, dv = self.geometry
        nv = 1 + len(self.levels)
        q0, k, v0 = self._split(base.qkv(u))
        zq, zv, bq, bv = self._low_rank(u)
        bq, bv = bq.to(q0.dtype), bv.to(q0.dtype)
        q = torch.cat([q0.unsqueeze(0), q0 + torch.einsum("bner,eor->ebno", zq, bq)])
        v = torch.cat([v0.unsqueeze(0), v0 + torch.einsum("bner,eor->ebno", zv, bv)])
        q = q.view(nv, b, n, heads, dq).transpose(2, 3)  # (V, B, h, N, dq)
        v = v.view(nv, b, n, heads, dv).transpose(2, 3)
        k = k.reshape(b, n, heads, dq).transpose(1, 2)  # (B, h, N, dq), shared by every variant
        o = self._fused(q, k, v, hw)
        return self._fuse(base.proj(o.transpose(2, 3).reshape(nv, b, n, heads * dv)), u)

    def _site_chunked(self, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Projections over the whole batch; attention a few images at a time (so that a chunk stays
        in cache), written straight into the input of the one output projection.

        An expert's queries differ from the base queries by a rank-r term, q_e = q_0 + z_e B_e^T, so
        its logits are the base logits (SAM's product, bias and softmax inputs) plus a rank-r
        product ``z_e (B_e^T k^T)`` and, for SAM's decomposed position bias, the bias of that
        low-rank term: exact, and r/d of the cost of a full product per expert.
        """
        base = self.base
        b, n, c = u.shape
        heads, dq, dv = self.geometry
        nv, ne = 1 + len(self.levels), len(self.levels)
        q0, k, v0 = self._split(base.qkv(u))
        zq, zv, bq, bv = self._low_rank(u)  # zq (B, N, E, r), bq (E, nq, r)
        bq, bv = bq.to(q0.dtype), bv.to(q0.dtype)  # einsum is not autocast: match the activations
        rank = zq.shape[-1]
        bq_heads = bq.view(ne, heads, dq, rank)
        rel = self.vit and base.use_rel_pos
        if rel:  # the position tables seen through every expert's B: (E, h, H, H, r) and (E, h, W, W, r)
            rh = get_rel_pos(hw[0], hw[0], base.rel_pos_h)
            rw = get_rel_pos(hw[1], hw[1], base.rel_pos_w)
            th = torch.einsum("ehdr,ykd->ehykr", bq_heads, rh.to(bq.dtype)).to(zq.dtype)
            tw = torch.einsum("ehdr,xkd->ehxkr", bq_heads, rw.to(bq.dtype)).to(zq.dtype)
        budget = self.chunk_bytes_training if torch.is_grad_enabled() else self.chunk_bytes
        step = max(1, budget // (nv * (heads * n * n + 4 * n * c) * 4))
        attended = u.new_empty(nv, b, n, heads * dv) if not torch.is_grad_enabled() else None
        pieces = []
        for start in range(0, b, step):
            rows = slice(start, start + step)
            m = q0[rows].shape[0]
            qh = q0[rows].reshape(m, n, heads, dq).transpose(1, 2)  # (m, h, N, dq)
            kh = k[rows].reshape(m, n, heads, dq).transpose(1, 2)
            base_logits = (qh * base.scale) @ kh.transpose(-2, -1)  # (m, h, N, N)
            if rel:  # SAM's decomposed bias, on the unscaled queries
                base_logits = add_decomposed_rel_pos(
                    base_logits.view(m * heads, n, n), qh.reshape(m * heads, n, dq), base.rel_pos_h, base.rel_pos_w, hw, hw
                ).view(m, heads, n, n)
            elif not self.vit:  # TinyViT's learned bias
                base_logits = base_logits + self._bias(base_logits.dtype)
            # experts: (E, m, 1, N, r) @ (E, m, h, r, N) low-rank logit updates, added in place
            g = torch.einsum("ehdr,mhnd->emhrn", bq_heads, kh) * base.scale
            z = zq[rows].permute(2, 0, 1, 3).unsqueeze(2)
            logits = (z @ g).add_(base_logits)  # (E, m, h, N, N)
            if rel:
                zg = z.view(ne, m, hw[0], hw[1], rank)
                grid = logits.view(ne, m, heads, hw[0], hw[1], hw[0], hw[1])
                grid.add_(torch.einsum("emyxr,ehykr->emhyxk", zg, th)[..., None])
                grid.add_(torch.einsum("emyxr,ehxkr->emhyxk", zg, tw)[..., None, :])
            v0h = v0[rows].reshape(m, n, heads, dv).transpose(1, 2)
            ve = v0[rows] + torch.einsum("bner,eor->ebno", zv[rows], bv)  # (E, m, N, nv)
            veh = ve.view(ne, m, n, heads, dv).transpose(2, 3)
            o_base = (base_logits.softmax(dim=-1) @ v0h).transpose(1, 2).reshape(1, m, n, heads * dv)
            o_experts = (logits.softmax(dim=-1) @ veh).transpose(2, 3).reshape(ne, m, n, heads * dv)
            if attended is not None:
                attended[0, rows] = o_base[0]
                attended[1:, rows] = o_experts
            else:
                pieces.append(torch.cat([o_base, o_experts]))
        if attended is None:  # autograd: assemble instead of writing into a buffer
            attended = torch.cat(pieces, dim=1)
        return self._fuse(base.proj(attended), u)

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, N, h*d) from the fused projection: [q | k | v] for ViT, per head [q_h k_h v_h]
        for TinyViT (split as views; a row gather would cost an index_put in the backward pass)."""
        if self.vit:
            return qkv.chunk(3, dim=-1)
        heads, dq, dv = self.geometry
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, heads, -1).split([dq, dq, dv], dim=-1)
        return q.reshape(b, n, heads * dq), k.reshape(b, n, heads * dq), v.reshape(b, n, heads * dv)

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
        kernel = self.kernel if self.kernel != "auto" else ("fused" if x.is_cuda else "chunked")
        fused = self._site_fused(u, hw) if kernel == "fused" else self._site_chunked(u, hw)
        return fused.view(b, hh, ww, -1) if self.vit else fused
