"""The SAMora block at one attention site: base attention plus expert deltas, fused (SPEC §4).

For an attention site with normalised input ``u`` (one window, or the whole grid for global blocks)::

    a0  = Attn_θ(u)                        # frozen base attention
    d_e = Attn_{θ+Δe}(u) - a0              # e in the configured expert levels
    f   = Fusion({d_e}, u)                 # HL-Attn (default), LAC, LoRAHub or MoLE
    out = a0 + γ · f                       # γ learnable, 0 at start

:class:`ExpertAttention` replaces the site's attention module, so the block around it (window
partition, residual, MLP) is SAM's own code: the block computes ``x' = x + a0 + γ·f`` and
``x' + MLP(LN(x'))``. :meth:`ExpertAttention.reference` is the plain computation, one variant at a
time; :mod:`samora_components.networks.kernels` holds two faster kernels that give the same result.

SAM2's Hiera is multi-scale: the first block of stages 2-4 (a *stage transition*) pools its queries
(``q_pool``, a 2 x 2 max-pool of the projected queries inside each window) and widens the tokens
(``qkv``: dim -> 3 * dim_out, ``proj``: dim_out -> dim_out); its shortcut is pooled and projected by
the block itself. At such a site every variant pools its own queries after the expert's low-rank
update (``pool(q0 + Δq_e)``, not ``pool(q0) + pool(Δq_e)``: the max-pool is not linear), keys and
values keep the full window, so ``a0`` and each ``d_e`` have the pooled grid and width dim_out. The
fusion works at that output width (the network builds it with ``attn.proj.out_features``); its
context, the site input ``u`` elsewhere, is ``a0`` there, the only tensor at the output's grid and
width (only MoLE's gate reads the context).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from sam2.modeling.backbones.hieradet import do_pool
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos
from torch import nn
from torch.nn.modules.utils import _pair

from samora_components.networks import kernels
from samora_components.networks.lora import ATTENTION_LAYOUTS, LoRAExpert, cache_key, qkv_rows

__all__ = ["ExpertAttention", "gates_at", "KERNELS"]

KERNELS = ("auto", "reference", "fused", "chunked")


class ExpertAttention(nn.Module):
    """Replaces one attention module of a SAM encoder by the SAMora site computation.

    Accepts and returns what the replaced module does: (B, H, W, C) for SAM's ViT attention
    (layout ``"sam_vit"``), (B, N, C) for TinyViT's, which normalises its input itself
    (``"tinyvit"``), (B, H, W, C) -> (B, H', W', C') for SAM2's Hiera (``"hiera"``; H' = H / 2 and
    C' = dim_out at stage transitions, see the module docstring). The backbone declares the layout
    (:attr:`Backbone.attention_layout`).

    Args:
        base: the frozen attention module (its ``qkv``, ``proj``, position terms and, for Hiera,
            ``q_pool`` are used).
        layout: ``"sam_vit"``, ``"tinyvit"`` or ``"hiera"``.
        levels: expert levels, one :class:`LoRAExpert` each.
        fusion: a module from :func:`samora_components.networks.fusion.build_fusion`.
        rank: expert rank.
        kernel: ``"reference"`` (plain, one variant at a time), ``"fused"`` (one
            ``scaled_dot_product_attention`` call for all variants; fast on GPUs), ``"chunked"``
            (a few images at a time, sized to stay in cache; fast on CPUs) or ``"auto"`` (fused on
            CUDA, chunked elsewhere). All give the same result.
        gate_init: initial value of the gate γ. 0 starts stage 2 at the frozen encoder; a non-zero
            value is needed for experts that train in stage 2 ("scratch": B = 0 and γ = 0 give each
            other zero gradient). The authors' public code starts at 1.
        fusion_norm: LayerNorm on the fused delta before the gate (the authors' public code).
    """

    def __init__(self, base: nn.Module, layout: str, levels: tuple[str, ...], fusion: nn.Module, rank: int = 4,
                 kernel: str = "auto", gate_init: float = 0.0, fusion_norm: bool = False) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention layout must be one of {', '.join(ATTENTION_LAYOUTS)}, got {layout!r}")
        self.base = base
        self.layout = layout
        self.kernel = kernel
        rows = qkv_rows(base, layout)
        self.geometry = (rows.num_heads, rows.dq, rows.dv)
        #: the softmax temperature: SAM's and TinyViT's attribute; Hiera uses SDPA's default
        self.scale = float(base.scale) if layout != "hiera" else rows.dq**-0.5
        self.levels = tuple(levels)
        dim = base.qkv.in_features
        #: whether the output differs from the input in grid or width (Hiera's stage transitions)
        self.transition = self.q_pool is not None or base.proj.out_features != dim
        self.experts = nn.ModuleDict({lv: LoRAExpert(dim, rows.q.numel(), rows.v.numel(), rank) for lv in self.levels})
        self.fusion = fusion
        self.fusion_norm = nn.LayerNorm(base.proj.out_features) if fusion_norm else nn.Identity()
        self.gate = nn.Parameter(torch.full((), float(gate_init)))

    @property
    def q_pool(self) -> nn.Module | None:
        """Hiera's query pooling (a 2 x 2 max-pool at stage transitions), else None."""
        return getattr(self.base, "q_pool", None) if self.layout == "hiera" else None

    @property
    def rel_pos(self) -> bool:
        """Whether the site adds SAM's decomposed relative-position bias."""
        return self.layout == "sam_vit" and bool(self.base.use_rel_pos)

    # -- pieces shared by the reference path and the kernels ------------------------------------
    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projection (B, N, 3C') -> q, k (B, N, h*dq) and v (B, N, h*dv), head-major.

        ``[q | k | v]`` for SAM's ViT and Hiera, per head ``[q_h k_h v_h]`` for TinyViT (split as
        views; a row gather would cost an index_put in the backward pass)."""
        if self.layout != "tinyvit":
            return qkv.chunk(3, dim=-1)
        heads, dq, dv = self.geometry
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, heads, -1).split([dq, dq, dv], dim=-1)
        return q.reshape(b, n, heads * dq), k.reshape(b, n, heads * dq), v.reshape(b, n, heads * dv)

    def out_grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The token grid of the site's output for an input grid ``hw``: Hiera's query pooling
        (max-pool without padding, floor mode) shrinks it, every other site keeps it."""
        pool = self.q_pool
        if pool is None:
            return hw
        kernel, stride = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        return tuple((n - k) // s + 1 for n, k, s in zip(hw, kernel, stride))

    def pool_queries(self, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Hiera's query pooling: q (B, N, h*dq) on the grid ``hw`` -> (B, N', h*dq) on
        :meth:`out_grid` (SAM2's ``do_pool``, which pools all heads' channels alike); unchanged at
        sites without pooling."""
        if self.q_pool is None:
            return q
        b = q.shape[0]
        pooled = do_pool(q.reshape(b, hw[0], hw[1], -1), self.q_pool)  # (B, H', W', h*dq)
        return pooled.reshape(b, -1, q.shape[-1])

    def learned_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """TinyViT's learned attention bias (h, N, N) (its cached copy in eval mode)."""
        base = self.base
        cached = getattr(base, "ab", None)
        bias = base.attention_biases[:, base.attention_bias_idxs] if base.training or cached is None else cached
        return bias.to(dtype)

    def add_position_bias(self, logits: torch.Tensor, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Logits (B, h, N, N) plus the site's position term: SAM's decomposed relative-position bias
        (from the unscaled queries q (B, h, N, dq)) or TinyViT's learned bias."""
        if self.layout == "tinyvit":
            return logits + self.learned_bias(logits.dtype)
        if not self.rel_pos:
            return logits
        b, heads, n, dq = q.shape
        flat = add_decomposed_rel_pos(logits.reshape(b * heads, n, n), q.reshape(b * heads, n, dq),
                                      self.base.rel_pos_h, self.base.rel_pos_w, hw, hw)
        return flat.view(b, heads, n, n)

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All experts' A matrices in one (2 E r, C) weight ([A_q of each, A_v of each]) and their B
        matrices stacked, (E, h*dq, r) and (E, h*dv, r). Experts are frozen after stage 1: without
        gradients the stacks are kept until an expert weight changes (a load, a device move)."""
        experts = [self.experts[lv] for lv in self.levels]
        key = None if torch.is_grad_enabled() else cache_key([p for e in experts for p in e.parameters()])
        if key is None:
            self._stacked = None
            return self._stack(experts)
        if getattr(self, "_stacked", None) is None or self._stacked[0] != key:
            self._stacked = (key, self._stack(experts))
        return self._stacked[1]

    def train(self, mode: bool = True) -> "ExpertAttention":
        self._stacked = None  # also for optimizers that update in place without a version bump
        return super().train(mode)

    @staticmethod
    def _stack(experts: list[LoRAExpert]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.cat([e.a_q for e in experts] + [e.a_v for e in experts])
        return a, torch.stack([e.b_q for e in experts]), torch.stack([e.b_v for e in experts])

    def low_rank_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every expert's rank-r inputs zq, zv (B, N, E, r) = A u, and the stacked B matrices
        bq (E, h*dq, r), bv (E, h*dv, r): expert e's q update is ``zq[..., e, :] @ bq[e].T``."""
        a, bq, bv = self.stacked_experts()
        b, n, _ = u.shape
        z = torch.nn.functional.linear(u, a).view(b, n, 2, len(self.levels), a.shape[0] // (2 * len(self.levels)))
        return z[:, :, 0], z[:, :, 1], bq, bv

    def combine(self, variants: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Projected attention outputs (1 + E, B, N', C'), base first -> a0 + γ · Fusion({d_e}, context).

        The context is the site input u (B, N, C) where it has the output's shape, a0 at Hiera's
        stage transitions (N' < N, C' != C)."""
        a0 = variants[0]
        deltas = {lv: variants[i + 1] - a0 for i, lv in enumerate(self.levels)}
        context = a0 if self.transition else u
        return a0 + self.gate * self.fusion_norm(self.fusion(deltas, context))

    # -- the computation ------------------------------------------------------------------------
    def reference(self, u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The plain computation, written like SAM's ``Attention.forward``, one variant at a time.

        u: (B, N, C) site input (normalised for TinyViT), hw: the token grid (SAM ViT, Hiera)
        -> (B, N', C'): N' = N and C' = C except at Hiera's stage transitions.
        """
        base = self.base
        b, n, _ = u.shape
        heads, dq, dv = self.geometry
        q0, k, v0 = self.split_qkv(base.qkv(u))  # (B, N, h*dq), (B, N, h*dq), (B, N, h*dv)
        k = k.view(b, n, heads, dq).transpose(1, 2)  # (B, h, N, dq), shared by every variant
        variants = []
        for expert in [None, *(self.experts[lv] for lv in self.levels)]:
            q, v = q0, v0
            if expert is not None:  # q and v rows of qkv(u) + B A u
                delta_q, delta_v = expert.deltas(u)  # (B, N, h*dq), (B, N, h*dv)
                q, v = q0 + delta_q.to(q0.dtype), v0 + delta_v.to(v0.dtype)
            q = self.pool_queries(q, hw)  # (B, N', h*dq): Hiera's stage transitions pool each variant
            nq = q.shape[1]
            q = q.view(b, nq, heads, dq).transpose(1, 2)  # (B, h, N', dq)
            v = v.view(b, n, heads, dv).transpose(1, 2)  # (B, h, N, dv)
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N', N)
            logits = self.add_position_bias(logits, q, hw)
            out = logits.softmax(dim=-1) @ v  # (B, h, N', dv)
            variants.append(base.proj(out.transpose(1, 2).reshape(b, nq, heads * dv)))  # (B, N', C')
        return self.combine(torch.stack(variants), u)  # (B, N', C')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) (SAM ViT) or (B, N, C) (TinyViT) -> the same shape; (B, H, W, C) ->
        (B, H', W', C') (Hiera, see :meth:`out_grid`)."""
        if self.layout != "tinyvit":
            b, hh, ww, c = x.shape
            u, hw = x.reshape(b, hh * ww, c), (hh, ww)  # (B, N, C)
        else:
            u, hw = self.base.norm(x), (0, 0)  # (B, N, C)
        kernel = self.kernel if self.kernel != "auto" else ("fused" if x.is_cuda else "chunked")
        if kernel == "fused":
            out = kernels.fused_attention(self, u, hw)
        elif kernel == "chunked":
            out = kernels.chunked_attention(self, u, hw)
        else:
            out = self.reference(u, hw)
        return out.view(b, *self.out_grid(hw), -1) if self.layout != "tinyvit" else out


@contextmanager
def gates_at(sites: Sequence[ExpertAttention], value: float) -> Iterator[None]:
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
