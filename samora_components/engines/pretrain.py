"""Stage 1: hierarchical self-supervised pre-training of the three LoRA experts (SPEC §1, §3, §6).

Every objective is a module mapping a batch of slices (B, 1, S, S) in [0, 1] to a scalar loss, so
one Ignite process function (:class:`PretrainStep`) trains all of them:

========================  =====================================================================
objective                 what trains / what it minimises
========================  =====================================================================
:class:`ContrastiveCPT`   the SimCLRv2 teacher: NT-Xent between two augmented views (CPT)
:class:`MaskedCPT`        the MAE teacher: masked-patch reconstruction (CPT)
:class:`ImageDistillation`  image expert + projection MLP: MSE of L2-normalised pooled features
:class:`PatchDistillation`  patch expert + linear projector: MSE to the teacher's patch tokens
:class:`PixelDenoising`   pixel expert + U-Net decoder: MSE between clean slice and reconstruction
========================  =====================================================================

The student (:class:`ExpertStudent`) is the frozen SAM encoder with one trainable LoRA expert at
every attention site; its expert is exported as a safetensors file by :class:`ExpertExport`.
Teachers are frozen during distillation and keep eval mode (their BatchNorm statistics included).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.networks.blocks import UnetOutBlock, UnetResBlock
from timm.layers import Mlp
from torch import nn

from samora_components.networks.backbones import build_backbone, frozen_to_eval
from samora_components.networks.lora import LEVELS, LoRAExpert, attach_lora, save_expert
from samora_components.networks.precision import resolve_precision
from samora_components.networks.teachers import freeze, save_teacher

logger = logging.getLogger(__name__)

__all__ = [
    "ExpertStudent",
    "PixelDecoder",
    "ContrastiveCPT",
    "MaskedCPT",
    "ImageDistillation",
    "PatchDistillation",
    "PixelDenoising",
    "PretrainStep",
    "ExpertExport",
    "TeacherExport",
    "expert_metadata",
]


def _autocast(x: torch.Tensor, precision: str):
    """bfloat16 autocast when ``precision`` (auto | fp32 | bf16) resolves to bf16 on ``x``'s device."""
    enabled = resolve_precision(precision, x.device).precision == "bf16"
    return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=enabled)


class ExpertStudent(nn.Module):
    """Frozen SAM encoder with one trainable LoRA expert (rank r, q and v) at every attention site.

    Args:
        backbone / img_size / checkpoint / fit_windows: see :func:`samora_components.networks.backbones.build_backbone`.
        rank: LoRA rank.

    ``forward``: slices (B, 1|3, H, W) in [0, 1] -> image embedding (B, E, g, g), or with
    ``skips=True`` the embedding and the intermediate maps of :meth:`Backbone.trunk_with_skips`.
    """

    def __init__(self, backbone: str = "litemedsam", img_size: int | None = None, checkpoint: str | None = None, rank: int = 4,
                 fit_windows: bool = False):
        super().__init__()
        bb = build_backbone(backbone, img_size, checkpoint, fit_windows)
        self._bb = bb
        self.encoder = bb.encoder
        self.sites = attach_lora(bb.attention_sites(), bb.attention_layout, rank)
        self.rank = rank
        self.backbone_name = bb.name
        self.backbone_sha256 = bb.checkpoint_sha256
        self.img_size = bb.img_size
        self.embed_dim = bb.config.out_chans

    def experts(self) -> list[LoRAExpert]:
        """The trainable expert, one :class:`LoRAExpert` per site."""
        return [site.expert for site in self.sites]

    def train(self, mode: bool = True) -> "ExpertStudent":
        super().train(mode)
        frozen_to_eval(self.encoder)
        return self

    def forward(self, x: torch.Tensor, skips: bool = False):
        x = self._bb.prepare(x)
        with torch.no_grad():
            h = self._bb.stem(x)
        embedding, maps = self._bb.trunk_with_skips(h, collect=skips)
        return (embedding, maps) if skips else embedding


class _Objective(nn.Module):
    """Shared behaviour: frozen parts stay in eval mode; the trainable parameters are listed."""

    precision = "auto"

    def frozen_modules(self) -> Sequence[nn.Module]:
        return ()

    def train(self, mode: bool = True) -> "_Objective":
        super().train(mode)
        for module in self.frozen_modules():
            frozen_to_eval(module)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class ContrastiveCPT(_Objective):
    """Continual pre-training of the SimCLRv2 teacher: NT-Xent between two views (B, 1, H, W)."""

    def __init__(self, teacher: nn.Module, temperature: float = 0.1, precision: str = "auto") -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(True)
        self.temperature = temperature
        self.precision = precision

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        with _autocast(view1, self.precision):
            loss = self.teacher.contrastive_loss(view1, view2, temperature=self.temperature)
        return loss.float()


class MaskedCPT(_Objective):
    """Continual pre-training of the MAE teacher: reconstruction of masked patches of (B, 1, H, W)."""

    def __init__(self, teacher: nn.Module, mask_ratio: float = 0.75, norm_pix: bool = True, precision: str = "auto") -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(True)
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.precision = precision

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with _autocast(image, self.precision):
            loss = self.teacher.mae_loss(image, mask_ratio=self.mask_ratio, norm_pix=self.norm_pix)[0]
        return loss.float()


class _Distillation(_Objective):
    """A student (frozen encoder + expert) learning from a frozen teacher."""

    def __init__(self, student: ExpertStudent, teacher: nn.Module, precision: str = "auto") -> None:
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher)
        self.precision = precision

    def frozen_modules(self) -> Sequence[nn.Module]:
        return (self.student.encoder, self.teacher)


class ImageDistillation(_Distillation):
    """Image-level expert: the student's mean-pooled embedding through an MLP matches the teacher's
    pooled feature; loss = mean over the batch of ||normalise(s) - normalise(t)||² (in [0, 4]).

    Args:
        student: :class:`ExpertStudent`; teacher: SimCLRv2 teacher with ``pooled`` and ``feature_dim``.
        hidden: MLP hidden width.
    """

    level = "image"

    def __init__(self, student: ExpertStudent, teacher: nn.Module, hidden: int = 2048, precision: str = "auto") -> None:
        super().__init__(student, teacher, precision)
        self.head = Mlp(student.embed_dim, hidden, teacher.feature_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with _autocast(image, self.precision):
            with torch.no_grad():
                target = self.teacher.pooled(image)
            pred = self.head(self.student(image).mean(dim=(2, 3)))
        target = F.normalize(target.float(), dim=-1)
        pred = F.normalize(pred.float(), dim=-1)
        return (pred - target).square().sum(dim=-1).mean()


class PatchDistillation(_Distillation):
    """Patch-level expert: the student's embedding, resampled to the teacher's token grid and
    projected linearly to its width, matches the teacher's patch tokens of the full image (MSE).

    Shapes: embedding (B, E, g, g) -> (B, G, G, E) -> (B, G*G, D) against teacher tokens (B, G*G, D).
    """

    level = "patch"

    def __init__(self, student: ExpertStudent, teacher: nn.Module, precision: str = "auto") -> None:
        super().__init__(student, teacher, precision)
        self.projector = nn.Linear(student.embed_dim, teacher.feature_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with _autocast(image, self.precision):
            with torch.no_grad():
                target = self.teacher.tokens(image)
            embedding = self.student(image)
            grid = int(round(math.sqrt(target.shape[1])))
            if embedding.shape[-1] != grid:
                down = embedding.shape[-1] > grid
                embedding = F.interpolate(embedding.float(), size=(grid, grid), mode="bilinear", align_corners=False, antialias=down)
            pred = self.projector(embedding.flatten(2).transpose(1, 2))
        return F.mse_loss(pred.float(), target.float())


class PixelDecoder(nn.Module):
    """U-Net decoder from an image embedding and intermediate encoder maps back to a full-size image.

    The embedding (B, E, g, g) is refined with the skips from coarse to fine (each skip is projected
    to ``width`` channels, the running map is resized to the skip's grid, concatenated and passed
    through a MONAI ``UnetResBlock``), then upsampled by 2 with a residual block per step up to the
    output size, and mapped to ``out_channels``.

    Args:
        embed_dim: E; skip_channels: C_i of the skips in the order the encoder gives them.
        width: decoder channels; out_channels: 1 for a grey slice.
    """

    def __init__(self, embed_dim: int, skip_channels: Sequence[int], width: int = 64, out_channels: int = 1) -> None:
        super().__init__()
        self.inp = nn.Conv2d(embed_dim, width, kernel_size=1)
        self.skip_proj = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in skip_channels)
        self.fuse = nn.ModuleList(UnetResBlock(2, 2 * width, width, 3, 1, "instance") for _ in skip_channels)
        self.up = nn.ModuleList(UnetResBlock(2, width, width, 3, 1, "instance") for _ in range(5))
        self.out = UnetOutBlock(2, width, out_channels)

    def forward(self, embedding: torch.Tensor, skips: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.inp(embedding)
        # coarse to fine; at equal resolution the deeper map comes first
        order = sorted(range(len(skips)), key=lambda i: (skips[i].shape[-1], -i))
        for i in order:
            skip = self.skip_proj[i](skips[i])
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[i](torch.cat([x, skip], dim=1))
        step = 0
        while x.shape[-1] < size[-1]:
            target = (min(2 * x.shape[-2], size[0]), min(2 * x.shape[-1], size[1]))
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            x = self.up[min(step, len(self.up) - 1)](x)
            step += 1
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.out(x)


class PixelDenoising(_Objective):
    """Pixel-level expert: a denoising autoencoder (SAM encoder + expert + :class:`PixelDecoder`).

    The slice (B, 1, S, S) gets Gaussian noise (``sigma`` on [0, 1], clipped) and, with
    probability ``blur_prob``, a Gaussian blur; the decoder reconstructs the clean slice (MSE).
    The decoder sees only encoder maps taken after attention blocks (no skip from the raw input),
    so the reconstruction has to pass through the adapted encoder.
    """

    level = "pixel"

    def __init__(
        self, student: ExpertStudent, sigma: float = 0.1, blur_prob: float = 0.0, width: int = 64, precision: str = "auto"
    ) -> None:
        super().__init__()
        self.student = student
        self.sigma = sigma
        self.blur_prob = blur_prob
        self.precision = precision
        with torch.no_grad():
            probe = torch.zeros(1, 1, student.img_size, student.img_size)
            _, maps = student(probe, skips=True)
        self.decoder = PixelDecoder(student.embed_dim, [m.shape[1] for m in maps], width)

    def frozen_modules(self) -> Sequence[nn.Module]:
        return (self.student.encoder,)

    def corrupt(self, image: torch.Tensor) -> torch.Tensor:
        """Noisy (and sometimes blurred) copy of (B, 1, H, W) slices in [0, 1]."""
        noisy = image + self.sigma * torch.randn_like(image)
        if self.blur_prob > 0:
            from torchvision.transforms.v2.functional import gaussian_blur

            chosen = torch.rand(image.shape[0], device=image.device) < self.blur_prob
            if chosen.any():
                noisy[chosen] = gaussian_blur(noisy[chosen], kernel_size=[5, 5], sigma=[1.0, 1.0])
        return noisy.clamp(0.0, 1.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        clean = self.student._bb.prepare(image)[:, :1]
        with _autocast(image, self.precision):
            embedding, maps = self.student(self.corrupt(clean), skips=True)
            recon = self.decoder(embedding, maps, tuple(clean.shape[-2:]))
        return F.mse_loss(recon.float(), clean)


class PretrainStep:
    """Ignite process function shared by every stage-1 objective.

    Args:
        objective: module mapping the batch tensors named by ``keys`` to a scalar loss (or a
            ``DistributedDataParallel`` wrapping one: ``multi_gpu_pretrain.yaml``).
        optimizer: optimizer over ``objective.trainable_parameters()``.
        device: where batches go.
        keys: batch keys passed to the objective, in order (``["image"]``, or ``["view1", "view2"]``).
        grad_clip: max gradient norm (0 = none).

    Returns ``{"loss": float}`` per iteration.
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu",
                 keys: Sequence[str] = ("image",), grad_clip: float = 0.0) -> None:
        self.objective = objective
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.keys = tuple(keys)
        self.grad_clip = grad_clip

    def __call__(self, engine: Engine, batch: dict) -> dict:
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        inputs = [torch.as_tensor(batch[k]).to(self.device, non_blocking=True).float() for k in self.keys]
        loss = self.objective(*inputs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage-1 loss is {loss.item()} at iteration {engine.state.iteration}")
        loss.backward()
        if self.grad_clip:
            objective = getattr(self.objective, "module", self.objective)  # DistributedDataParallel wraps it
            torch.nn.utils.clip_grad_norm_(objective.trainable_parameters(), self.grad_clip)
        self.optimizer.step()
        return {"loss": float(loss.detach())}


def expert_metadata(student: ExpertStudent, level: str, datalist: str, pool_slices: int, teacher: dict | None = None,
                    recipe: dict | None = None) -> dict:
    """Metadata stored with an expert file (SPEC §3)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return {
        "level": level,
        "backbone": student.backbone_name,
        "checkpoint_sha256": student.backbone_sha256,
        "rank": student.rank,
        "targets": ["qkv.q", "qkv.v"],
        "img_size": student.img_size,
        "data": {"datalist": os.path.abspath(datalist), "unlabeled_slices": int(pool_slices)},
        "teacher": teacher or {},
        "recipe": recipe or {},
    }


class ExpertExport:
    """Writes the student's expert to ``path`` (safetensors + metadata) after every epoch and at the
    end, so an interrupted run still leaves its latest expert; the file is replaced atomically.

    Args:
        student: the stage-1 student whose expert is written.
        path: the expert file.
        level: image, patch or pixel.
        datalist: the datalist of the unlabeled pool; ``pool``: the pool (its length is recorded).
        source: what the expert learned from, e.g. ``{"kind": "simclrv2", "config": ...}``; a
            ``teacher`` given too adds the checkpoint it was built from.
        recipe: optimizer settings to record.
        teacher: the teacher module (``build_teacher`` records its checkpoint on it), if any.
    """

    def __init__(self, student: ExpertStudent, path: str, level: str, datalist: str, pool: Sequence,
                 source: dict | None = None, recipe: dict | None = None, teacher: nn.Module | None = None) -> None:
        self.student = student
        self.path = path
        source = dict(source or {})
        if teacher is not None:
            source["checkpoint"] = getattr(teacher, "checkpoint", None)
        self.metadata = expert_metadata(student, level, datalist, len(pool), source, recipe)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        meta = dict(self.metadata)
        output = engine.state.output or {}
        meta.update(epochs_done=int(engine.state.epoch), final_loss=float(output.get("loss", float("nan"))))
        save_expert(self.student.experts(), self.path, meta)
        if engine.state.epoch == engine.state.max_epochs:
            logger.info("%s-level expert written to %s", meta.get("level"), self.path)


class TeacherExport:
    """Saves a continually pre-trained teacher in its official checkpoint layout after every epoch
    (atomically), so distillation loads it like an official file."""

    def __init__(self, teacher: nn.Module, path: str) -> None:
        self.teacher = teacher
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        save_teacher(self.teacher, self.path)
        if engine.state.epoch == engine.state.max_epochs:
            logger.info("continually pre-trained teacher written to %s", self.path)
