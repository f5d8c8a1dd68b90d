"""LoRA on fused qkv projections: layouts, initialisation, expert files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samora_components.networks.backbones import build_backbone
from samora_components.networks.lora import (
    LoRAExpert,
    LoRAQKV,
    load_expert,
    qkv_rows,
    read_expert_metadata,
    save_expert,
)


def _rows_by_probe(attn, which: int) -> torch.Tensor:
    """Rows of qkv that feed q (0), k (1) or v (2), found by running the module's own split."""
    out = attn.qkv.out_features
    marker = torch.arange(out, dtype=torch.float32)
    if hasattr(attn, "key_dim"):  # TinyViT: view(B, N, heads, -1).split([kd, kd, d])
        parts = marker.view(1, 1, attn.num_heads, -1).split([attn.key_dim, attn.key_dim, attn.d], dim=3)
    else:  # SAM ViT: reshape(B, N, 3, heads, -1)
        parts = marker.view(1, 1, 3, attn.num_heads, -1).unbind(2)
    return parts[which].flatten().long()


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_tinyvit", "litemedsam"])
def test_qkv_rows_match_the_attention_split(name):
    bb = build_backbone(name, img_size=64 if name.startswith("tiny") else 256, checkpoint=None if name == "litemedsam" else "")
    for attn in bb.attention_sites():
        rows = qkv_rows(attn, bb.attention_layout)
        assert torch.equal(rows.q, _rows_by_probe(attn, 0))
        assert torch.equal(rows.k, _rows_by_probe(attn, 1))
        assert torch.equal(rows.v, _rows_by_probe(attn, 2))


def test_init_b_zero_a_kaiming_and_identity_at_start():
    e = LoRAExpert(32, 32, 32, rank=4)
    assert torch.count_nonzero(e.b_q) == 0 and torch.count_nonzero(e.b_v) == 0
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt 5) on fan_in 32
    assert e.a_q.abs().max() <= bound and e.a_q.std() > bound / 4
    bb = build_backbone("tiny_tinyvit", checkpoint="")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = bb.encoder(x)
        for attn in bb.attention_sites():
            attn.qkv = LoRAQKV(attn.qkv, qkv_rows(attn, bb.attention_layout), 4)
        assert torch.equal(bb.encoder(x), ref)  # B = 0: adapted encoder equals the base


def test_update_touches_only_q_and_v_rows():
    bb = build_backbone("tiny_tinyvit", checkpoint="")
    attn = bb.attention_sites()[0]
    rows = qkv_rows(attn, bb.attention_layout)
    layer = LoRAQKV(attn.qkv, rows, 4)
    torch.nn.init.normal_(layer.expert.b_q)
    torch.nn.init.normal_(layer.expert.b_v)
    delta = layer.delta_weight()
    changed = delta.abs().sum(dim=1) > 0
    assert changed[rows.q].all() and changed[rows.v].all() and not changed[rows.k].any()
    x = torch.rand(3, 5, attn.qkv.in_features)
    dq, dv = layer.expert.deltas(x)
    full = layer(x) - attn.qkv(x)
    assert torch.allclose(full[..., rows.q], dq, atol=1e-5) and torch.allclose(full[..., rows.v], dv, atol=1e-5)


def test_expert_file_round_trip_and_effect(tmp_path):
    bb = build_backbone("tiny_vit", checkpoint="")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        base = bb.encoder(x)
    base_state = {k: v.clone() for k, v in bb.encoder.state_dict().items()}
    layers = []
    for attn in bb.attention_sites():
        attn.qkv = LoRAQKV(attn.qkv, qkv_rows(attn, bb.attention_layout), 4)
        layers.append(attn.qkv)
        torch.nn.init.normal_(attn.qkv.expert.b_q, std=0.5)
        torch.nn.init.normal_(attn.qkv.expert.b_v, std=0.5)
    meta = {"backbone": "tiny_vit", "level": "patch", "img_size": 64, "targets": ["qkv.q", "qkv.v"]}
    path = tmp_path / "lora_patch.safetensors"
    save_expert([l.expert for l in layers], path, meta)
    read = read_expert_metadata(path)
    assert read["level"] == "patch" and read["rank"] == 4 and read["num_sites"] == 2 and read["targets"] == ["qkv.q", "qkv.v"]
    # a fresh encoder with fresh experts: loading the file changes its output
    fresh = build_backbone("tiny_vit", checkpoint="")
    fresh.encoder.load_state_dict(base_state)
    fresh_layers = []
    for attn in fresh.attention_sites():
        attn.qkv = LoRAQKV(attn.qkv, qkv_rows(attn, bb.attention_layout), 4)
        fresh_layers.append(attn.qkv)
    with torch.no_grad():
        assert torch.allclose(fresh.encoder(x), base, atol=1e-6)
        load_expert(path, [l.expert for l in fresh_layers])
        adapted = fresh.encoder(x)
        assert not torch.allclose(adapted, base, atol=1e-3)
        assert torch.allclose(adapted, bb.encoder(x), atol=1e-5)
    with pytest.raises(ValueError, match="sites"):
        load_expert(path, [fresh_layers[0].expert])
    assert not list(tmp_path.glob("*.partial"))


def test_inference_keeps_the_merged_weight_until_a_weight_changes():
    bb = build_backbone("tiny_tinyvit", checkpoint="")
    attn = bb.attention_sites()[0]
    layer = LoRAQKV(attn.qkv, qkv_rows(attn, bb.attention_layout), 4).eval()
    x = torch.rand(2, 5, attn.qkv.in_features)
    with torch.no_grad():
        first = layer(x)
        kept = layer.merged_weight()
        assert layer.merged_weight() is kept  # nothing changed: the same tensor
        torch.nn.init.normal_(layer.expert.b_q)  # an in-place change (as an optimizer step or a load)
        assert layer.merged_weight() is not kept
        changed = layer(x)
    assert not torch.allclose(first, changed)
    exact = F.linear(x, attn.qkv.weight + layer.delta_weight(), attn.qkv.bias)
    assert torch.allclose(changed, exact, atol=1e-6)
    layer.train()
    out = layer(x)  # training: merged on the fly, gradients reach the expert
    out.sum().backward()
    assert layer.expert.b_q.grad is not None and layer.expert.a_v.grad is not None


def test_a_train_eval_switch_drops_the_merged_weight():
    """Optimizers that update in place without a version bump (fused AdamW) are covered by the
    train()/eval() switch every evaluation makes."""
    bb = build_backbone("tiny_tinyvit", checkpoint="")
    attn = bb.attention_sites()[0]
    layer = LoRAQKV(attn.qkv, qkv_rows(attn, bb.attention_layout), 4).eval()
    x = torch.rand(2, 5, attn.qkv.in_features)
    with torch.no_grad():
        layer(x)
        layer.expert.b_q.data.normal_()  # through .data: no version bump
        layer.train().eval()
        assert torch.allclose(layer(x), F.linear(x, attn.qkv.weight + layer.delta_weight(), attn.qkv.bias), atol=1e-6)
    with torch.inference_mode():  # built and run as inference tensors (no version counter): nothing is kept
        inner = build_backbone("tiny_tinyvit", checkpoint="").attention_sites()[0]
        built = LoRAQKV(inner.qkv, qkv_rows(inner, bb.attention_layout), 4).eval()
        assert torch.equal(built(x), built(x)) and built._merged is None
