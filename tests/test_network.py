"""Prompt-free decoder and the assembled network: shapes, trainable sets, state dicts."""

from __future__ import annotations

import pytest
import torch

from samora_components.networks.backbones import build_backbone
from samora_components.networks.decoders import PromptFreeDecoder
from samora_components.networks.samora_net import SAMoraNet


def test_decoder_shapes_and_class_tokens():
    bb = build_backbone("tiny_vit", checkpoint="")
    dec = PromptFreeDecoder(5, 32, bb.prompt_encoder, depth=1, mlp_dim=64, num_heads=2)
    assert dec.mask_decoder.num_mask_tokens == 5  # one token per class, background included
    assert len(dec.mask_decoder.output_hypernetworks_mlps) == 5
    out = dec(torch.rand(3, 32, 4, 6))
    assert out.shape == (3, 5, 16, 24)  # 4x the embedding grid
    with pytest.raises(ValueError):
        PromptFreeDecoder(1, 32, bb.prompt_encoder)


def test_decoder_is_batch_independent():
    bb = build_backbone("tiny_vit", checkpoint="")
    dec = PromptFreeDecoder(3, 32, bb.prompt_encoder, depth=1, mlp_dim=64, num_heads=2).eval()
    emb = torch.rand(4, 32, 4, 4)
    with torch.no_grad():
        together = dec(emb)
        alone = torch.cat([dec(emb[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_decoder_takes_transformer_and_upscaling_from_checkpoint():
    bb = build_backbone("litemedsam", img_size=64)
    net = SAMoraNet(4, backbone="litemedsam", img_size=64, method="frozen")
    dec = net.decoder.mask_decoder
    for key, value in bb.decoder_weights.items():
        assert torch.equal(dec.state_dict()[key], value), key


@pytest.mark.parametrize("method", ["samed", "samora", "frozen"])
def test_network_io_and_trainable_sets(method):
    net = SAMoraNet(4, backbone="tiny_tinyvit", img_size=64, checkpoint="", method=method)
    x = torch.rand(2, 1, 50, 70)  # any slice size: resized in and out
    y = net(x)
    assert y.shape == (2, 4, 50, 70)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("decoder.mask_decoder.") or ".expert." in n or ".fusion." in n or n.endswith(".gate") for n in names)
    if method == "samed":
        assert any(".expert." in n for n in names)
    if method == "samora":
        assert any(".fusion." in n for n in names) and not any(".experts." in n for n in names)
    if method == "frozen":
        assert all(n.startswith("decoder.") for n in names)
    y.sum().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if not p.requires_grad)


def test_state_dict_holds_only_what_training_changes(tmp_path):
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samed")
    state = net.state_dict()
    assert not any(k.startswith("decoder.prompt.") for k in state)
    assert not any(".qkv.base." in k or k.endswith("patch_embed.proj.weight") for k in state)
    assert any(".expert.b_q" in k for k in state)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    other = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samed")
    other.encoder.load_state_dict(net.encoder.state_dict())  # same frozen base (random here)
    other.decoder.prompt.load_state_dict(net.decoder.prompt.state_dict())
    result = other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(1, 1, 64, 64)
    net.eval(), other.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), other(x))


def test_train_mode_keeps_frozen_batchnorm_statistics():
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samed").train()
    bns = [m for m in net.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    net(torch.rand(2, 1, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert net.decoder.mask_decoder.training


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="hsam2")
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="")
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 2, 64, 64))


def test_network_from_card_follows_every_architecture_key():
    """Inference builds the network its card describes: keys absent from the card keep the
    constructor's defaults, and a card with the authors' gate setting gets the LayerNorm too."""
    card = {"num_classes": 3, "backbone": "tiny_vit", "backbone_checkpoint": "", "method": "samora",
            "expert_levels": ["image", "patch"], "gate_init": 1.0, "fusion_norm": True, "fusion_width": 16}
    trained = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samora", levels=["image", "patch"],
                        scratch_levels=["image", "patch"], gate_init=1.0, fusion_norm=True, fusion_width=16)
    rebuilt = SAMoraNet.from_card(card, precision="fp32")
    assert rebuilt.precision == "fp32" and rebuilt.fit_windows is False
    result = rebuilt.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert any(".fusion_norm.weight" in k for k in trained.state_dict())
