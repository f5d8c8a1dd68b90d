"""The segmentation network used by every workflow: SAM encoder + adaptation + prompt-free decoder.

``method`` chooses the adaptation of the frozen encoder:

* ``"samed"``: one trainable LoRA (rank r, q and v) per attention site, trained with the decoder.
* ``"samora"``: frozen LoRA experts (image/patch/pixel) per site fused by HL-Attn or a baseline
  fusion; only the fusion modules, their gates and the decoder train.
* ``"frozen"``: no adaptation; only the decoder trains.

The network takes slices in [0, 1], (B, 1, H, W) (or 3 channels), resizes them to the model input,
and returns class logits (B, C, H, W) at the input size. Its ``state_dict`` leaves out the frozen
backbone weights, which come from the backbone's own checkpoint; checkpoints hold only what
training changed (adapters, fusion, decoder).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samora_components.networks.backbones import build_backbone, frozen_to_eval
from samora_components.networks.decoders import PromptFreeDecoder
from samora_components.networks.expert_attention import ExpertAttention
from samora_components.networks.fusion import build_fusion
from samora_components.networks.lora import LEVELS, LoRAExpert, attach_lora, load_expert
from samora_components.networks.precision import resolve_precision

logger = logging.getLogger(__name__)

__all__ = ["SAMoraNet", "METHODS"]

METHODS = ("samed", "samora", "frozen")


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for module in root.modules():
        for name, child in module.named_children():
            if child is target:
                setattr(module, name, new)
                return
    raise LookupError("module to replace not found")


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

    Shapes: (B, in_channels, H, W) -> (B, num_classes, H, W).
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
    ) -> None:
        super().__init__()
        precision = resolve_precision(precision).precision
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if in_channels not in (1, 3):
            raise ValueError("in_channels must be 1 or 3")
        bb = build_backbone(backbone, img_size, checkpoint, fit_windows)
        #: the architecture in model-card terms (see :mod:`samora_components.bundle.cards`)
        self.architecture = {
            "method": method, "backbone": bb.name, "backbone_checkpoint": checkpoint, "img_size": bb.img_size,
            "num_classes": num_classes, "lora_rank": rank, "expert_levels": list(levels), "fusion": fusion,
            "fusion_order": fusion_order, "fusion_width": fusion_width, "fusion_heads": fusion_heads,
            "gate_init": float(gate_init), "fusion_norm": bool(fusion_norm), "fit_windows": bool(fit_windows),
        }
        self.fit_windows = bool(fit_windows)
        self.backbone_name = bb.name
        self.backbone_sha256 = bb.checkpoint_sha256
        self.attention_layout = bb.attention_layout
        self.img_size = bb.img_size
        self.method = method
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
                fuse = build_fusion(fusion, attn.qkv.in_features, levels, fusion_order, fusion_width, fusion_heads)
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
        self.decoder = PromptFreeDecoder(
            num_classes, cfg.out_chans, bb.prompt_encoder, cfg.decoder_depth, cfg.decoder_mlp_dim,
            cfg.decoder_heads, bb.decoder_weights,
        )
        base_keys |= {f"decoder.prompt.{k}" for k in bb.prompt_encoder.state_dict()}
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
        "fusion_heads": "fusion_heads", "fit_windows": "fit_windows",
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
            logger.warning("expert %s was trained on other %s weights (sha256 differs)", path, self.backbone_name)
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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Model-size RGB slices (B, 3, S, S) -> image embedding (B, E, g, g)."""
        with torch.no_grad():
            h = self._bb.stem(x)
        return self._bb.trunk(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        x = self._bb.prepare(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.decoder(self.embed(x))
        logits = logits.float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
