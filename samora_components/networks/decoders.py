"""Prompt-free multi-class mask decoder (SAMed style, SPEC §5).

SAM's ``MaskDecoder`` is built with ``num_multimask_outputs = C - 1``, which gives C mask tokens:
one per class, token 0 for the background. No prompt is used: the sparse prompt is empty and the
dense prompt is ``no_mask_embed`` broadcast over the embedding grid. The two-way transformer and the
upscaling path load from the SAM checkpoint; tokens and hypernetwork MLPs are new. SAM's IoU head is
not built: without prompts there is no mask choice for it to score.

:meth:`PromptFreeDecoder.features` also returns what a second decoding stage builds on (the H-SAM
decoder, :mod:`samora_components.networks.hsam`): the mask-token outputs, the transformer's image
output and the two maps of the upscaling path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

__all__ = ["DecoderFeatures", "PromptFreeDecoder"]


class DecoderFeatures(NamedTuple):
    """What one pass of :class:`PromptFreeDecoder` computes, for an embedding (B, E, h, w).

    Attributes:
        logits: class logits (B, C, 4h, 4w), what ``forward`` returns.
        tokens: the C mask-token outputs of the two-way transformer (B, C, E).
        src: the transformer's image output (B, E, h, w).
        skips: the upscaling path's maps: (B, E/4, 2h, 2w) after the first transposed convolution
            (and its norm and activation), (B, E/8, 4h, 4w) at its end.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    src: torch.Tensor
    skips: tuple[torch.Tensor, torch.Tensor]


class PromptFreeDecoder(nn.Module):
    """Image embedding (B, E, h, w) -> class logits (B, C, 4h, 4w).

    Args:
        num_classes: C, background included.
        embed_dim: E, the encoder's output width (256 for SAM).
        prompt_encoder: the backbone's frozen prompt encoder; its ``pe_layer`` gives the dense
            positional encoding and ``no_mask_embed`` the dense prompt.
        depth / mlp_dim / num_heads: two-way transformer geometry (2 / 2048 / 8 for SAM).
        weights: checkpoint tensors for ``transformer.*`` and ``output_upscaling.*``.
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
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts the background and must be at least 2")
        self.num_classes = num_classes
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=num_classes - 1,
            transformer=TwoWayTransformer(depth=depth, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        # SAM's IoU head scores prompted masks; a prompt-free decoder never uses it (its IoU token still
        # takes part in the two-way transformer, as in SAM)
        del self.mask_decoder.iou_prediction_head
        if weights:
            result = self.mask_decoder.load_state_dict(weights, strict=False)
            expected = [k for k in result.missing_keys if k.startswith(("transformer.", "output_upscaling."))]
            if expected or result.unexpected_keys:
                raise ValueError(f"decoder weights do not fit: missing {expected}, unexpected {result.unexpected_keys}")
        self.prompt = prompt_encoder  # frozen; the owning network leaves it out of its state dict

    def dense_inputs(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense positional encoding and dense prompt, both (1, E, h, w)."""
        prompt = self.prompt
        pe = prompt.pe_layer(grid).unsqueeze(0)
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *grid)
        return pe, dense

    def features(self, embedding: torch.Tensor) -> DecoderFeatures:
        """(B, E, h, w) -> logits (B, C, 4h, 4w) with the intermediate features (see :class:`DecoderFeatures`)."""
        dec = self.mask_decoder
        b, e, h, w = embedding.shape
        pe, dense = self.dense_inputs((h, w))
        pe, dense = pe.to(embedding), dense.to(embedding)
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        hs, src = dec.transformer(embedding + dense, pe, tokens)
        mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens]
        src = src.transpose(1, 2).reshape(b, e, h, w)
        # SAM's upscaling path: ConvT, LayerNorm2d, GELU (-> 2h) | ConvT, GELU (-> 4h)
        half = dec.output_upscaling[:3](src)
        upscaled = dec.output_upscaling[3:](half)
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        _, c, uh, uw = upscaled.shape
        logits = (hyper @ upscaled.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
        return DecoderFeatures(logits, mask_tokens, src, (half, upscaled))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) -> (B, C, 4h, 4w) low-resolution logits."""
        return self.features(embedding).logits
