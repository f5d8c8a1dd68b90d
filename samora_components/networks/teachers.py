"""Teachers of the image- and patch-level experts (SPEC §1, §6).

Two frozen networks supervise stage-1 distillation after continual pre-training (CPT) on the
unlabeled pool:

* **image level** — :class:`SimCLRTeacher`, a SimCLRv2 ResNet (depth 50/101/152, width multiplier,
  selective kernels) and its 3-layer contrastive projection head. Module names reproduce the key
  layout of the SimCLRv2-Pytorch conversion of the official TF checkpoints
  (``{'resnet': ..., 'head': ...}``, e.g. ``r50_2x_sk1.pth``). Like that conversion, the stem max-pool
  pads symmetrically and the stride-1 ResNet-D shortcut pools over an explicit zero pad; TF pads
  only at the end (and excludes the pad from the stride-1 average), so border activations differ
  slightly from the TF graph.
* **patch level** — :class:`MAETeacher`, a timm ``VisionTransformer`` encoder with MAE's decoder,
  named as in the official MAE code so that ``mae_pretrain_vit_large.pth`` (encoder only) and the
  ``*_full`` checkpoints (encoder + decoder) load.

Both take slices (B, 1 or 3, H, W) in [0, 1], repeat one channel to three and resize (bilinear,
no antialias) to their input size. SimCLR then works on raw [0, 1] RGB; MAE normalises with the
ImageNet mean/std itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from samora_components.networks.backbones import rgb_slices
from samora_components.utils import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "RESNET_BLOCKS", "TEACHER_CONFIGS", "SelectiveKernel", "SimCLRResNet", "ContrastiveHead", "SimCLRTeacher",
    "MAETeacher", "nt_xent", "sincos_pos_embed", "patchify", "masked_mse", "build_teacher", "freeze",
    "load_simclr_checkpoint", "load_mae_checkpoint", "save_teacher",
]

BN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET_BLOCKS: dict[int, tuple[int, ...]] = {
    50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)
}

TEACHER_CONFIGS: dict[str, dict[str, dict]] = {
    "simclr": {
        "official": dict(depth=50, width=2, sk_ratio=0.0625),  # r50_2x_sk1, pooled 4096
        "tiny": dict(blocks=(1, 1, 1, 1), width=1, base_width=16, sk_ratio=0.0625, input_size=64),
    },
    "mae": {
        "official": dict(),  # ViT-L/16 encoder, 8 x 512 decoder
        "tiny": dict(input_size=64, embed_dim=64, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1,
                     decoder_heads=2),
    },
}


# ---- SimCLRv2 ResNet ---------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)


class _BNAct(nn.Sequential):
    """BatchNorm2d (eps 1e-5) then ReLU or Identity; the BN's keys are ``<name>.0.*``."""

    def __init__(self, channels: int, relu: bool = True) -> None:
        super().__init__(nn.BatchNorm2d(channels, eps=BN_EPS), nn.ReLU() if relu else nn.Identity())


class SelectiveKernel(nn.Module):
    """SimCLRv2 selective-kernel 3x3 conv: (B, C, H, W) -> (B, C, H/s, W/s).

    ``main_conv`` gives two branches (B, 2, C, H', W'); their sum is pooled globally, ``mixing_conv``
    turns it into per-branch channel logits (B, 2, C, 1, 1), softmaxed across the two branches,
    which weight the branches' sum.
    """

    def __init__(self, channels: int, stride: int, sk_ratio: float, min_dim: int = 32) -> None:
        super().__init__()
        mid = max(int(channels * sk_ratio), min_dim)
        self.main_conv = nn.Sequential(_conv(channels, 2 * channels, 3, stride), _BNAct(2 * channels))
        self.mixing_conv = nn.Sequential(_conv(channels, mid, 1), _BNAct(mid), _conv(mid, 2 * channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.main_conv(x).unflatten(1, (2, -1))  # (B, 2, C, H', W')
        pooled = branches.sum(1).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        weights = self.mixing_conv(pooled).unflatten(1, (2, -1)).softmax(dim=1)  # (B, 2, C, 1, 1)
        return (branches * weights).sum(1)


class _Projection(nn.Module):
    """Shortcut of a stage's first block: ResNet-D pool + 1x1 conv with sk, else strided 1x1; then BN."""

    def __init__(self, cin: int, cout: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        if sk_ratio > 0:
            self.shortcut: nn.Module = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride=stride), _conv(cin, cout, 1)
            )
        else:
            self.shortcut = _conv(cin, cout, 1, stride)
        self.bn = _BNAct(cout, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.shortcut(x))


class _Bottleneck(nn.Module):
    """Bottleneck (B, cin, H, W) -> (B, 4C, H/s, W/s); ``net`` = 1x1, [SK | 3x3 + BN], 1x1, BN."""

    def __init__(self, cin: int, channels: int, stride: int, sk_ratio: float, project: bool) -> None:
        super().__init__()
        self.projection = _Projection(cin, 4 * channels, stride, sk_ratio) if project else nn.Identity()
        layers: list[nn.Module] = [_conv(cin, channels, 1), _BNAct(channels)]
        if sk_ratio > 0:
            layers.append(SelectiveKernel(channels, stride, sk_ratio))
        else:
            layers += [_conv(channels, channels, 3, stride), _BNAct(channels)]
        layers += [_conv(channels, 4 * channels, 1), _BNAct(4 * channels, relu=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.projection(x) + self.net(x))


class _Stage(nn.Module):
    def __init__(self, num_blocks: int, cin: int, channels: int, stride: int, sk_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _Bottleneck(cin if i == 0 else 4 * channels, channels, stride if i == 0 else 1, sk_ratio, i == 0)
            for i in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SimCLRResNet(nn.Module):
    """SimCLRv2 ResNet: (B, 3, S, S) in [0, 1] -> pooled (B, 32 * base_width * width).

    ``net.0`` is the stem (with sk: three 3x3 convs, the first strided, else one 7x7/2; then
    max-pool), ``net.1``..``net.4`` the stages, ``fc`` the supervised 1000-way head of the checkpoint
    (kept so that loading is strict, unused here).
    """

    def __init__(self, blocks: tuple[int, ...], width: int = 2, sk_ratio: float = 0.0625, base_width: int = 64) -> None:
        super().__init__()
        c = base_width * width
        if sk_ratio > 0:
            stem = [_conv(3, c // 2, 3, 2), _BNAct(c // 2), _conv(c // 2, c // 2), _BNAct(c // 2), _conv(c // 2, c)]
        else:
            stem = [_conv(3, c, 7, 2)]
        stages: list[nn.Module] = [nn.Sequential(*stem, _BNAct(c), nn.MaxPool2d(3, stride=2, padding=1))]
        cin = c
        for i, n in enumerate(blocks):
            stages.append(_Stage(n, cin, c * 2**i, 1 if i == 0 else 2, sk_ratio))
            cin = 4 * c * 2**i
        self.channels_out = cin
        self.net = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


class ContrastiveHead(nn.Module):
    """SimCLRv2 projection head (B, F) -> (B, out_dim): [Linear, BN, ReLU] x 2, Linear, BN.

    Linears have no bias; the last BN's bias starts at zero (TF has no beta there).
    """

    def __init__(self, channels: int, out_dim: int = 128, num_layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            last = i == num_layers - 1
            dim = out_dim if last else channels
            self.layers.append(nn.Linear(channels, dim, bias=False))
            self.layers.append(nn.BatchNorm1d(dim, eps=BN_EPS))
            if not last:
                self.layers.append(nn.ReLU())
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR NT-Xent on paired projections z1, z2 (B, D) -> scalar.

    Cosine similarities over the 2B samples; for each anchor the positive is its other view, the
    denominator runs over all 2B - 1 other samples; mean over the 2B anchors
    (``monai.losses.ContrastiveLoss``, computed in float32).
    """
    return ContrastiveLoss(temperature=temperature)(z1.float(), z2.float())


# ---- Common teacher interface ------------------------------------------------------------------
class _Teacher(nn.Module):
    """Shared input handling. Attributes: ``level``, ``input_size``, ``feature_dim``, ``checkpoint``."""

    level = ""
    kind = ""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.checkpoint = ""

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, 1|3, H, W) in [0, 1] -> network input (B, 3, S, S), S = ``input_size``."""
        return self.normalise(rgb_slices(x, self.input_size))


class SimCLRTeacher(_Teacher):
    """Image-level teacher: SimCLRv2 ResNet (``resnet``) + contrastive head (``head``).

    Args:
        depth: 50, 101, 152 or 200 (block counts of :data:`RESNET_BLOCKS`), unless ``blocks`` is given.
        width: width multiplier; sk_ratio: selective-kernel ratio (0 = plain ResNet).
        blocks: explicit blocks per stage; base_width: channels of stage 1 at width 1 (64).
        proj_dim: head output; input_size: side the slices are resized to.
    """

    level = "image"
    kind = "simclr"

    def __init__(self, depth: int = 50, width: int = 2, sk_ratio: float = 0.0625, *,
                 blocks: tuple[int, ...] | None = None, base_width: int = 64, proj_dim: int = 128,
                 input_size: int = 224) -> None:
        super().__init__(input_size)
        if blocks is None and depth not in RESNET_BLOCKS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(RESNET_BLOCKS)}")
        self.resnet = SimCLRResNet(tuple(blocks or RESNET_BLOCKS[depth]), width, sk_ratio, base_width)
        self.head = ContrastiveHead(self.resnet.channels_out, proj_dim)
        self.feature_dim = self.resnet.channels_out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, 1|3, H, W) -> pooled feature before the head (B, feature_dim)."""
        return self.resnet(self.prepare(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, 1|3, H, W) -> contrastive projection (B, proj_dim)."""
        return self.head(self.pooled(x))

    def contrastive_loss(self, view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
        """NT-Xent between two views (B, 1|3, H, W) of the same slices; both go through one batch."""
        z = self.head(self.resnet(torch.cat([self.prepare(view1), self.prepare(view2)])))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, temperature)


# ---- MAE ---------------------------------------------------------------------------------------
def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding (1, [1 +] grid*grid, dim), row-major tokens.

    First half of the channels encodes the column, second half the row, each as [sin | cos] with
    frequencies 1 / 10000^(k / (dim/4)); the class token's entry is zero.
    """
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (cols.flatten(), rows.flatten()):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])
    return emb[None].float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, (S/p)^2, p*p*C), pixels ordered (row, col, channel) as in MAE."""
    b, c, h, w = images.shape
    g_h, g_w = h // patch, w // patch
    x = images.reshape(b, c, g_h, patch, g_w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, g_h * g_w, patch * patch * c)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error (B, L, P) over the patches where ``mask`` (B, L) is 1 -> scalar."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAETeacher(_Teacher):
    """Patch-level teacher: MAE with a timm ``VisionTransformer`` encoder (``encoder``).

    Decoder parameters use the official MAE names (``mask_token``, ``decoder_embed``,
    ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``). Both position
    embeddings are fixed 2-D sin-cos. Attributes: ``grid`` (patches per side), ``patch_size``.
    """

    level = "patch"
    kind = "mae"

    def __init__(self, input_size: int = 224, patch_size: int = 16, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__(input_size)
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch_size}")
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.feature_dim = embed_dim
        self.encoder = VisionTransformer(
            img_size=input_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm, class_token=True, num_classes=0, global_pool="",
            weight_init="skip",
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE initialisation: sin-cos positions, xavier linears, N(0, .02) tokens, unit LayerNorms."""
        self.encoder.pos_embed.requires_grad_(False)
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed(self.encoder.embed_dim, self.grid))
            self.decoder_pos_embed.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, 1|3, H, W) -> patch tokens of the full image (B, grid^2, feature_dim), final norm applied."""
        return self.encoder.forward_features(self.prepare(x))[:, self.encoder.num_prefix_tokens:]

    def targets(self, x: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
        """Reconstruction targets (B, L, p*p*3) of slices; per-patch (mean, unbiased var, eps 1e-6) normalised."""
        return self._targets(self.prepare(x), norm_pix)

    def _targets(self, images: torch.Tensor, norm_pix: bool) -> torch.Tensor:
        target = patchify(images, self.patch_size)
        if norm_pix:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def mae_loss(self, x: torch.Tensor, mask_ratio: float = 0.75, norm_pix: bool = True,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked-autoencoder objective on slices (B, 1|3, H, W).

        Each sample masks ``round(L * mask_ratio)`` of its L patches, chosen by the argsort of
        ``noise`` (B, L) (uniform random when None); the encoder sees only the visible ones.

        Returns:
            loss (MSE on masked patches only), pred (B, L, p*p*3), mask (B, L) with 1 = masked.
        """
        images = self.prepare(x)
        enc = self.encoder
        h = enc.patch_embed(images) + enc.pos_embed[:, 1:]  # (B, L, D)
        b, length, dim = h.shape
        keep = length - int(round(length * mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=h.device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        h = torch.gather(h, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(b, length, device=h.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        h = enc.norm(enc.blocks(torch.cat([cls, h], dim=1)))  # (B, 1 + keep, D)

        y = self.decoder_embed(h)  # (B, 1 + keep, Dd)
        filled = torch.cat([y[:, 1:], self.mask_token.expand(b, length - keep, -1)], dim=1)
        filled = torch.gather(filled, 1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], filled], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            y = block(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, L, p*p*3)
        loss = masked_mse(pred, self._targets(images, norm_pix), mask)
        return loss, pred, mask


# ---- Building, loading, saving -----------------------------------------------------------------
def _read(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def _names(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_exact(module: nn.Module, state: dict, what: str, path: str | Path, keys: set[str] | None = None) -> None:
    """Load ``state`` into ``module`` (restricted to ``keys`` when given) with no key missing or extra."""
    expected = set(module.state_dict()) if keys is None else keys
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: {what} keys do not match; missing: {_names(missing)}; unexpected: {_names(unexpected)}"
        )
    try:
        module.load_state_dict(state, strict=keys is None)
    except RuntimeError as err:
        raise ValueError(f"{path}: {what}: {err}") from err


def load_simclr_checkpoint(teacher: SimCLRTeacher, path: str | Path) -> None:
    """Load a converted SimCLRv2 file ``{'resnet': state, 'head': state}`` (head optional), strictly."""
    ckpt = _read(path)
    if not isinstance(ckpt.get("resnet"), dict):
        raise ValueError(f"{path}: not a SimCLRv2 checkpoint (expected {{'resnet': ..., 'head': ...}})")
    _load_exact(teacher.resnet, ckpt["resnet"], "SimCLR resnet", path)
    if isinstance(ckpt.get("head"), dict):
        _load_exact(teacher.head, ckpt["head"], "SimCLR head", path)
    else:
        logger.warning("SimCLR teacher: %s has no 'head'; the projection head starts from random weights", path)
    teacher.checkpoint = str(Path(path).resolve())
    logger.info("SimCLR teacher: loaded %s", path)


def _fit_pos(state: dict, key: str, own: torch.Tensor) -> None:
    pos = state.get(key)
    if pos is not None and pos.ndim == 3 and pos.shape[1] != own.shape[1]:
        grid = int(round((own.shape[1] - 1) ** 0.5))
        state[key] = resample_abs_pos_embed(pos.float(), [grid, grid], num_prefix_tokens=1).to(pos.dtype)
        logger.info("MAE teacher: resampled %s from %s to %s", key, tuple(pos.shape), tuple(state[key].shape))


def load_mae_checkpoint(teacher: MAETeacher, path: str | Path) -> None:
    """Load an official MAE file (``{'model': state}`` or a bare state): encoder strictly, decoder if present."""
    state = _read(path)
    state = dict(state["model"]) if isinstance(state.get("model"), dict) else dict(state)
    decoder = {k: state.pop(k) for k in list(state) if k == "mask_token" or k.startswith("decoder_")}
    _fit_pos(state, "pos_embed", teacher.encoder.pos_embed)
    _load_exact(teacher.encoder, state, "MAE encoder", path)
    if decoder:
        _fit_pos(decoder, "decoder_pos_embed", teacher.decoder_pos_embed)
        own = {k for k in teacher.state_dict() if not k.startswith("encoder.")}
        _load_exact(teacher, decoder, "MAE decoder", path, keys=own)
    else:
        logger.warning("MAE teacher: %s holds no decoder; the decoder starts from random weights", path)
    teacher.checkpoint = str(Path(path).resolve())
    logger.info("MAE teacher: loaded %s", path)


def save_teacher(teacher: SimCLRTeacher | MAETeacher, path: str | Path) -> None:
    """Write a teacher in its official container format (what the loaders read), atomically."""
    if isinstance(teacher, SimCLRTeacher):
        payload: dict = {"resnet": teacher.resnet.state_dict(), "head": teacher.head.state_dict()}
    else:
        own = {k: v for k, v in teacher.state_dict().items() if not k.startswith("encoder.")}
        payload = {"model": {**teacher.encoder.state_dict(), **own}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def freeze(teacher: nn.Module) -> nn.Module:
    """Switch a teacher to eval mode with no trainable parameters; returns it."""
    teacher.requires_grad_(False)
    return teacher.eval()


def build_teacher(kind: str, config: str = "official", checkpoint: str | Path | None = None,
                  img_size: int | None = None, fallbacks: Sequence[str | Path | None] = ()) -> SimCLRTeacher | MAETeacher:
    """Build a teacher in eval mode; ``teacher.checkpoint`` records the file it was loaded from.

    Args:
        kind: ``'simclr'`` (image level) or ``'mae'`` (patch level).
        config: ``'official'`` (r50_2x_sk1 / MAE ViT-L/16) or ``'tiny'`` (small, random, for tests/CPU).
        checkpoint: official-format file to load (see :func:`load_simclr_checkpoint`,
            :func:`load_mae_checkpoint`); it must exist.
        img_size: input side the slices are resized to (default 224, tiny 64).
        fallbacks: without ``checkpoint``, the first of these files that exists is loaded (stage 1:
            the continually pre-trained teacher, then the official initial weights); when none
            exists the teacher starts from random weights.
    """
    if not checkpoint:
        checkpoint = next((path for path in fallbacks if path and Path(path).is_file()), None)
    if kind not in TEACHER_CONFIGS:
        raise ValueError(f"unknown teacher {kind!r}; choose one of {sorted(TEACHER_CONFIGS)}")
    if config not in TEACHER_CONFIGS[kind]:
        raise ValueError(f"unknown {kind} configuration {config!r}; choose one of {sorted(TEACHER_CONFIGS[kind])}")
    kwargs = dict(TEACHER_CONFIGS[kind][config])
    if img_size:
        kwargs["input_size"] = int(img_size)
    teacher = SimCLRTeacher(**kwargs) if kind == "simclr" else MAETeacher(**kwargs)
    if checkpoint:
        (load_simclr_checkpoint if kind == "simclr" else load_mae_checkpoint)(teacher, checkpoint)
    else:
        logger.warning("%s teacher (%s): no checkpoint given, starting from random weights", kind, config)
    teacher.checkpoint = str(checkpoint) if checkpoint else None
    return teacher.eval()
