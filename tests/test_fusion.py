"""The SAMora block: expert variants, HL-Attn order, gate, ablations and fusion baselines."""

from __future__ import annotations

import pytest
import torch

from samora_components.networks import fusion as fusion_module
from samora_components.networks.fusion import (
    HLAttn,
    LACFusion,
    LoRAHubFusion,
    MoLEFusion,
    SingleExpertFusion,
    attend,
    parse_order,
)
from samora_components.networks.lora import LEVELS, LoRAQKV, qkv_rows
from samora_components.networks.samora_net import SAMoraNet


def _randomise_experts(net: SAMoraNet, std: float = 0.3) -> None:
    with torch.no_grad():
        for site in net.sites:
            for e in site.experts.values():
                e.b_q.normal_(std=std)
                e.b_v.normal_(std=std)


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_tinyvit"])
def test_gate_zero_gives_the_frozen_encoder(backbone):
    ref = SAMoraNet(3, backbone=backbone, checkpoint="", method="frozen").eval()
    net = SAMoraNet(3, backbone=backbone, checkpoint="", method="samora").eval()
    net.encoder.load_state_dict({k.replace(".attn.", ".attn.base."): v for k, v in ref.encoder.state_dict().items()}, strict=False)
    _randomise_experts(net)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.embed(x), ref.embed(x), atol=1e-5)
        for site in net.sites:
            site.gate.fill_(1.0)
        assert not torch.allclose(net.embed(x), ref.embed(x), atol=1e-3)


@pytest.mark.parametrize("kernel", ["reference", "fused", "chunked"])
@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_tinyvit", "litemedsam"])
def test_expert_deltas_equal_separately_adapted_attention(backbone, kernel):
    """d_e from the batched call equals Attn with the expert merged into qkv, minus base Attn."""
    size = 64
    net = SAMoraNet(3, backbone=backbone, img_size=size, checkpoint=None if backbone == "litemedsam" else "",
                    method="samora", attention_kernel=kernel).eval()
    assert all(site.kernel == kernel for site in net.sites)
    _randomise_experts(net, std=0.5)
    captured = {}
    site = net.sites[-1]

    class Grab(torch.nn.Module):  # the chunked kernel calls the fusion once per image chunk
        def forward(self, deltas, context):
            for key, value in deltas.items():
                captured[key] = torch.cat([captured[key], value]) if key in captured else value.clone()
            return deltas["image"]

    site.fusion = Grab()
    inputs = {}
    site.register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0].clone()))
    with torch.no_grad():
        net.embed(torch.rand(2, 3, size, size))
        x = inputs["x"]
        base = site.base
        a0 = base(x)
        for level in LEVELS:
            adapted = LoRAQKV(base.qkv, qkv_rows(base, site.layout), 4)
            adapted.expert.load_state_dict(site.experts[level].state_dict())
            original, base.qkv = base.qkv, adapted
            expected = base(x) - a0
            base.qkv = original
            got = captured[level].view_as(expected)
            assert torch.allclose(got, expected, atol=1e-5), (level, (got - expected).abs().max())


def test_fusion_orders():
    assert parse_order("2-1-1") == [("patch", "pixel"), ("image", "h")]
    assert parse_order("1-2-1") == [("image", "pixel"), ("patch", "h")]
    assert parse_order("1-1-2") == [("image", "patch"), ("pixel", "h")]
    assert parse_order("2-1-1", ("pixel", "image")) == [("image", "pixel")]
    with pytest.raises(ValueError):
        parse_order("1-1-1")


def test_hl_attn_follows_the_order():
    dim = 16
    deltas = {lv: torch.randn(2, 5, dim) for lv in LEVELS}
    fusion = HLAttn(dim, LEVELS, "2-1-1", width=8, heads=2)
    step1, step2 = fusion.cross
    h1 = deltas["patch"] + step1(deltas["patch"], deltas["pixel"])
    expected = deltas["image"] + step2(deltas["image"], h1)
    assert torch.allclose(fusion(deltas, None), expected)
    other = HLAttn(dim, LEVELS, "1-1-2", width=8, heads=2)
    other.load_state_dict(fusion.state_dict())
    assert not torch.allclose(other(deltas, None), expected)


def test_hl_attn_is_the_same_with_and_without_gradients(monkeypatch):
    """Inference runs the fused attention kernel, training on CPUs the explicit product: same numbers."""
    calls = []
    fused = fusion_module.F.scaled_dot_product_attention
    monkeypatch.setattr(fusion_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    deltas = {lv: torch.randn(3, 49, 32) for lv in LEVELS}
    fusion = HLAttn(32, LEVELS, "2-1-1", width=16, heads=4)
    trained = fusion(deltas, None)
    assert not calls  # gradients on a CPU: the explicit product
    with torch.no_grad():
        q, k, v = torch.randn(3, 2, 3, 49, 8).unbind(0)
        explicit = ((q * 8**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        assert torch.allclose(attend(q, k, v), explicit, atol=1e-5)
        assert torch.allclose(fusion(deltas, None), trained, atol=1e-5)
        assert len(calls) == 1 + len(fusion.cross)  # attend, then each cross-attention step
    with torch.inference_mode():
        assert torch.allclose(fusion(deltas, None), trained, atol=1e-5)
    assert len(calls) == 1 + 2 * len(fusion.cross)


def test_vit_b_budget_matches_paper_table_3():
    """SAMora adds 9.7 M +/- 15 % parameters over SAMed on ViT-B at 224 (118.5 M vs 108.8 M)."""
    samed = SAMoraNet(9, backbone="sam_vit_b", img_size=224, checkpoint="", method="samed")
    samora = SAMoraNet(9, backbone="sam_vit_b", img_size=224, checkpoint="", method="samora")
    delta = sum(p.numel() for p in samora.parameters()) - sum(p.numel() for p in samed.parameters())
    assert 9.7e6 * 0.85 <= delta <= 9.7e6 * 1.15, delta


def test_only_fusion_and_decoder_train_in_stage_2():
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samora")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert name.startswith("decoder.mask_decoder.") or ".fusion." in name or name.endswith(".gate"), name
    assert not any(".experts." in n or ".base." in n for n in trainable)


@pytest.mark.parametrize(
    "fusion,levels,kind",
    [
        ("hl_attn", ("patch",), SingleExpertFusion),
        ("hl_attn", ("image", "pixel"), HLAttn),
        ("lac", LEVELS, LACFusion),
        ("lorahub", LEVELS, LoRAHubFusion),
        ("mole", LEVELS, MoLEFusion),
    ],
)
def test_ablations_and_baselines_build_and_train(fusion, levels, kind):
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", fusion=fusion, levels=levels)
    assert all(isinstance(site.fusion, kind) for site in net.sites)
    assert all(tuple(site.experts) == tuple(levels) for site in net.sites)
    _randomise_experts(net)
    with torch.no_grad():
        for site in net.sites:
            site.gate.fill_(0.5)
    out = net(torch.rand(2, 1, 64, 64))
    out.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    if kind is LoRAHubFusion:
        assert all(not n.endswith("fusion.weights") for n in grads)  # search-only weights
    elif kind is not SingleExpertFusion:
        assert any(".fusion." in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("kernel", ["fused", "chunked"])
@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_tinyvit"])
@pytest.mark.parametrize("grad", [False, True])
def test_kernels_equal_the_reference_computation(backbone, kernel, grad):
    """Whole site outputs (fusion and gate included) and, when training, input gradients."""
    net = SAMoraNet(3, backbone=backbone, checkpoint="", method="samora", gate_init=0.7, attention_kernel="reference")
    _randomise_experts(net, std=0.5)
    site = net.sites[0]
    shape = (3, 8, 8, site.base.qkv.in_features) if site.layout == "sam_vit" else (3, 49, site.base.qkv.in_features)
    x = torch.randn(shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        outputs = {}
        for name in ("reference", kernel):
            site.kernel = name
            out = site(x)
            grad_x = torch.autograd.grad(out.square().sum(), x)[0] if grad else None
            outputs[name] = (out.detach(), grad_x)
    assert torch.allclose(outputs[kernel][0], outputs["reference"][0], atol=1e-5)
    if grad:
        assert torch.allclose(outputs[kernel][1], outputs["reference"][1], atol=1e-4)


def test_single_expert_fusion_passes_its_delta_through():
    deltas = {lv: torch.randn(2, 5, 8) for lv in LEVELS}
    fusion = SingleExpertFusion("pixel")
    assert fusion(deltas, torch.randn(2, 5, 8)) is deltas["pixel"]
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", levels=("pixel",), gate_init=1.0)
    assert not any(p.requires_grad for site in net.sites for p in site.fusion.parameters())
    site = net.sites[0]
    x = torch.randn(2, 49, site.base.qkv.in_features)
    _randomise_experts(net, std=0.5)
    with torch.no_grad():
        expert = site.experts["pixel"]
        adapted = LoRAQKV(site.base.qkv, qkv_rows(site.base, site.layout), 4)
        adapted.expert.load_state_dict(expert.state_dict())
        a0 = site.base(x)
        original, site.base.qkv = site.base.qkv, adapted
        a_e = site.base(x)
        site.base.qkv = original
        assert torch.allclose(site(x), a0 + (a_e - a0), atol=1e-5)  # gate 1: a0 + d_pixel


def test_lac_and_mole_are_weighted_sums():
    deltas = {lv: torch.randn(1, 4, 8) for lv in LEVELS}
    lac = LACFusion(LEVELS)
    assert torch.allclose(lac(deltas, None), sum(deltas.values()) / 3, atol=1e-6)
    mole = MoLEFusion(8, LEVELS)
    assert torch.allclose(mole(deltas, torch.randn(1, 4, 8)), sum(deltas.values()) / 3, atol=1e-6)  # uniform at start


def test_lorahub_search_lowers_the_objective_without_gradients():
    """The search finds weights that reproduce a target made with known expert weights."""
    from samora_components.networks.fusion import lorahub_search

    torch.manual_seed(0)
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", fusion="lorahub").eval()
    _randomise_experts(net, std=0.5)
    fusions = [site.fusion for site in net.sites]
    with torch.no_grad():
        for site in net.sites:
            site.gate.fill_(1.0)
            site.fusion.weights.copy_(torch.tensor([1.0, -0.5, 0.5]))
        x = torch.rand(4, 1, 64, 64)
        target = net.embed(net._bb.prepare(x))
        for fusion in fusions:
            fusion.weights.fill_(1 / 3)

    def objective() -> float:
        return float((net.embed(net._bb.prepare(x)) - target).square().mean())

    start = objective()
    weights = lorahub_search(fusions, objective, iterations=60, l1=0.0)
    assert objective() < 0.2 * start
    assert all(torch.equal(f.weights, weights) for f in fusions)  # one weight vector shared by all sites
    assert weights.abs().max() <= 1.5
    assert not any(p.grad is not None for p in net.parameters())


def _lorahub_weights(labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Weights chosen by the LoRAHub handler for one labeled batch, starting from gate 0."""
    from monai.losses import DiceCELoss

    from samora_components.engines.handlers import LoRAHubSearch

    torch.manual_seed(0)
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", fusion="lorahub")
    _randomise_experts(net, std=0.5)
    assert all(float(site.gate) == 0.0 for site in net.sites)
    loader = [{"image": images, "label": labels}]
    search = LoRAHubSearch(net, loader, DiceCELoss(to_onehot_y=True, softmax=True), batches=1, iterations=25)

    class _Engine:  # the handler only reads the epoch number
        class state:
            epoch = 1

    search(_Engine)
    assert all(float(site.gate) == 0.0 for site in net.sites)  # the gate is back where it was
    return net.sites[0].fusion.weights.clone()


def test_lorahub_weights_depend_on_the_data():
    """LoRAHub searches the composed experts at full strength: different labels give different
    weights (searched at gate 0, the objective was flat and only the L1 term moved them)."""
    torch.manual_seed(1)
    images = torch.rand(4, 1, 64, 64)
    left = torch.zeros(4, 1, 64, 64, dtype=torch.long)
    left[..., :32] = 1
    right = torch.zeros(4, 1, 64, 64, dtype=torch.long)
    right[..., 16:48, 32:] = 2
    a, b = _lorahub_weights(left, images), _lorahub_weights(right, images)
    assert not torch.allclose(a, b, atol=1e-3), (a, b)
    assert not torch.allclose(a, torch.full((3,), 1 / 3), atol=1e-3)


@pytest.mark.parametrize(
    "levels,scratch,gate_init",
    [
        (("image",), ("image",), 1.0),  # table 5/15 "Scratch" rows, one per level
        (("patch",), ("patch",), 1.0),
        (("pixel",), ("pixel",), 1.0),
        (("image",), (), 0.0),  # "T-S" rows: a pre-trained expert (random stand-in here), frozen
        (("patch",), (), 0.0),
        (("image", "patch", "pixel"), (), 0.0),  # full SAMora
        (("image", "patch", "pixel"), (), 1.0),  # the authors' gate start
    ],
)
def test_every_ablation_row_trains_its_parameters(levels, scratch, gate_init):
    """Five AdamW steps change every trainable tensor (no deadlock between a zero gate and zero LoRA B)."""
    torch.manual_seed(0)
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", levels=levels, scratch_levels=scratch,
                    gate_init=gate_init, fusion="hl_attn")
    with torch.no_grad():  # frozen (pre-trained) experts: non-zero updates; scratch experts keep their LoRA init
        for site in net.sites:
            for level, expert in site.experts.items():
                if level not in scratch:
                    expert.b_q.normal_(std=0.3)
                    expert.b_v.normal_(std=0.3)
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trainable) == bool(scratch)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    unchanged = [n for n, p in net.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])]
    assert not unchanged, unchanged


def test_scratch_experts_need_a_non_zero_gate_and_missing_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="gate_init"):
        SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", levels=("image",), scratch_levels=("image",))
    missing = str(tmp_path / "lora_patch.safetensors")
    with pytest.raises(FileNotFoundError, match="lora_patch.safetensors.*pretrain --bundle <bundle> --level patch"):
        SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", experts={"image": missing, "patch": missing,
                                                                                      "pixel": missing}, levels=("patch",))
    with pytest.raises(FileNotFoundError, match="no image-level expert"):
        SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", experts={})
    # SAMed ignores expert files entirely
    SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samed", experts={"image": missing})


def test_gate_init_and_fusion_norm_are_settings():
    net = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samora", gate_init=1.0, fusion_norm=True)
    assert all(float(site.gate) == 1.0 for site in net.sites)
    assert all(isinstance(site.fusion_norm, torch.nn.LayerNorm) for site in net.sites)
    default = SAMoraNet(3, backbone="tiny_vit", checkpoint="", method="samora")
    assert all(float(site.gate) == 0.0 and isinstance(site.fusion_norm, torch.nn.Identity) for site in default.sites)


def test_frozen_experts_are_stacked_once_for_inference():
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", gate_init=1.0).eval()
    site = net.sites[0]
    _randomise_experts(net, std=0.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = net.embed(x)
        kept = site.stacked_experts()
        assert site.stacked_experts() is kept
        site.experts["patch"].b_v.mul_(2.0)  # a changed expert (a load) is picked up
        assert site.stacked_experts() is not kept
        after = net.embed(x)
    assert not torch.allclose(before, after)
    site.stacked_experts()  # with gradients recorded: built from the parameters, nothing kept
    assert site._stacked is None
