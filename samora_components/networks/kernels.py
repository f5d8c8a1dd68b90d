"""Fast kernels of the SAMora site computation; each equals :meth:`ExpertAttention.reference`.

Both share one ``qkv`` projection of the site input between the base and the E expert variants:
the experts add their low-rank q/v updates (two small matmuls for all experts), the keys are
shared, and the V = 1 + E attention outputs go through the output projection in one matmul.

* :func:`fused_attention`: one ``scaled_dot_product_attention`` call over all variants (SAM's
  relative-position bias folded into extra q/k channels); best where a fused kernel is fast (GPUs).
* :func:`chunked_attention`: projections over the whole batch, attention a few images at a time,
  sized to stay in cache, written straight into the output projection's input; much faster on
  CPUs, where memory traffic rather than arithmetic limits the extra variants.

``site`` is the :class:`~samora_components.networks.expert_attention.ExpertAttention` being run;
``u`` its input (B, N, C) and ``hw`` the token grid (SAM ViT and Hiera; unused for TinyViT). At
Hiera's stage transitions the queries are pooled (``site.pool_queries``) to N' tokens and the output
is (B, N', C'); elsewhere N' = N and C' = C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos

if TYPE_CHECKING:  # annotations only: the site module imports this one
    from samora_components.networks.expert_attention import ExpertAttention

__all__ = ["fused_attention", "chunked_attention", "rel_pos_channels", "CHUNK_BYTES", "CHUNK_BYTES_TRAINING"]

#: working set of one chunk of :func:`chunked_attention` (bytes): small enough to stay in cache for
#: inference; larger when training, where every chunk adds autograd nodes
CHUNK_BYTES = 16 << 20
CHUNK_BYTES_TRAINING = 64 << 20


def rel_pos_channels(site: "ExpertAttention", q: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative-position bias written as extra q/k channels.

    The bias ``q_i . R_h[y_i - y_j] + q_i . R_w[x_i - x_j]`` equals the dot product of
    ``[rel_h(q_i), rel_w(q_i)]`` with the one-hot rows ``[e(y_j), e(x_j)]``, so appending those
    channels lets one fused attention kernel apply it without an (N, N) bias tensor.

    q: (..., N, dq) unscaled queries -> (q_extra (..., N, H + W), k_extra (N, H + W)).
    """
    hh, ww = hw
    rh = get_rel_pos(hh, hh, site.base.rel_pos_h)  # (H, H, dq)
    rw = get_rel_pos(ww, ww, site.base.rel_pos_w)  # (W, W, dq)
    qg = q.unflatten(-2, (hh, ww))  # (..., H, W, dq)
    rel_h = torch.einsum("...yxc,ykc->...yxk", qg, rh).flatten(-3, -2)  # (..., N, H)
    rel_w = torch.einsum("...yxc,xkc->...yxk", qg, rw).flatten(-3, -2)  # (..., N, W)
    ys = torch.arange(hh, device=q.device).repeat_interleave(ww)
    xs = torch.arange(ww, device=q.device).repeat(hh)
    k_extra = torch.cat([F.one_hot(ys, hh), F.one_hot(xs, ww)], dim=-1).to(q.dtype)  # (N, H + W)
    return torch.cat([rel_h, rel_w], dim=-1), k_extra


def _variants(site: "ExpertAttention", u: torch.Tensor,
              hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and values of every variant, base first, and the shared keys:
    q (V, B, h, N', dq) (pooled at Hiera's stage transitions, each variant after its update),
    k (B, h, N, dq), v (V, B, h, N, dv)."""
    b, n, _ = u.shape
    heads, dq, dv = site.geometry
    nv = 1 + len(site.levels)
    q0, k, v0 = site.split_qkv(site.base.qkv(u))  # (B, N, h*dq), (B, N, h*dq), (B, N, h*dv)
    zq, zv, bq, bv = site.low_rank_inputs(u)  # (B, N, E, r), (E, h*d, r)
    bq, bv = bq.to(q0.dtype), bv.to(q0.dtype)  # einsum is not autocast: match the activations
    q = torch.cat([q0.unsqueeze(0), q0 + torch.einsum("bner,eor->ebno", zq, bq)])  # (V, B, N, h*dq)
    v = torch.cat([v0.unsqueeze(0), v0 + torch.einsum("bner,eor->ebno", zv, bv)])  # (V, B, N, h*dv)
    q = site.pool_queries(q.flatten(0, 1), hw).unflatten(0, (nv, b))  # (V, B, N', h*dq)
    q = q.view(nv, b, q.shape[2], heads, dq).transpose(2, 3)
    v = v.view(nv, b, n, heads, dv).transpose(2, 3)
    k = k.reshape(b, n, heads, dq).transpose(1, 2)
    return q, k, v


def fused_attention(site: "ExpertAttention", u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """All variants in one ``scaled_dot_product_attention`` call: u (B, N, C) -> (B, N', C')."""
    base = site.base
    b, n, _ = u.shape
    q, k, v = _variants(site, u, hw)
    nv, _, heads, nq, dq = q.shape
    dv = v.shape[-1]
    q, v = q.reshape(nv * b, heads, nq, dq), v.reshape(nv * b, heads, n, dv)
    mask, scale = None, site.scale
    if site.layout == "tinyvit":
        mask = site.learned_bias(q.dtype)  # (h, N, N)
    elif site.rel_pos:
        q_extra, k_extra = rel_pos_channels(site, q, hw)
        q = torch.cat([q * scale, q_extra], dim=-1)
        k = torch.cat([k, k_extra.expand(b, heads, -1, -1)], dim=-1)
        scale = 1.0
    k = k.unsqueeze(0).expand(nv, -1, -1, -1, -1).reshape(nv * b, heads, n, -1)
    if q.shape[-1] != dv:  # the fused kernels want equal q/k and v widths
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :dv]  # (V*B, h, N', dv)
    out = out.view(nv, b, heads, nq, dv).transpose(2, 3).reshape(nv, b, nq, heads * dv)
    return site.combine(base.proj(out), u)


def chunked_attention(site: "ExpertAttention", u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Projections over the whole batch; attention a few images at a time (so that a chunk stays in
    cache), written straight into the input of the one output projection: u (B, N, C) -> (B, N, C).

    An expert's queries differ from the base queries by a rank-r term, q_e = q_0 + z_e B_e^T, so its
    logits are the base logits (SAM's product, bias and softmax inputs) plus a rank-r product
    ``z_e (B_e^T k^T)`` and, for SAM's decomposed position bias, the bias of that low-rank term:
    exact, and r/d of the cost of a full product per expert. That does not hold where Hiera pools
    the queries (a max-pool of q_0 + z_e B_e^T is not q_0's pool plus a low-rank term): those sites
    run :func:`_chunked_pooled`.
    """
    if site.q_pool is not None:
        return _chunked_pooled(site, u, hw)
    base = site.base
    b, n, c = u.shape
    heads, dq, dv = site.geometry
    nv, ne = 1 + len(site.levels), len(site.levels)
    q0, k, v0 = site.split_qkv(base.qkv(u))
    zq, zv, bq, bv = site.low_rank_inputs(u)  # zq (B, N, E, r), bq (E, h*dq, r)
    bq, bv = bq.to(q0.dtype), bv.to(q0.dtype)  # einsum is not autocast: match the activations
    rank = zq.shape[-1]
    bq_heads = bq.view(ne, heads, dq, rank)
    if site.rel_pos:  # the position tables seen through every expert's B: (E, h, H, H, r), (E, h, W, W, r)
        rh = get_rel_pos(hw[0], hw[0], base.rel_pos_h)
        rw = get_rel_pos(hw[1], hw[1], base.rel_pos_w)
        th = torch.einsum("ehdr,ykd->ehykr", bq_heads, rh.to(bq.dtype)).to(zq.dtype)
        tw = torch.einsum("ehdr,xkd->ehxkr", bq_heads, rw.to(bq.dtype)).to(zq.dtype)
        ys = torch.arange(hw[0], device=u.device).repeat_interleave(hw[1])
        xs = torch.arange(hw[1], device=u.device).repeat(hw[0])
        key_rows = torch.cat([F.one_hot(ys, hw[0]), F.one_hot(xs, hw[1])], dim=-1).T.to(q0.dtype)  # (H + W, N)
    budget = CHUNK_BYTES_TRAINING if torch.is_grad_enabled() else CHUNK_BYTES
    step = max(1, budget // (nv * (heads * n * n + 4 * n * c) * 4))
    attended = u.new_empty(nv, b, n, heads * dv) if not torch.is_grad_enabled() else None
    pieces = []
    for start in range(0, b, step):
        rows = slice(start, start + step)
        m = q0[rows].shape[0]
        qh = q0[rows].reshape(m, n, heads, dq).transpose(1, 2)  # (m, h, N, dq)
        kh = k[rows].reshape(m, n, heads, dq).transpose(1, 2)
        base_logits = site.add_position_bias((qh * site.scale) @ kh.transpose(-2, -1), qh, hw)  # (m, h, N, N)
        # experts: (E, m, 1, N, r) @ (E, m, h, r, N) low-rank logit updates, added in place
        g = torch.einsum("ehdr,mhnd->emhrn", bq_heads, kh) * site.scale
        z = zq[rows].permute(2, 0, 1, 3).unsqueeze(2)
        if site.rel_pos:  # the position bias of the low-rank term as H + W extra channels of the same product
            zg = z.view(ne, m, hw[0], hw[1], rank)
            rel_h = torch.einsum("emyxr,ehykr->emhyxk", zg, th).reshape(ne, m, heads, n, hw[0])
            rel_w = torch.einsum("emyxr,ehxkr->emhyxk", zg, tw).reshape(ne, m, heads, n, hw[1])
            z = torch.cat([z.expand(-1, -1, heads, -1, -1), rel_h.to(z.dtype), rel_w.to(z.dtype)], dim=-1)
            g = torch.cat([g, key_rows.to(g.dtype).expand(ne, m, heads, -1, -1)], dim=-2)  # (E, m, h, r + H + W, N)
        logits = (z @ g).add_(base_logits)  # (E, m, h, N, N)
        v0h = v0[rows].reshape(m, n, heads, dv).transpose(1, 2)
        ve = v0[rows] + torch.einsum("bner,eor->ebno", zv[rows], bv)  # (E, m, N, h*dv)
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
    return site.combine(base.proj(attended), u)


def _chunked_pooled(site: "ExpertAttention", u: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """:func:`chunked_attention` at a site that pools its queries (Hiera's stage transitions): every
    variant's pooled queries are formed in full, then attention runs a few images at a time with
    the explicit product and softmax (no position term in Hiera): u (B, N, C) -> (B, N', C')."""
    base = site.base
    b, n, c = u.shape
    q, k, v = _variants(site, u, hw)  # (V, B, h, N', dq), (B, h, N, dq), (V, B, h, N, dv)
    nv, _, heads, nq, _ = q.shape
    dv = v.shape[-1]
    budget = CHUNK_BYTES_TRAINING if torch.is_grad_enabled() else CHUNK_BYTES
    step = max(1, budget // (nv * (heads * nq * n + 4 * n * c) * 4))
    pieces = []
    for start in range(0, b, step):
        rows = slice(start, start + step)
        logits = (q[:, rows] * site.scale) @ k[rows].transpose(-2, -1)  # (V, m, h, N', N)
        pieces.append(logits.softmax(dim=-1) @ v[:, rows])  # (V, m, h, N', dv)
    out = torch.cat(pieces, dim=1).transpose(2, 3).reshape(nv, b, nq, heads * dv)
    return site.combine(base.proj(out), u)
