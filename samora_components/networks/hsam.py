"""H-SAM's two-stage hierarchical decoder (H-SAM paper §3.1-3.4; SPEC §5), prompt-free.

Stage 1 is SAM's mask decoder exactly as :class:`~samora_components.networks.decoders.PromptFreeDecoder`
runs it; its class probabilities are the *prior* that guides stage 2:

```
embedding (B,E,h,w) ─► stage 1 (PromptFreeDecoder) ─► prior logits (B,C,4h,4w)
   │                        │ mask feature = tokens·src (B,C,h,w)   │ skips (B,E/4,2h,2w), (B,E/8,4h,4w)
   │                        ▼                                       │
   └─(+ dense prompt)─► CMAttn: x + x ⊙ gate(P + class-balanced noise)   (§3.2)
                            ▼                                       │
      two-way transformer, cross-attention maps ⊙ prior probability (§3.3)
                            ▼                                       ▼
      hierarchical pixel decoder: SAM upscaling + stage-1 skips ─► up to the input resolution (§3.4)
                            ▼
                   stage-2 logits (B,C,H2,W2)
```

Readings of the paper where it leaves room (each one written where it is implemented):

* **CMAttn** (§3.2, fig. 3): the mask feature P is the stage-1 mask-token outputs multiplied with
  the transformer's image output (B, C, h, w), normalised by a softmax over the classes. Each class
  is one token whose features are the positions of a fixed ``grid x grid`` map (the 14 x 14 grid of
  ViT-B at 224, to which other grids are pooled), as in the public code. After one self-attention
  layer (post-norm, with an MLP) a linear layer compresses the C classes to one map; a **sigmoid**
  turns it into the gate of the Hadamard product, and a residual keeps the embedding:
  ``x + x ⊙ σ(map)``. The public code applies a softmax over that singleton channel, which is 1
  everywhere (the gate is constant and ``x + x ⊙ 1 = 2x``); ``cmattn_as_coded=True`` reproduces it.
* **Noise** (eq. 1, training only): Gaussian noise is added to P at every position, with the
  variance of the class found there (the ground truth when ``labels`` are given, else the stage-1
  prediction), inversely proportional to that class's frequency: either a per-class list of standard
  deviations computed offline (``noise_std=[...]``, as the paper stores ``var``) or, with a number,
  ``std_c = noise_std * sqrt(f_min / f_c)`` from the class frequencies of the batch (the rarest class
  present gets ``noise_std``; 0.35 is the largest value of the public code's list).
* **Learnable mask cross-attention** (eq. 3): both cross-attentions of every two-way block multiply
  their softmax attention map by the stage-1 class probability, averaged down to the embedding grid
  (token c <-> class c); the map is not renormalised and the prior keeps its gradient. Stage 2 has
  exactly C tokens (no IoU token), so token c always meets class c's probability.
* **Hierarchical pixel decoder** (§3.4): stage 2's SAM-shaped upscaling path takes the stage-1 map at
  2h (residual 1x1 convolution of the concatenation, zero-initialised) and at 4h (concatenation),
  then transposed convolutions double the resolution ``upscale_steps`` times, to the model input
  (2 for SAM ViTs: 4h = S/4; 0 for LiteMedSAM, whose 4h is already S, where a 3x3 convolution fuses).
* **Inference** (§3.4 "final output ... average of probabilities", appendix A.1 "mean value of
  results from the two stages"; public code and SPEC: the mean of the two upsampled logit maps): in
  eval mode the decoder returns ``(stage1 + stage2) / 2`` on stage 2's grid (``ensemble="logits"``,
  default); ``ensemble="probabilities"`` returns ``log(mean of the two softmaxes)``, whose softmax is
  the average probability.

Stage 2's transformer and SAM-shaped upscaling start from the same checkpoint tensors as stage 1
(the public code starts stage 2 at random); its tokens, hypernetworks, CMAttn and skip layers are new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn

from samora_components.networks.decoders import PromptFreeDecoder

__all__ = [
    "ENSEMBLES",
    "ClassBalancedMaskAttention",
    "HSAMOutput",
    "HierarchicalDecoder",
    "HierarchicalPixelDecoder",
    "MaskCrossAttention",
    "MaskedTwoWayAttentionBlock",
    "MaskedTwoWayTransformer",
    "class_balanced_noise",
    "combine_stages",
]

#: how eval mode combines the two stages (see :func:`combine_stages`)
ENSEMBLES = ("logits", "probabilities")


class HSAMOutput(NamedTuple):
    """Both stages' class logits, (B, C, H1, W1) and (B, C, H2, W2) (training mode)."""

    stage1: torch.Tensor
    stage2: torch.Tensor


def combine_stages(output: HSAMOutput, ensemble: str = "logits") -> torch.Tensor:
    """One logit map (B, C, H2, W2) from both stages, stage 1 resized (bilinear) to stage 2's grid.

    ``"logits"``: the mean of the two logit maps (public H-SAM code, SPEC §5). ``"probabilities"``:
    ``log((softmax(s1) + softmax(s2)) / 2)``, whose softmax is the mean probability (H-SAM §3.4).
    """
    stage1, stage2 = output
    if stage1.shape[-2:] != stage2.shape[-2:]:
        stage1 = F.interpolate(stage1, size=stage2.shape[-2:], mode="bilinear", align_corners=False)
    if ensemble == "logits":
        return (stage1 + stage2) / 2
    if ensemble == "probabilities":
        return torch.logaddexp(stage1.log_softmax(1), stage2.log_softmax(1)) - math.log(2.0)
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {ENSEMBLES}")


def class_balanced_noise(probs: torch.Tensor, classes: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Class-balanced Gaussian noise for the mask feature (H-SAM eq. 1).

    Args:
        probs: the normalised mask feature P (B, C, h, w).
        classes: the class at each position (B, h, w), integers in [0, C).
        std: per-class standard deviations (C,) computed offline, or a number: the standard
            deviation of the rarest class present in the batch, the others scaled so that the
            variance is inversely proportional to the class frequency, ``std * sqrt(f_min / f_c)``.

    Returns:
        noise (B, C, h, w): at each position, N(0, std_c^2) in every channel, c the position's class.
    """
    num_classes = probs.shape[1]
    if isinstance(std, torch.Tensor):
        per_class = std.to(device=probs.device, dtype=torch.float32)
        if per_class.shape != (num_classes,):
            raise ValueError(f"expected {num_classes} per-class noise deviations, got {tuple(per_class.shape)}")
    else:
        counts = torch.bincount(classes.flatten(), minlength=num_classes).float()  # (C,)
        freq = counts / counts.sum()
        rarest = freq[counts > 0].min()
        per_class = torch.where(counts > 0, float(std) * torch.sqrt(rarest / freq.clamp_min(1e-12)), 0.0)
    sigma = per_class[classes].unsqueeze(1)  # (B, 1, h, w)
    return torch.randn_like(probs) * sigma.to(probs.dtype)


class ClassBalancedMaskAttention(nn.Module):
    """CMAttn (H-SAM §3.2): a mask-guided gate on the image embedding.

    The C classes are tokens whose features are the ``grid x grid`` positions of the mask feature;
    one self-attention layer (SAM's ``Attention``, post-norm, with an ``MLPBlock``) mixes them, a
    linear layer compresses the classes to one map, which gates the embedding: ``x + x ⊙ gate``.

    Args:
        num_classes: C.
        grid: side of the map the classes attend over (the mask feature is average-pooled or
            replicated to it; 14 = ViT-B at 224, as in the public code).
        num_heads: heads of the self-attention (must divide ``grid**2``).
        mlp_dim: hidden width of the MLP.
        noise_std: class-balanced noise (training only; see :func:`class_balanced_noise`): a number
            (from the batch's class frequencies) or C per-class deviations; 0 = none.
        as_coded: ``True``: the public code's gate, a softmax over the singleton channel of
            ``relu(map)``, which is 1 everywhere; ``False`` (default): ``sigmoid(map)``.

    Shapes: embedding (B, E, h, w), mask feature (B, C, h, w), classes (B, h, w) -> (B, E, h, w).
    """

    def __init__(
        self,
        num_classes: int,
        grid: int = 14,
        num_heads: int = 7,
        mlp_dim: int = 2048,
        noise_std: float | Sequence[float] = 0.35,
        as_coded: bool = False,
    ) -> None:
        super().__init__()
        dim = grid * grid
        if dim % num_heads:
            raise ValueError(f"CMAttn heads ({num_heads}) must divide grid**2 ({dim})")
        self.grid = grid
        self.as_coded = bool(as_coded)
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.compress = nn.Linear(num_classes, 1)
        if isinstance(noise_std, (int, float)):
            self.noise_std: float | None = float(noise_std)
            self.register_buffer("class_noise_std", None, persistent=False)
        else:
            self.noise_std = None
            self.register_buffer("class_noise_std", torch.tensor([float(s) for s in noise_std]), persistent=False)

    def gate(self, probs: torch.Tensor) -> torch.Tensor:
        """Normalised mask feature (B, C, h, w) -> gate (B, 1, h, w)."""
        b, c, h, w = probs.shape
        x = F.adaptive_avg_pool2d(probs, self.grid).flatten(2)  # (B, C, g*g): one token per class
        x = self.norm1(x + self.self_attn(q=x, k=x, v=x))
        x = self.norm2(x + self.mlp(x))
        m = self.compress(x.transpose(1, 2))  # (B, g*g, 1): classes compressed
        m = m.transpose(1, 2).reshape(b, 1, self.grid, self.grid)
        if self.as_coded:
            g = torch.softmax(F.relu(m), dim=1)  # a softmax over one channel: all ones
        else:
            g = torch.sigmoid(m)
        return F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)

    def forward(
        self, embedding: torch.Tensor, mask_feature: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        probs = torch.softmax(mask_feature, dim=1)  # P (B, C, h, w)
        noisy = self.class_noise_std is not None or bool(self.noise_std)
        if self.training and noisy:
            if classes is None:
                classes = probs.detach().argmax(1)
            std = self.class_noise_std if self.class_noise_std is not None else self.noise_std
            probs = probs + class_balanced_noise(probs, classes, std)
        return embedding + embedding * self.gate(probs)


class MaskCrossAttention(Attention):
    """SAM's ``Attention`` whose attention map may be multiplied by a weight in [0, 1]: learnable
    mask attention (H-SAM eq. 3), ``X = M ⊙ softmax(Q K^T) V + X`` (the residual is the caller's).

    Same parameters as SAM's ``Attention`` (its checkpoint tensors load). Without a weight it
    computes exactly what SAM's does.
    """

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (B, Nq, E), k and v (B, Nk, E), weight (B, Nq, Nk) or None -> (B, Nq, E)."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, heads, Nq, d)
        k = self._separate_heads(self.k_proj(k), self.num_heads)  # (B, heads, Nk, d)
        v = self._separate_heads(self.v_proj(v), self.num_heads)  # (B, heads, Nk, d)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, heads, Nq, Nk)
        if weight is not None:
            attn = attn * weight.unsqueeze(1).to(attn.dtype)  # not renormalised: unlikely regions fade
        return self.out_proj(self._recombine_heads(attn @ v))  # (B, Nq, E)


class MaskedTwoWayAttentionBlock(TwoWayAttentionBlock):
    """SAM's two-way block (token self-attention, token->image cross-attention, MLP, image->token
    cross-attention) whose two cross-attentions are :class:`MaskCrossAttention`, weighted by a
    class prior (B, C, N) for C tokens and N image positions."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, skip_first_layer_pe)
        self.cross_attn_token_to_image = MaskCrossAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.cross_attn_image_to_token = MaskCrossAttention(embedding_dim, num_heads, attention_downsample_rate)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, C, E), keys (B, N, E), their encodings, prior (B, C, N) -> queries, keys."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        # token c weighs the image positions by P(c)
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys, prior))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        weight = None if prior is None else prior.transpose(1, 2)  # (B, N, C): a position weighs token c by P(c)
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, weight))
        return queries, keys


class MaskedTwoWayTransformer(TwoWayTransformer):
    """SAM's ``TwoWayTransformer`` with :class:`MaskedTwoWayAttentionBlock` layers (same parameter
    names: SAM's decoder transformer weights load). The final token->image attention is SAM's.

    Shapes: image (B, E, h, w), encoding (B, E, h, w), tokens (B, C, E), prior (B, C, h*w)
    -> tokens (B, C, E), image tokens (B, h*w, E).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__(depth, embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate)
        self.layers = nn.ModuleList(
            MaskedTwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate,
                                       skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        prior: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, h*w, E)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, prior)
        q, k = queries + point_embedding, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys


def _sam_upscaling(embed_dim: int) -> nn.Sequential:
    """SAM's upscaling path: (B, E, h, w) -> (B, E/8, 4h, 4w) (same layout as ``MaskDecoder``'s)."""
    return nn.Sequential(
        nn.ConvTranspose2d(embed_dim, embed_dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(embed_dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(embed_dim // 4, embed_dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )


class HierarchicalPixelDecoder(nn.Module):
    """Stage 2's pixel decoder (H-SAM §3.4).

    ``output_upscaling`` is SAM's path (E -> E/4 at 2h -> E/8 at 4h). With ``hierarchical=True`` it
    takes stage 1's maps at 2h (``fuse_half``: residual 1x1 convolution of the concatenation,
    zero-initialised so that training starts on SAM's path) and at 4h (concatenation), then
    ``upscale_steps`` transposed convolutions (each with LayerNorm2d and GELU) double the resolution
    and halve the width: E/4 -> E/8 -> E/16 for two steps; with no step a 3x3 convolution fuses to
    E/8. With ``hierarchical=False`` it is SAM's pixel decoder alone.

    With ``high_res=True`` (SAM2 backbones) the encoder's high-resolution features join SAM's path as
    SAM2's own mask decoder adds them: ``conv_s1`` (1x1, E -> E/4) of the stride-8 map is added after
    the first transposed convolution (before its LayerNorm), ``conv_s0`` (1x1, E -> E/8) of the
    stride-4 map after the second (before its GELU); their weights come from the SAM2 checkpoint.

    Shapes: src (B, E, h, w), skips ((B, E/4, 2h, 2w), (B, E/8, 4h, 4w)), high-resolution maps
    ((B, E, 4h, 4w), (B, E, 2h, 2w)) -> (B, out_chans, 4h * 2**steps, 4w * 2**steps) (``steps = 0``
    when not hierarchical).
    """

    def __init__(self, embed_dim: int, upscale_steps: int = 2, hierarchical: bool = True, high_res: bool = False) -> None:
        super().__init__()
        self.high_res = bool(high_res)
        if self.high_res:
            self.conv_s0 = nn.Conv2d(embed_dim, embed_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(embed_dim, embed_dim // 4, kernel_size=1)
        if embed_dim % (8 * 2 ** max(0, upscale_steps - 1)):
            raise ValueError(
                f"embedding width {embed_dim} cannot be halved {upscale_steps} more times after SAM's path")
        self.hierarchical = bool(hierarchical)
        self.output_upscaling = _sam_upscaling(embed_dim)
        self.out_chans = embed_dim // 8
        if not self.hierarchical:
            self.upscale_steps = 0
            return
        self.upscale_steps = int(upscale_steps)
        self.fuse_half = nn.Conv2d(embed_dim // 2, embed_dim // 4, kernel_size=1)
        nn.init.zeros_(self.fuse_half.weight)
        nn.init.zeros_(self.fuse_half.bias)
        width, layers = embed_dim // 4, []  # the 4h concatenation: E/8 + E/8
        for _ in range(self.upscale_steps):
            layers += [nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2), LayerNorm2d(width // 2),
                       nn.GELU()]
            width //= 2
        if not layers:
            layers = [nn.Conv2d(width, width // 2, kernel_size=3, padding=1), LayerNorm2d(width // 2), nn.GELU()]
            width //= 2
        self.refine = nn.Sequential(*layers)
        self.out_chans = width

    def _sam_path(self, src: torch.Tensor, high_res: Sequence[torch.Tensor] | None,
                  skips: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """SAM's upscaling path, with the high-resolution maps and stage 1's 2h map when used."""
        up = self.output_upscaling
        if self.high_res and high_res is None:
            raise ValueError("this pixel decoder takes the encoder's high-resolution maps (SAM2 backbones)")
        half = up[0](src)  # (B, E/4, 2h, 2w)
        if self.high_res:
            half = half + self.conv_s1(high_res[1])
        half = up[2](up[1](half))
        if skips is not None:
            half = half + self.fuse_half(torch.cat([half, skips[0]], dim=1))
        full = up[3](half)  # (B, E/8, 4h, 4w)
        if self.high_res:
            full = full + self.conv_s0(high_res[0])
        return up[4](full)

    def forward(self, src: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor] | None = None,
                high_res: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if not self.hierarchical:
            return self._sam_path(src, high_res, None)
        if skips is None:
            raise ValueError("the hierarchical pixel decoder needs stage 1's upscaling maps")
        full = self._sam_path(src, high_res, skips)  # (B, E/8, 4h, 4w)
        return self.refine(torch.cat([full, skips[1]], dim=1))  # (B, out_chans, 4h*2^s, 4w*2^s)


class HierarchicalDecoder(nn.Module):
    """H-SAM's two-stage hierarchical decoder, prompt-free: embedding (B, E, h, w) -> class logits.

    Args:
        num_classes: C, background included.
        embed_dim: E (256 for SAM).
        prompt_encoder: the backbone's frozen prompt encoder (dense encoding and ``no_mask_embed``).
        depth / mlp_dim / num_heads: two-way transformer geometry, the same in both stages.
        weights: SAM checkpoint tensors of ``transformer.*`` and ``output_upscaling.*``; both stages
            start from them.
        upscale_steps: doublings of the hierarchical pixel decoder after 4h (2 for SAM ViTs, whose
            4h is a quarter of the input; 0 for LiteMedSAM).
        cmattn / mask_cross_attention / hierarchical_pixel_decoder: the three H-SAM parts (its
            table 4); a part switched off falls back to its plain counterpart (no gate; SAM's
            cross-attention; SAM's pixel decoder at 4h).
        cmattn_as_coded: the public code's constant CMAttn gate (see
            :class:`ClassBalancedMaskAttention`).
        cmattn_grid / cmattn_heads / cmattn_mlp_dim: CMAttn geometry.
        noise_std: CMAttn's class-balanced noise (training only).
        embedding_noise: the public code's extra training noise on stage 2's input embedding,
            ``N(0, (s * (max - min))^2)``, max and min over the batch (s = 0.2 there); 0 (default, the
            paper) = none.
        ensemble: how eval mode combines the stages (:func:`combine_stages`).
        high_res / high_res_weights: SAM2 backbones: the encoder's stride-4 and stride-8 features join
            stage 2's pixel decoder (:class:`HierarchicalPixelDecoder`), with SAM2's ``conv_s0`` /
            ``conv_s1`` weights (keys ``conv_s0.*``, ``conv_s1.*``) when given.

    Shapes: training mode: :class:`HSAMOutput` of stage 1 (B, C, 4h, 4w) and stage 2
    (B, C, 4h * 2**upscale_steps, ...), or (B, C, 4h, 4w) without the hierarchical pixel decoder;
    eval mode: one tensor on stage 2's grid. ``labels`` (B, [1,] H, W), any size, only guide the
    training noise.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        prompt_encoder: PromptEncoder,
        depth: int = 2,
        mlp_dim: int = 2048,
        num_heads: int = 8,
        weights: dict[str, torch.Tensor] | None = None,
        *,
        upscale_steps: int = 2,
        cmattn: bool = True,
        mask_cross_attention: bool = True,
        hierarchical_pixel_decoder: bool = True,
        cmattn_as_coded: bool = False,
        cmattn_grid: int = 14,
        cmattn_heads: int = 7,
        cmattn_mlp_dim: int = 2048,
        noise_std: float | Sequence[float] = 0.35,
        embedding_noise: float = 0.0,
        ensemble: str = "logits",
        high_res: bool = False,
        high_res_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if ensemble not in ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {ENSEMBLES}")
        if not isinstance(noise_std, (int, float)) and len(noise_std) != num_classes:
            raise ValueError(f"noise_std needs one deviation per class ({num_classes}), got {len(noise_std)}")
        self.num_classes = num_classes
        self.ensemble = ensemble
        self.embedding_noise = float(embedding_noise)
        self.stage1 = PromptFreeDecoder(num_classes, embed_dim, prompt_encoder, depth, mlp_dim, num_heads, weights)
        self.cmattn = (
            ClassBalancedMaskAttention(num_classes, cmattn_grid, cmattn_heads, cmattn_mlp_dim, noise_std,
                                       cmattn_as_coded)
            if cmattn else None
        )
        transformer = MaskedTwoWayTransformer if mask_cross_attention else TwoWayTransformer
        self.transformer = transformer(depth=depth, embedding_dim=embed_dim, num_heads=num_heads, mlp_dim=mlp_dim)
        self.mask_tokens = nn.Embedding(num_classes, embed_dim)
        self.pixel_decoder = HierarchicalPixelDecoder(embed_dim, upscale_steps, hierarchical_pixel_decoder, high_res)
        if high_res and high_res_weights:
            for name in ("conv_s0", "conv_s1"):
                part = {k[len(name) + 1:]: v for k, v in high_res_weights.items() if k.startswith(name + ".")}
                getattr(self.pixel_decoder, name).load_state_dict(part, strict=True)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(embed_dim, embed_dim, self.pixel_decoder.out_chans, 3) for _ in range(num_classes)
        )
        if weights:
            self._load_stage1_weights(weights)

    def _load_stage1_weights(self, weights: dict[str, torch.Tensor]) -> None:
        parts = (("transformer.", self.transformer), ("output_upscaling.", self.pixel_decoder.output_upscaling))
        for prefix, module in parts:
            part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if part:
                module.load_state_dict(part, strict=True)

    @property
    def prompt(self) -> PromptEncoder:
        """The frozen prompt encoder (held by stage 1)."""
        return self.stage1.prompt

    @property
    def mask_cross_attention(self) -> bool:
        return isinstance(self.transformer, MaskedTwoWayTransformer)

    def stages(self, embedding: torch.Tensor, labels: torch.Tensor | None = None,
               high_res: Sequence[torch.Tensor] | None = None) -> HSAMOutput:
        """(B, E, h, w) -> both stages' logits (training noise only in training mode); ``high_res``:
        the encoder's ((B, E, 4h, 4w), (B, E, 2h, 2w)) maps when the pixel decoder takes them."""
        b, e, h, w = embedding.shape
        first = self.stage1.features(embedding)  # logits (B, C, 4h, 4w)
        pe, dense = self.stage1.dense_inputs((h, w))
        pe, dense = pe.to(embedding), dense.to(embedding)

        x = embedding
        if self.training and self.embedding_noise:
            spread = (x.max() - x.min()).detach()  # over the batch, as the public code
            x = x + torch.randn_like(x) * self.embedding_noise * spread
        x = x + dense
        if self.cmattn is not None:
            mask_feature = (first.tokens @ first.src.flatten(2)).reshape(b, self.num_classes, h, w)  # (B, C, h, w)
            classes = None
            if labels is not None and self.training:
                labels = labels if labels.ndim == 4 else labels.unsqueeze(1)
                classes = F.interpolate(labels.float(), size=(h, w), mode="nearest")[:, 0].long()
                classes = classes.clamp(0, self.num_classes - 1)
            x = self.cmattn(x, mask_feature, classes)

        # (B, C, E); a copy, not a view of the parameter (a view under inference_mode is a tensor that
        # requires grad without a graph, which module-level hooks such as FlopCounterMode's reject)
        tokens = self.mask_tokens.weight.unsqueeze(0).repeat(b, 1, 1)
        if self.mask_cross_attention:
            prior = F.adaptive_avg_pool2d(torch.softmax(first.logits, dim=1), (h, w)).flatten(2)  # (B, C, h*w)
            hs, src = self.transformer(x, pe, tokens, prior)
        else:
            hs, src = self.transformer(x, pe, tokens)
        src = src.transpose(1, 2).reshape(b, e, h, w)
        upscaled = self.pixel_decoder(src, first.skips, high_res)  # (B, c, H2, W2)
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)  # (B, C, c)
        _, c, uh, uw = upscaled.shape
        second = (hyper @ upscaled.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
        return HSAMOutput(first.logits, second)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None,
                high_res: Sequence[torch.Tensor] | None = None) -> HSAMOutput | torch.Tensor:
        """Training mode: :class:`HSAMOutput`; eval mode: the combined logits (see :func:`combine_stages`)."""
        out = self.stages(embedding, labels, high_res)
        return out if self.training else combine_stages(out, self.ensemble)
