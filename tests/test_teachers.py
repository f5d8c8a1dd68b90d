"""Teachers: official checkpoint layouts, shapes, NT-Xent, MAE masking/objective, short CPT runs."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from samora_components.networks.teachers import (
    MAETeacher,
    SimCLRTeacher,
    build_teacher,
    freeze,
    load_mae_checkpoint,
    load_simclr_checkpoint,
    masked_mse,
    nt_xent,
    patchify,
    save_teacher,
    sincos_pos_embed,
)

LOGGER = "samora_components.networks.teachers"


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests are small: one intra-op thread is fastest and keeps the timing of others on the machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- layouts written from the documented checkpoint formats, independently of the classes ----
def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def simclr_layout(blocks=(3, 4, 6, 3), width=2, sk_ratio=0.0625, base=64) -> tuple[dict, dict]:
    """Key -> shape of SimCLRv2-Pytorch's ``resnet`` and ``head`` state dicts."""
    r: dict[str, tuple[int, ...]] = {}
    c = base * width
    if sk_ratio > 0:
        r["net.0.0.weight"] = (c // 2, 3, 3, 3)
        r |= _bn("net.0.1.0", c // 2)
        r["net.0.2.weight"] = (c // 2, c // 2, 3, 3)
        r |= _bn("net.0.3.0", c // 2)
        r["net.0.4.weight"] = (c, c // 2, 3, 3)
        r |= _bn("net.0.5.0", c)
    else:
        r["net.0.0.weight"] = (c, 3, 7, 7)
        r |= _bn("net.0.1.0", c)
    cin = c
    for stage, n in enumerate(blocks, start=1):
        ch = c * 2 ** (stage - 1)
        for b in range(n):
            p = f"net.{stage}.blocks.{b}"
            if b == 0:
                r[f"{p}.projection.shortcut{'.2' if sk_ratio > 0 else ''}.weight"] = (4 * ch, cin, 1, 1)
                r |= _bn(f"{p}.projection.bn.0", 4 * ch)
            r[f"{p}.net.0.weight"] = (ch, cin if b == 0 else 4 * ch, 1, 1)
            r |= _bn(f"{p}.net.1.0", ch)
            if sk_ratio > 0:
                mid = max(int(ch * sk_ratio), 32)
                r[f"{p}.net.2.main_conv.0.weight"] = (2 * ch, ch, 3, 3)
                r |= _bn(f"{p}.net.2.main_conv.1.0", 2 * ch)
                r[f"{p}.net.2.mixing_conv.0.weight"] = (mid, ch, 1, 1)
                r |= _bn(f"{p}.net.2.mixing_conv.1.0", mid)
                r[f"{p}.net.2.mixing_conv.2.weight"] = (2 * ch, mid, 1, 1)
                last = 3
            else:
                r[f"{p}.net.2.weight"] = (ch, ch, 3, 3)
                r |= _bn(f"{p}.net.3.0", ch)
                last = 4
            r[f"{p}.net.{last}.weight"] = (4 * ch, ch, 1, 1)
            r |= _bn(f"{p}.net.{last + 1}.0", 4 * ch)
        cin = 4 * ch
    r["fc.weight"], r["fc.bias"] = (1000, cin), (1000,)
    h = {"layers.0.weight": (cin, cin), **_bn("layers.1", cin), "layers.3.weight": (cin, cin), **_bn("layers.4", cin),
         "layers.6.weight": (128, cin), **_bn("layers.7", 128)}
    return r, h


def _block_layout(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.qkv.bias": (3 * d,), f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,), f"{prefix}.mlp.fc1.weight": (4 * d, d),
            f"{prefix}.mlp.fc1.bias": (4 * d,), f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}


def mae_layout(decoder: bool, d=1024, depth=24, grid=14, patch=16, dd=512, ddepth=8) -> dict:
    """Key -> shape of the official MAE ViT-L/16 ``model`` dict (encoder, optionally decoder)."""
    s = {"cls_token": (1, 1, d), "pos_embed": (1, grid * grid + 1, d), "patch_embed.proj.weight": (d, 3, patch, patch),
         "patch_embed.proj.bias": (d,)}
    for i in range(depth):
        s |= _block_layout(f"blocks.{i}", d)
    s |= {"norm.weight": (d,), "norm.bias": (d,)}
    if decoder:
        s |= {"mask_token": (1, 1, dd), "decoder_pos_embed": (1, grid * grid + 1, dd),
              "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,)}
        for i in range(ddepth):
            s |= _block_layout(f"decoder_blocks.{i}", dd)
        s |= {"decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
              "decoder_pred.weight": (patch * patch * 3, dd), "decoder_pred.bias": (patch * patch * 3,)}
    return s


def fake_state(*layouts: dict) -> list[dict]:
    """Distinct random tensors of the given shapes, all views into one storage (small files)."""
    sizes = [math.prod(s) for layout in layouts for s in layout.values()]
    base = torch.randn(max(sizes) + 10007)
    out, i = [], 0
    for layout in layouts:
        state = {}
        for key, shape in layout.items():
            i += 1
            if key.endswith("num_batches_tracked"):
                state[key] = torch.tensor(i, dtype=torch.long)
                continue
            n = math.prod(shape)
            offset = (i * 7919) % (base.numel() - n + 1)
            state[key] = base[offset:offset + n].view(shape)
        out.append(state)
    return out


def _meta_teacher(kind: str, **kwargs):
    with torch.device("meta"):
        teacher = build_teacher(kind, **kwargs)
    return teacher.to_empty(device="cpu")


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---- official layouts -------------------------------------------------------------------------
@pytest.mark.parametrize("depth,width,sk", [(50, 2, 0.0625), (101, 1, 0.0625), (152, 3, 0.0), (50, 1, 0.0)])
def test_simclr_module_layout_matches_the_conversion(depth, width, sk):
    with torch.device("meta"):
        t = SimCLRTeacher(depth, width, sk)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[depth]
    resnet, head = simclr_layout(blocks, width, sk)
    assert _shapes(t.resnet) == resnet
    assert _shapes(t.head) == head
    assert t.feature_dim == 2048 * width


def test_simclr_r50_2x_sk1_checkpoint_loads_strictly(tmp_path):
    resnet_layout, head_layout = simclr_layout()
    resnet, head = fake_state(resnet_layout, head_layout)
    path = tmp_path / "r50_2x_sk1.pth"
    torch.save({"resnet": resnet, "head": head}, path)
    t = _meta_teacher("simclr")
    n_backbone = sum(p.numel() for n, p in t.resnet.named_parameters() if not n.startswith("fc."))
    assert round(n_backbone / 1e6) == 140  # SimCLRv2 table 1: R50 (2x+SK) has 140 M parameters
    load_simclr_checkpoint(t, path)
    for module, state in ((t.resnet, resnet), (t.head, head)):
        own = module.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state.items())
    assert t.checkpoint.endswith("r50_2x_sk1.pth")

    del resnet["net.4.blocks.2.net.2.mixing_conv.2.weight"]
    resnet["net.9.extra"] = torch.zeros(1)
    torch.save({"resnet": resnet}, path)
    missing = r"missing: net\.4\.blocks\.2\.net\.2\.mixing_conv\.2\.weight.*unexpected: net\.9\.extra"
    with pytest.raises(ValueError, match=missing):
        load_simclr_checkpoint(t, path)


def test_simclr_checkpoint_without_head_keeps_a_random_head(tmp_path, caplog):
    t = build_teacher("simclr", "tiny")
    head_before = {k: v.clone() for k, v in t.head.state_dict().items()}
    src = build_teacher("simclr", "tiny")
    torch.save({"resnet": src.resnet.state_dict()}, tmp_path / "r.pth")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_simclr_checkpoint(t, tmp_path / "r.pth")
    assert "head starts from random" in caplog.text
    assert all(torch.equal(t.head.state_dict()[k], v) for k, v in head_before.items())
    assert torch.equal(t.resnet.net[0][0].weight, src.resnet.net[0][0].weight)


@pytest.mark.parametrize("with_decoder", [False, True])
def test_mae_vit_large_checkpoint_loads(tmp_path, caplog, with_decoder):
    (state,) = fake_state(mae_layout(with_decoder))
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    t = _meta_teacher("mae")
    with torch.no_grad():
        t.mask_token.fill_(0.25)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_mae_checkpoint(t, path)
    own = {**{f"encoder.{k}": v for k, v in t.encoder.state_dict().items()}, **t.state_dict()}
    assert all(torch.equal(own[k if k.startswith(("mask_token", "decoder_")) else f"encoder.{k}"], v)
               for k, v in state.items())
    assert ("decoder starts from random" in caplog.text) is (not with_decoder)
    if not with_decoder:
        assert torch.all(t.mask_token == 0.25)


def test_mae_checkpoint_errors_and_round_trip(tmp_path):
    src = build_teacher("mae", "tiny")
    save_teacher(src, tmp_path / "mae_tiny.pth")
    t = build_teacher("mae", "tiny", checkpoint=tmp_path / "mae_tiny.pth")
    assert all(torch.equal(t.state_dict()[k], v) for k, v in src.state_dict().items())
    state = torch.load(tmp_path / "mae_tiny.pth", weights_only=True)["model"]
    del state["blocks.1.mlp.fc2.bias"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"MAE encoder keys do not match; missing: blocks\.1\.mlp\.fc2\.bias"):
        load_mae_checkpoint(t, tmp_path / "bad.pth")
    # a 64-px checkpoint into a 96-px teacher: position embeddings are resampled to the 6 x 6 grid
    big = build_teacher("mae", "tiny", checkpoint=tmp_path / "mae_tiny.pth", img_size=96)
    assert big.grid == 6 and big.encoder.pos_embed.shape == (1, 37, 64)
    assert torch.equal(big.encoder.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)


def test_simclr_round_trip_through_build(tmp_path):
    src = build_teacher("simclr", "tiny")
    with torch.no_grad():
        src.head.layers[7].bias.add_(1.0)
    save_teacher(src, tmp_path / "s.pth")
    t = build_teacher("simclr", "tiny", checkpoint=tmp_path / "s.pth")
    assert all(torch.equal(t.state_dict()[k], v) for k, v in src.state_dict().items())
    wider = SimCLRTeacher(blocks=(1, 1, 1, 1), width=2, base_width=16, input_size=64)  # same keys, other shapes
    with pytest.raises(ValueError, match="size mismatch for net.0.0.weight"):
        load_simclr_checkpoint(wider, tmp_path / "s.pth")


# ---- construction, inputs, shapes ------------------------------------------------------------
def test_official_shapes_on_meta():
    with torch.device("meta"):
        s, m = build_teacher("simclr"), build_teacher("mae")
        x = torch.empty(2, 1, 256, 200)
        assert s.pooled(x).shape == (2, 4096) and s.project(x).shape == (2, 128)
        assert m.tokens(x).shape == (2, 196, 1024)
        _, pred, mask = m.mae_loss(x)
        assert pred.shape == (2, 196, 768) and mask.shape == (2, 196)
    assert (s.feature_dim, m.feature_dim, m.input_size, m.grid, s.input_size) == (4096, 1024, 224, 14, 224)
    assert sum(p.numel() for p in m.encoder.parameters()) == pytest.approx(303.3e6, rel=1e-3)  # ViT-L/16


def test_tiny_shapes_modes_and_freeze():
    s, m = build_teacher("simclr", "tiny"), build_teacher("mae", "tiny")
    assert not s.training and not m.training
    x = torch.rand(3, 1, 50, 70)
    assert s.pooled(x).shape == (3, s.feature_dim) and s.project(x).shape == (3, 128)
    assert m.tokens(x).shape == (3, m.grid**2, 64) and m.grid == 4
    m.train()
    assert freeze(m) is m and not m.training and not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        MAETeacher(input_size=70, embed_dim=32, depth=1, num_heads=1, decoder_dim=16, decoder_depth=1, decoder_heads=1)
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("dino")


def test_inputs_are_repeated_resized_and_normalised():
    s, m = build_teacher("simclr", "tiny"), build_teacher("mae", "tiny")
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(s.prepare(x), x.repeat(1, 3, 1, 1))  # SimCLR: raw [0, 1] RGB
    torch.testing.assert_close(s.pooled(x), s.pooled(x.repeat(1, 3, 1, 1)))
    y = torch.rand(2, 3, 100, 90)
    torch.testing.assert_close(s.prepare(y), F.interpolate(y, size=(64, 64), mode="bilinear", antialias=False))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(m.prepare(torch.full((1, 1, 64, 64), 0.5))[0, :, 0, 0], (0.5 - mean) / std)
    with pytest.raises(ValueError, match="1 or 3"):
        s.pooled(torch.rand(2, 2, 64, 64))


def test_sincos_position_embedding_is_mae_s():
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    emb = sincos_pos_embed(64, 5)
    assert emb.shape == (1, 26, 64) and torch.all(emb[0, 0] == 0)
    torch.testing.assert_close(emb[:, 1:], build_sincos_position_embedding(5, 64, spatial_dims=2).data)
    # token 1 is (row 0, col 1): the first half encodes the column, the second the row
    assert emb[0, 2, 0] == pytest.approx(math.sin(1.0)) and emb[0, 2, 32] == 0.0
    m = build_teacher("mae", "tiny")
    assert torch.equal(m.encoder.pos_embed, sincos_pos_embed(64, 4)) and not m.encoder.pos_embed.requires_grad
    assert torch.equal(m.decoder_pos_embed, sincos_pos_embed(32, 4)) and not m.decoder_pos_embed.requires_grad


# ---- NT-Xent ----------------------------------------------------------------------------------
def test_nt_xent_hand_computed_two_samples():
    z1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scale must not matter (cosine similarity)
    z2 = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    t = 0.5
    e = math.exp(1 / t)
    # anchors a1,a2,b1,b2 = x,y,x,x: positives have similarity 1,0,1,0; each denominator skips the anchor itself
    expected = (2 * (math.log(1 + 2 * e) - 1 / t) + math.log(3) + math.log(1 + 2 * e)) / 4
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16)) < nt_xent(z, torch.randn(8, 16)) - 1.0
    s = build_teacher("simclr", "tiny")
    x = torch.rand(6, 1, 64, 64)
    with torch.no_grad():
        assert s.contrastive_loss(x, x) < s.contrastive_loss(x, torch.rand(6, 1, 64, 64).flip(0))


# ---- MAE objective ----------------------------------------------------------------------------
def test_mae_mask_counts_follow_the_noise():
    m = build_teacher("mae", "tiny", img_size=224)  # L = 196
    noise = torch.rand(3, 196)
    _, _, mask = m.mae_loss(torch.rand(3, 1, 224, 224), noise=noise)
    assert mask.sum(1).tolist() == [147.0] * 3  # round(196 * 0.75)
    rank = noise.argsort(1).argsort(1)
    assert torch.equal(mask.bool(), rank >= 49)  # the 49 lowest-noise patches stay visible
    _, _, mask = build_teacher("mae", "tiny").mae_loss(torch.rand(4, 1, 64, 64), mask_ratio=0.5)
    assert mask.sum(1).tolist() == [8.0] * 4 and not torch.equal(mask[0], mask[1])


def test_mae_loss_sees_only_visible_pixels_and_scores_only_masked_patches():
    m = build_teacher("mae", "tiny")
    x = torch.rand(2, 1, 64, 64)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m.mae_loss(x, noise=noise)
        torch.testing.assert_close(loss, masked_mse(pred, m.targets(x), mask))
        masked = int(mask[0].nonzero()[0])
        visible = int((mask[0] == 0).nonzero()[0])
        r, c = divmod(masked, 4)
        x_m = x.clone()
        x_m[0, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = torch.rand(1, 16, 16)
        loss_m, pred_m, _ = m.mae_loss(x_m, noise=noise)
        assert torch.allclose(pred_m, pred, atol=1e-6, rtol=0)  # the encoder never saw the masked patch
        assert loss_m != loss  # ... but its target changed
        r, c = divmod(visible, 4)
        x_v = x.clone()
        x_v[0, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = torch.rand(1, 16, 16)
        assert not torch.allclose(m.mae_loss(x_v, noise=noise)[1][0], pred[0])  # visible pixels do matter
    # predictions on visible patches carry no loss
    garbage = pred + 100.0 * (1 - mask)[..., None]
    assert masked_mse(garbage, m.targets(x), mask) == masked_mse(pred, m.targets(x), mask)


def test_targets_patch_order_and_norm_pix():
    img = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    p = patchify(img, 16)
    assert p.shape == (2, 4, 768)
    b, c, i, j, r, q = 1, 2, 1, 0, 5, 7  # patch (row 1, col 0), pixel (5, 7), channel 2
    assert p[b, i * 2 + j, (r * 16 + q) * 3 + c] == img[b, c, i * 16 + r, j * 16 + q]
    m = build_teacher("mae", "tiny")
    x = torch.rand(2, 1, 64, 64)
    t = m.targets(x, norm_pix=True)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(m.targets(x, norm_pix=False), patchify(m.prepare(x), 16))


# ---- short continual pre-training ----------------------------------------------------------------
def _smooth_slices(n: int, size: int = 64) -> torch.Tensor:
    """Smooth intensity fields (bicubic from 2 x 2 random values) in [0, 1]."""
    return F.interpolate(torch.rand(n, 1, 2, 2), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_thirty_adam_steps_lower_both_objectives():
    x = _smooth_slices(8)
    m = build_teacher("mae", "tiny").train()
    noise = torch.rand(8, 16)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(30):
        loss = m.mae_loss(x, noise=noise)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.7 * losses[0]

    s = build_teacher("simclr", "tiny").train()
    view2 = (x.flip(-1) + 0.05 * torch.randn_like(x)).clamp(0, 1)
    opt = torch.optim.Adam(s.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = s.contrastive_loss(x, view2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.7 * losses[0]
