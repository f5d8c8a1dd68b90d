"""The segmentation network used by every workflow: SAM encoder + adaptation + prompt-free decoder.

``method`` chooses the adaptation of the frozen encoder:

* ``"samed"``: one trainable LoRA (rank r, q and v) per attention site, trained with the decoder.
* ``"samora"``: frozen LoRA experts (image/patch/pixel) per site fused by HL-Attn or a baseline
  fusion; only the fusion modules, their gates and the decoder train.
* ``"frozen"``: no adaptation; only the decoder trains.

``decoder`` chooses the prompt-free decoder:

* ``"samed"``: SAMed's (:class:`~samora_components.networks.decoders.PromptFreeDecoder`), one logit map.
* ``"hsam"``: H-SAM's two-stage hierarchical decoder
  (:class:`~samora_components.networks.hsam.HierarchicalDecoder`) with its three parts switchable
  (H-SAM table 4). ``method="samed", decoder="hsam"`` is the H-SAM baseline (SAMed's LoRA, no
  experts); ``method="samora", decoder="hsam"`` is H-SAMora. In training mode it returns both stages
  (:class:`~samora_components.networks.hsam.HSAMOutput`: stage 1 on its own grid, 4x the embedding,
  for the stage-weighted loss of :mod:`samora_components.engines.losses`; stage 2 at the input size);
  in eval mode the two stages' combination, one logit map at the input size like ``"samed"``.

The network takes slices in [0, 1], (B, 1, H, W) (or 3 channels), resizes them to the model input,
and returns class logits (B, C, H, W) at the input size. Its ``state_dict`` leaves out the frozen
backbone weights, which come from the backbone's own checkpoint; checkpoints hold only what
training changed (adapters, fusion, decoder).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samora_components.networks.backbones import build_backbone, frozen_to_eval
from samora_components.networks.decoders import PromptFreeDecoder
from samora_components.networks.expert_attention import ExpertAttention
from samora_components.networks.fusion import build_fusion
from samora_components.networks.hsam import ENSEMBLES, HierarchicalDecoder, HSAMOutput
from samora_components.networks.lora import LEVELS, LoRAExpert, attach_lora, load_expert
from samora_components.networks.precision import resolve_precision

logger = logging.getLogger(__name__)

__all__ = ["SAMoraNet", "DECODERS", "METHODS"]

METHODS = ("samed", "samora", "frozen")
DECODERS = ("samed", "hsam")


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is target:
                setattr(module, name, new)
                return
    raise LookupError("module to replace not found")


def _resize(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Logits (B, C, h, w) -> (B, C, *size), bilinear (unchanged when already that size)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


class SAMoraNet(nn.Module):
    """Prompt-free SAM for C-class segmentation of 2-D slices.

    Args:
        num_classes: C, background included.
        backbone: a name of :data:`samora_components.networks.backbones.BACKBONES`.
        img_size: model input size (default: the backbone's).
        checkpoint: SAM-format weights; ``None`` = embedded default where one exists, ``""`` = random.
        method: ``"samed"``, ``"samora"`` or ``"frozen"``.
        rank: LoRA rank.
        levels: expert levels used by ``samora`` (table 5 ablations use one or two).
        experts: ``{level: path}`` of expert safetensors files for ``samora`` (every level of
            ``levels`` outside ``scratch_levels`` needs one; a missing file is an error naming the
            command that creates it). ``None``: no files (weights come from a trained state dict).
        scratch_levels: levels whose expert is not pre-trained but trains in stage 2 from the LoRA
            initialisation (the "Scratch" rows of paper tables 5/15); needs ``gate_init != 0``.
        gate_init / fusion_norm: the SAMora block's gate start value and optional LayerNorm of the
            fused delta (see :class:`samora_components.networks.expert_attention.ExpertAttention`).
        fusion: ``"hl_attn"``, ``"lac"``, ``"lorahub"`` or ``"mole"``.
        fusion_order / fusion_width / fusion_heads: HL-Attn configuration.
        in_channels: 1 (repeated to RGB) or 3.
        attention_kernel: how ``samora`` sites compute their attention variants: ``"auto"``,
            ``"fused"`` or ``"chunked"`` (see :class:`samora_components.networks.expert_attention.ExpertAttention`).
        precision: ``"auto"`` (bf16 where the hardware has native bf16, else fp32; see
            :mod:`samora_components.networks.precision`), ``"fp32"`` or ``"bf16"`` (autocast inside the
            forward: matrix products and convolutions in bfloat16, logits returned in float32).
            Resolved once, for the device the bundles use (CUDA when available, else the CPU);
            ``self.precision`` holds the result.
        fit_windows: TinyViT backbones: attention windows fitted to the token grid (no padding;
            see :func:`samora_components.networks.backbones.fit_window`).
        decoder: ``"samed"`` (default) or ``"hsam"`` (see the module docstring).
        hsam_cmattn / hsam_mask_attention / hsam_pixel_decoder: H-SAM's three parts (its table 4):
            class-balanced mask-guided self-attention, learnable mask cross-attention, hierarchical
            pixel decoder; a part switched off falls back to SAM's plain counterpart.
        hsam_cmattn_as_coded: the public H-SAM code's CMAttn (a softmax over one channel: a constant
            gate) instead of the paper's (a sigmoid gate).
        hsam_noise_std: CMAttn's class-balanced training noise (H-SAM eq. 1): the standard deviation
            of the rarest class in the batch, or one per class; 0 = none.
        hsam_ensemble: how eval mode combines the stages: ``"logits"`` (their mean, as the public
            code) or ``"probabilities"`` (log of the mean softmax).
        hsam_high_res: SAM2 backbones with the H-SAM decoder: Hiera's stride-4 and stride-8 FPN
            features join stage 2's pixel decoder as in SAM2's own mask decoder (its ``conv_s0`` /
            ``conv_s1`` weights from the checkpoint); no effect on other backbones or decoders.

    Shapes: (B, in_channels, H, W) -> (B, num_classes, H, W); ``decoder="hsam"`` in training mode:
    :class:`~samora_components.networks.hsam.HSAMOutput` of (B, C, 4g, 4g) and (B, C, H, W), g the
    embedding grid. ``labels`` (B, 1, H, W), optional, guide CMAttn's training noise.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "litemedsam",
        img_size: int | None = None,
        checkpoint: str | None = None,
        method: str = "samed",
        rank: int = 4,
        levels: tuple[str, ...] | list[str] = LEVELS,
        experts: Mapping[str, str] | None = None,
        scratch_levels: tuple[str, ...] | list[str] = (),
        gate_init: float = 0.0,
        fusion_norm: bool = False,
        fusion: str = "hl_attn",
        fusion_order: str = "2-1-1",
        fusion_width: int = 128,
        fusion_heads: int = 4,
        in_channels: int = 1,
        precision: str = "auto",
        attention_kernel: str = "auto",
        fit_windows: bool = False,
        decoder: str = "samed",
        hsam_cmattn: bool = True,
        hsam_mask_attention: bool = True,
        hsam_pixel_decoder: bool = True,
        hsam_cmattn_as_coded: bool = False,
        hsam_noise_std: float | Sequence[float] = 0.35,
        hsam_ensemble: str = "logits",
        hsam_high_res: bool = True,
    ) -> None:
        super().__init__()
        precision = resolve_precision(precision).precision
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
        if hsam_ensemble not in ENSEMBLES:
            raise ValueError(f"unknown hsam_ensemble {hsam_ensemble!r}; choose one of {ENSEMBLES}")
        if in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        bb = build_backbone(backbone, img_size, checkpoint, fit_windows)
        #: the architecture in model-card terms (see :mod:`samora_components.bundle.cards`)
        self.architecture = {
            "method": method, "backbone": bb.name, "backbone_checkpoint": checkpoint, "img_size": bb.img_size,
            "num_classes": num_classes, "lora_rank": rank, "expert_levels": list(levels), "fusion": fusion,
            "fusion_order": fusion_order, "fusion_width": fusion_width, "fusion_heads": fusion_heads,
            "gate_init": float(gate_init), "fusion_norm": bool(fusion_norm), "fit_windows": bool(fit_windows),
            "decoder": decoder, "hsam_cmattn": bool(hsam_cmattn), "hsam_mask_attention": bool(hsam_mask_attention),
            "hsam_pixel_decoder": bool(hsam_pixel_decoder), "hsam_cmattn_as_coded": bool(hsam_cmattn_as_coded),
            "hsam_ensemble": hsam_ensemble, "hsam_high_res": bool(hsam_high_res),
        }
        self.fit_windows = bool(fit_windows)
        self.backbone_name = bb.name
        self.backbone_sha256 = bb.checkpoint_sha256
        self.attention_layout = bb.attention_layout
        self.img_size = bb.img_size
        self.method = method
        self.decoder_name = decoder
        #: whether the encoder's high-resolution maps feed the decoder (SAM2 + H-SAM)
        self.high_res = decoder == "hsam" and bool(hsam_high_res) and bb.attention_layout == "hiera"
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.precision = precision
        self._bb = bb  # plain attribute: gives stem/trunk/site helpers without a second registration
        self.encoder = bb.encoder
        base_keys = {f"encoder.{k}" for k in self.encoder.state_dict()}
        self.sites: list[nn.Module] = []
        if method == "samed":
            self.sites.extend(attach_lora(bb.attention_sites(), bb.attention_layout, rank))
            base_keys = {k.replace(".qkv.", ".qkv.base.") if ".attn.qkv." in k else k for k in base_keys}
        elif method == "samora":
            levels, scratch_levels = tuple(levels), tuple(scratch_levels)
            if set(scratch_levels) - set(levels):
                raise ValueError(f"scratch levels {scratch_levels} must be among the expert levels {levels}")
            if scratch_levels and float(gate_init) == 0.0:
                raise ValueError("experts trained from scratch need gate_init != 0: with the gate at 0 and LoRA B at 0 "
                                 "neither gets a gradient (the authors' code starts the gate at 1)")
            for attn in bb.attention_sites():
                # the fusion works on the site's output width (Hiera's stage transitions widen the tokens)
                fuse = build_fusion(fusion, attn.proj.out_features, levels, fusion_order, fusion_width, fusion_heads)
                site = ExpertAttention(attn, bb.attention_layout, levels, fuse, rank, attention_kernel, gate_init, fusion_norm)
                _replace(self.encoder, attn, site)
                self.sites.append(site)
            base_keys = {self._site_key(k) for k in base_keys}
        if precision == "bf16":
            # SAM's attention adds its relative-position bias with einsum, which autocast does not
            # cover: keep those frozen tables in bfloat16 like the activations they meet
            for attn in self.encoder.modules():
                for name in ("rel_pos_h", "rel_pos_w"):
                    table = getattr(attn, name, None)
                    if isinstance(table, nn.Parameter):
                        table.data = table.data.to(torch.bfloat16)
        cfg = bb.config
        geometry = (num_classes, cfg.out_chans, bb.prompt_encoder, cfg.decoder_depth, cfg.decoder_mlp_dim,
                    cfg.decoder_heads, bb.decoder_weights)
        if decoder == "samed":
            self.decoder: PromptFreeDecoder | HierarchicalDecoder = PromptFreeDecoder(*geometry)
        else:
            self.decoder = HierarchicalDecoder(
                *geometry, upscale_steps=self._upscale_steps(bb.img_size, bb.grid), cmattn=hsam_cmattn,
                mask_cross_attention=hsam_mask_attention, hierarchical_pixel_decoder=hsam_pixel_decoder,
                cmattn_as_coded=hsam_cmattn_as_coded, noise_std=hsam_noise_std, ensemble=hsam_ensemble,
                high_res=self.high_res, high_res_weights=bb.high_res_weights,
            )
        prompt_path = next(name for name, m in self.decoder.named_modules() if m is bb.prompt_encoder)
        base_keys |= {f"decoder.{prompt_path}.{k}" for k in bb.prompt_encoder.state_dict()}
        self._base_keys = frozenset(base_keys)
        self.experts_meta: dict[str, dict] = {}
        if method == "samora":
            for site in self.sites:
                for level, expert in site.experts.items():
                    expert.requires_grad_(level in scratch_levels)
            if experts is not None:
                for level in (lv for lv in levels if lv not in scratch_levels):
                    self.load_expert(level, (experts or {}).get(level))
        self._register_state_dict_hook(SAMoraNet._drop_base_keys)
        self._register_load_state_dict_pre_hook(SAMoraNet._drop_retired_keys)
        self.register_load_state_dict_post_hook(SAMoraNet._ignore_missing_base)

    @staticmethod
    def _upscale_steps(img_size: int, grid: int) -> int:
        """Doublings after SAM's 4x upscaling that bring the H-SAM stage-2 map to the model input
        (2 for SAM ViTs: 4g = S/4; 0 for LiteMedSAM: 4g = S); a remainder is left to the final resize."""
        ratio = img_size / (4 * grid)
        return max(0, int(math.floor(math.log2(ratio) + 1e-9))) if ratio >= 1 else 0

    # -- state dict: only what training changes ---------------------------------------------------
    @staticmethod
    def _site_key(key: str) -> str:
        # attention parameters move under the ExpertAttention wrapper's "base"
        for marker in (".attn.",):
            if marker in key:
                head, tail = key.split(marker, 1)
                return f"{head}.attn.base.{tail}"
        return key

    @staticmethod
    def _drop_base_keys(module: "SAMoraNet", state: dict, prefix: str, local_metadata) -> None:
        for key in list(state):
            if key[len(prefix):] in module._base_keys:
                del state[key]

    #: model-card key -> constructor argument, for :meth:`from_card`
    CARD_ARGS = {
        "num_classes": "num_classes", "backbone": "backbone", "img_size": "img_size",
        "backbone_checkpoint": "checkpoint", "method": "method", "lora_rank": "rank", "expert_levels": "levels",
        "scratch_levels": "scratch_levels", "gate_init": "gate_init", "fusion_norm": "fusion_norm",
        "fusion": "fusion", "fusion_order": "fusion_order", "fusion_width": "fusion_width",
        "fusion_heads": "fusion_heads", "fit_windows": "fit_windows", "decoder": "decoder",
        "hsam_cmattn": "hsam_cmattn", "hsam_mask_attention": "hsam_mask_attention",
        "hsam_pixel_decoder": "hsam_pixel_decoder", "hsam_cmattn_as_coded": "hsam_cmattn_as_coded",
        "hsam_ensemble": "hsam_ensemble", "hsam_high_res": "hsam_high_res",
    }

    @classmethod
    def from_card(cls, card: Mapping, **overrides) -> "SAMoraNet":
        """The network a model card describes (the card written beside trained weights); keys the card
        lacks keep the constructor's defaults, ``overrides`` (e.g. ``precision``) win. Experts come
        from the trained state dict, not from files."""
        kwargs = {arg: card[key] for key, arg in cls.CARD_ARGS.items() if key in card}
        kwargs["scratch_levels"] = ()  # trained experts are in the weights either way
        kwargs.update(overrides)
        return cls(**kwargs)

    #: state-dict entries older weights carry that the network no longer has (SAM's IoU head)
    RETIRED_KEYS = ("decoder.mask_decoder.iou_prediction_head.",)

    @staticmethod
    def _drop_retired_keys(state: dict, prefix: str, *args) -> None:
        for key in [k for k in state if k[len(prefix):].startswith(SAMoraNet.RETIRED_KEYS)]:
            del state[key]

    @staticmethod
    def _ignore_missing_base(module: "SAMoraNet", incompatible) -> None:
        kept = [k for k in incompatible.missing_keys if k not in module._base_keys]
        incompatible.missing_keys.clear()
        incompatible.missing_keys.extend(kept)

    # -- experts ---------------------------------------------------------------------------------
    def site_experts(self, level: str) -> list[LoRAExpert]:
        """The per-site experts of one level (``samora``) or the trained LoRA (``samed``)."""
        if self.method == "samed":
            return [site.expert for site in self.sites]
        return [site.experts[level] for site in self.sites]

    def load_expert(self, level: str, path: str | None) -> dict:
        """Load an expert file into ``level``; a missing file, or one made for another backbone, is an error."""
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"no {level}-level expert file at {path}: create it with `python -m samora_components pretrain "
                f"--bundle <bundle> --level {level}` (stage 1), point `experts#{level}` at one, or train it in "
                f"stage 2 with `--scratch_levels \"['{level}']\" --gate_init 1.0`")
        meta = load_expert(path, self.site_experts(level))
        if meta.get("backbone") != self.backbone_name:
            raise ValueError(f"expert {path} was trained on backbone {meta.get('backbone')!r}, not {self.backbone_name!r}")
        if meta.get("checkpoint_sha256") and meta.get("checkpoint_sha256") != self.backbone_sha256:
            # an expert's update was learned against particular frozen weights: on others it is noise
            raise ValueError(
                f"expert {path} was trained on other {self.backbone_name} weights (sha256 {meta['checkpoint_sha256'][:12]}..., "
                f"this backbone {str(self.backbone_sha256)[:12]}...): run stage 1 again on these weights "
                f"(`python -m samora_components pretrain --level {level}`) or train it in stage 2 with --scratch_levels")
        if meta.get("level") not in (None, level):
            logger.warning("expert %s is a %s-level expert loaded as %s", path, meta.get("level"), level)
        self.experts_meta[level] = meta
        return meta

    # -- modes and forward -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "SAMoraNet":
        super().train(mode)
        frozen_to_eval(self.encoder)  # frozen SAM parts keep inference behaviour
        self.decoder.prompt.train(False)
        return self

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, in_channels, H, W) in [0, 1] -> model input (B, 3, S, S) (the backbone's resize)."""
        return self._bb.prepare(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Model-size RGB slices (B, 3, S, S) -> image embedding (B, E, g, g)."""
        with torch.no_grad():
            h = self._bb.stem(x)
        return self._bb.trunk(h)

    def core(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | HSAMOutput:
        """Model-size RGB slices (B, 3, S, S) -> the decoder's output on its own grid: logits
        (B, C, s, s), or both H-SAM stages in training mode."""
        if self.high_res:  # SAM2 + H-SAM: the FPN's stride-4 and stride-8 maps reach stage 2
            with torch.no_grad():
                h = self._bb.stem(x)
            embedding, high_res = self._bb.trunk_with_skips(h)
            return self.decoder(embedding, labels, high_res)
        embedding = self.embed(x)
        return self.decoder(embedding) if self.decoder_name == "samed" else self.decoder(embedding, labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | HSAMOutput:
        """Slices (B, in_channels, H, W) -> logits (B, C, H, W), or both H-SAM stages in training mode
        (see the class docstring). ``labels`` (B, 1, H, W) reach H-SAM's CMAttn noise only; the
        SAMed decoder ignores them."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        x = self.prepare(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.core(x, labels)
        if isinstance(out, HSAMOutput):  # training: stage 1 stays on its grid (supervised there, H-SAM §3.4)
            return HSAMOutput(out.stage1.float(), _resize(out.stage2.float(), size))
        return _resize(out.float(), size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
