"""SAM2 Hiera backbones: official checkpoint layout, exact equivalence with the ``sam2`` package's
own model, LoRA and SAMora sites on every Hiera block (stage transitions included), expert files,
and a bundle training run whose model card drives inference.

Every check runs Hiera-T (at 128 px, the networks that train at 64 px) with random weights written
in the official checkpoint layout (the ``sam2`` package's own model, built from its SAM2.1 config,
saved as ``{"model": state_dict}``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

import sam2
from sam2.build_sam import build_sam2
from samora_components.bundle.inference import BundlePredictor
from samora_components.bundle.workflow import run_config
from samora_components.data.phantom import generate
from samora_components.networks.backbones import BACKBONES, build_backbone, file_sha256
from samora_components.networks.decoders import PromptFreeDecoder
from samora_components.networks.expert_attention import ExpertAttention
from samora_components.networks.fusion import build_fusion
from samora_components.networks.lora import attach_lora, load_expert, qkv_rows, save_expert
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
SMALL = 64  # networks that train: Hiera-T's four stages at 16, 8, 4 and 2 tokens a side
LEVELS = ("image", "patch", "pixel")
#: Hiera-T: stages (1, 2, 7, 2); the first block of stages 2-4 pools its queries and widens the tokens
TRANSITIONS = (1, 3, 10)
WIDTHS = [96, 192, 192, 384, 384, 384, 384, 384, 384, 384, 768, 768]  # output width of each block


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The sam2 package's SAM2.1 Hiera-T model with random weights, and its checkpoint file."""
    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu", mode="eval")
    with torch.no_grad():  # zero at initialisation: make their loading visible
        trunk = model.image_encoder.trunk
        trunk.pos_embed.normal_(std=0.02)
        trunk.pos_embed_window.normal_(std=0.02)
        model.no_mem_embed.normal_(std=0.02)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return model, path


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory, official) -> dict[str, str]:
    """Three Hiera-T expert files (random non-zero B) written from the SAMed LoRA layout."""
    folder = tmp_path_factory.mktemp("sam2_experts")
    net = SAMoraNet(9, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=str(official[1]), method="samed")
    paths = {}
    for i, level in enumerate(LEVELS):
        torch.manual_seed(i)
        experts = net.site_experts(level)
        with torch.no_grad():
            for e in experts:
                e.b_q.normal_(0, 0.02)
                e.b_v.normal_(0, 0.02)
        paths[level] = str(folder / f"lora_{level}.safetensors")
        save_expert(experts, paths[level], {"level": level, "backbone": net.backbone_name,
                                            "checkpoint_sha256": net.backbone_sha256})
    return paths


def test_configurations_match_the_sam2_package_configs():
    configs = Path(sam2.__file__).parent / "configs"
    for name in ("sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"):
        stem = name.removeprefix("sam2_")
        cfg = BACKBONES[name]
        for release in ("sam2", "sam2.1"):
            text = (configs / release / f"{release}_{stem}.yaml").read_text()
            encoder = yaml.safe_load(text)["model"]["image_encoder"]
            trunk, neck = encoder["trunk"], encoder["neck"]
            assert trunk["embed_dim"] == cfg.embed_dim and trunk["num_heads"] == cfg.num_heads
            # keys a config leaves out take Hiera's defaults (those of b+)
            assert tuple(trunk.get("stages", (2, 3, 16, 3))) == cfg.stages
            assert tuple(trunk.get("global_att_blocks", (12, 16, 20))) == cfg.global_att_blocks
            background = tuple(trunk.get("window_pos_embed_bkg_spatial_size", (14, 14)))
            assert background == cfg.window_pos_embed_bkg_spatial_size
            assert tuple(trunk.get("window_spec", (8, 4, 14, 7))) == cfg.window_spec
            assert neck["backbone_channel_list"] == [cfg.embed_dim * 2**i for i in (3, 2, 1, 0)]
            assert (encoder["scalp"], neck["fpn_top_down_levels"], neck["fpn_interp_model"]) == (1, [2, 3], "nearest")
            assert neck["d_model"] == cfg.out_chans == 256
        assert (cfg.default_size, cfg.attention_layout) == (224, "hiera")


def test_official_checkpoint_loads_completely_and_computes_what_sam2_computes(official):
    model, path = official
    bb = build_backbone("sam2_hiera_t", img_size=SIZE, checkpoint=str(path))
    state = model.state_dict()
    # every encoder tensor comes from the checkpoint under its official name
    encoder_state = bb.encoder.state_dict()
    assert set(encoder_state) == {k for k in state if k.startswith("image_encoder.")} | {"no_mem_embed"}
    assert all(torch.equal(v, state[k]) for k, v in encoder_state.items())
    for key in ("pe_layer.positional_encoding_gaussian_matrix", "no_mask_embed.weight"):
        assert torch.equal(bb.prompt_encoder.state_dict()[key], state[f"sam_prompt_encoder.{key}"])
    assert bb.checkpoint_sha256 == file_sha256(path) and not any(p.requires_grad for p in bb.encoder.parameters())

    # the decoder's transformer and upscaling: exactly the keys our decoder has, none missing
    decoder = PromptFreeDecoder(4, 256, bb.prompt_encoder, weights=bb.decoder_weights)
    wanted = {k for k in decoder.mask_decoder.state_dict() if k.startswith(("transformer.", "output_upscaling."))}
    assert set(bb.decoder_weights) == wanted
    assert torch.equal(bb.decoder_weights["transformer.layers.1.mlp.lin2.weight"],
                       state["sam_mask_decoder.transformer.layers.1.mlp.layers.1.weight"])
    assert set(bb.high_res_weights) == {"conv_s0.weight", "conv_s0.bias", "conv_s1.weight", "conv_s1.bias"}

    x = torch.rand(1, 3, SIZE, SIZE)
    sam_decoder = model.sam_mask_decoder
    with torch.no_grad():
        embedding, skips = bb.trunk_with_skips(bb.stem(x))
        theirs = model.image_encoder(x)
        s0_sam2 = sam_decoder.conv_s0(theirs["backbone_fpn"][0])  # what SAM2's forward_image gives its decoder
        tokens = torch.randn(1, 5, 256)
        pe = bb.prompt_encoder.pe_layer((8, 8)).unsqueeze(0)
        ours_t = decoder.mask_decoder.transformer(embedding, pe, tokens)
        theirs_t = sam_decoder.transformer(embedding, pe, tokens)
        up = decoder.mask_decoder.output_upscaling(embedding)
        up_sam2 = sam_decoder.output_upscaling(embedding)
    # the image embedding SAM2's image predictor gives its decoder: stride-16 level + no_mem_embed
    expected = theirs["vision_features"] + model.no_mem_embed.view(1, -1, 1, 1)
    assert embedding.shape == (1, 256, 8, 8)
    assert torch.allclose(embedding, expected, atol=1e-5)
    # the high-resolution skips are SAM2's FPN levels at strides 4 and 8
    assert [tuple(s.shape) for s in skips] == [(1, 256, 32, 32), (1, 256, 16, 16)]
    for skip, level in zip(skips, theirs["backbone_fpn"][:2]):
        assert torch.allclose(skip, level, atol=1e-5)
    high_res = bb.high_res_weights
    s0 = torch.nn.functional.conv2d(skips[0], high_res["conv_s0.weight"], high_res["conv_s0.bias"])
    assert s0.shape == (1, 32, 32, 32) and torch.allclose(s0, s0_sam2, atol=1e-5)
    # SAM2's decoder tensors in segment_anything's decoder compute SAM2's decoder
    for a, b in zip(ours_t, theirs_t):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(up, up_sam2, atol=1e-5)


def test_wrong_checkpoints_are_refused_with_a_clear_error(official, tmp_path):
    path = official[1]
    with pytest.raises(ValueError, match="does not fit backbone sam2_hiera_s"):
        build_backbone("sam2_hiera_s", img_size=SIZE, checkpoint=str(path))
    with pytest.raises(ValueError, match="is a SAM2 checkpoint"):
        build_backbone("tiny_vit", checkpoint=str(path))
    sam_layout = tmp_path / "sam.pth"
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, sam_layout)
    with pytest.raises(ValueError, match="not a SAM2 checkpoint"):
        build_backbone("sam2_hiera_t", img_size=SIZE, checkpoint=str(sam_layout))
    with pytest.raises(ValueError, match="multiple of 32"):
        build_backbone("sam2_hiera_t", img_size=112, checkpoint="")


def test_lora_updates_only_the_q_and_v_rows_of_every_hiera_block():
    bb = build_backbone("sam2_hiera_t", img_size=SIZE, checkpoint="")
    sites = bb.attention_sites()
    assert len(sites) == 12 and [s.qkv.out_features // 3 for s in sites] == WIDTHS
    assert [i for i, s in enumerate(sites) if s.q_pool is not None] == list(TRANSITIONS)
    wrapped = attach_lora(sites, bb.attention_layout, rank=4)
    for i, (site, lora) in enumerate(zip(sites, wrapped)):
        dim, dim_out = lora.in_features, WIDTHS[i]
        assert lora.expert.a_q.shape == (4, dim) and lora.expert.b_q.shape == (dim_out, 4)
        with torch.no_grad():
            lora.expert.b_q.normal_()
            lora.expert.b_v.normal_()
            x = torch.randn(2, 3, dim)
            change = (lora(x) - lora.base(x)).reshape(2, 3, 3, site.num_heads, -1)  # SAM2's own split
        q, k, v = change.unbind(2)
        assert q.abs().min() > 0 and v.abs().min() > 0 and torch.count_nonzero(k) == 0
        rows = qkv_rows(site, "hiera")
        assert rows.q.tolist() == list(range(dim_out)) and rows.v.tolist() == list(range(2 * dim_out, 3 * dim_out))


def test_expert_sites_are_sam2_attention_with_the_expert_merged_at_every_block():
    """One expert, gate 1: a0 + (a_e - a0) is SAM2's own attention with W + ΔW (q and v rows); at the
    stage transitions the updated queries are pooled (pool(q0 + Δq), not pool(q0) + pool(Δq))."""
    torch.manual_seed(0)
    bb = build_backbone("sam2_hiera_t", img_size=SIZE, checkpoint="")
    for i, attn in enumerate(bb.attention_sites()):
        attn = copy.deepcopy(attn).double()
        site = ExpertAttention(attn, "hiera", ("image",), build_fusion("hl_attn", WIDTHS[i], ("image",)),
                               kernel="reference", gate_init=1.0).double()
        expert = site.experts["image"]
        with torch.no_grad():
            expert.b_q.normal_(std=0.1)
            expert.b_v.normal_(std=0.1)
            x = torch.randn(3, 8, 8, attn.qkv.in_features, dtype=torch.float64)
            out = site(x)
            merged = copy.deepcopy(attn)
            rows = qkv_rows(attn, "hiera")
            merged.qkv.weight[rows.q] += expert.b_q @ expert.a_q
            merged.qkv.weight[rows.v] += expert.b_v @ expert.a_v
            expected = merged(x)
        side = 4 if i in TRANSITIONS else 8
        assert out.shape == expected.shape == (3, side, side, WIDTHS[i])
        assert torch.allclose(out, expected, atol=1e-10)
        assert not torch.allclose(out, attn(x), atol=1e-3)  # the expert changed the block


def test_kernels_agree_with_the_reference_at_every_hiera_site():
    torch.manual_seed(0)
    bb = build_backbone("sam2_hiera_t", img_size=SIZE, checkpoint="")
    for i, attn in enumerate(bb.attention_sites()):
        attn = copy.deepcopy(attn).double()
        site = ExpertAttention(attn, "hiera", LEVELS, build_fusion("mole", WIDTHS[i], LEVELS), gate_init=0.7,
                               fusion_norm=True).double()
        assert site.transition == (i in TRANSITIONS)
        with torch.no_grad():
            site.fusion.gate.weight.normal_()  # MoLE reads the context: u, or a0 at transitions
            for expert in site.experts.values():
                expert.b_q.normal_(std=0.1)
                expert.b_v.normal_(std=0.1)
            x = torch.randn(2, 8, 8, attn.qkv.in_features, dtype=torch.float64)
            outputs = {}
            for kernel in ("reference", "fused", "chunked"):
                site.kernel = kernel
                outputs[kernel] = site(x)
        for kernel in ("fused", "chunked"):
            assert torch.allclose(outputs[kernel], outputs["reference"], atol=1e-10), (i, kernel)


def test_samed_and_samora_train_only_adapters_fusion_and_decoder(official, expert_files):
    path = str(official[1])
    x = torch.rand(2, 1, 80, 80)
    frozen = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=path, method="frozen").eval()
    with torch.no_grad():
        reference = frozen.embed(frozen._bb.prepare(x))

    samed = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=path, method="samed")
    samed.train()
    with torch.no_grad():  # a fresh LoRA (B = 0) leaves SAM2's encoder unchanged
        assert torch.allclose(samed.embed(samed._bb.prepare(x)), reference, atol=1e-5)
    out = samed(x)
    assert out.shape == (2, 4, 80, 80)
    out.square().mean().backward()
    trainable = {n for n, p in samed.named_parameters() if p.requires_grad}
    assert trainable and all(".qkv.expert." in n or n.startswith("decoder.") for n in trainable)
    assert all(site.expert.b_q.grad.abs().sum() > 0 and site.expert.b_v.grad.abs().sum() > 0 for site in samed.sites)
    assert all(not k.startswith("encoder.") or ".qkv.expert." in k for k in samed.state_dict())

    samora = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=path, method="samora",
                       experts=expert_files)
    samora.train()
    with torch.no_grad():  # gate 0 at the start: the frozen encoder, whatever the experts
        assert torch.allclose(samora.embed(samora._bb.prepare(x)), reference, atol=1e-5)
        for site in samora.sites:
            site.gate.fill_(0.5)
    assert len(samora.sites) == 12 and [s.transition for s in samora.sites] == [i in TRANSITIONS for i in range(12)]
    # HL-Attn works at each site's output width
    assert [s.fusion.cross[0].norm_q.normalized_shape[0] for s in samora.sites] == WIDTHS
    samora(x).square().mean().backward()
    for site in samora.sites:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in site.fusion.parameters())
        assert site.gate.grad.abs() > 0
        assert all(not p.requires_grad for p in site.experts.parameters())
    assert all(not p.requires_grad for n, p in samora.named_parameters() if ".base." in n)


def test_expert_files_move_between_networks_of_the_same_backbone_only(official, expert_files):
    path = str(official[1])
    net = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=path, method="samora", experts=expert_files)
    for level, file in expert_files.items():
        reference = [e.b_v.detach().clone() for e in net.site_experts(level)]
        assert net.experts_meta[level]["backbone"] == "sam2_hiera_t"
        assert all(r.abs().sum() > 0 for r in reference)
    # the same file into a fresh network of the same backbone gives the same tensors
    other = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=path, method="samora", levels=("pixel",),
                      experts={"pixel": expert_files["pixel"]})
    for a, b in zip(other.site_experts("pixel"), net.site_experts("pixel")):
        assert torch.equal(a.a_q, b.a_q) and torch.equal(a.b_v, b.b_v)
    # another backbone (16 Hiera-S blocks) refuses it
    small = build_backbone("sam2_hiera_s", img_size=SMALL, checkpoint="")
    experts = [lora.expert for lora in attach_lora(small.attention_sites(), small.attention_layout)]
    with pytest.raises(ValueError, match="holds 12 sites but the encoder has 16"):
        load_expert(expert_files["image"], experts)
    # a file naming another backbone is refused even where the shapes would fit
    foreign = Path(expert_files["image"]).with_name("foreign.safetensors")
    save_expert(net.site_experts("image"), foreign, {"level": "image", "backbone": "sam2_hiera_s"})
    with pytest.raises(ValueError, match="trained on backbone 'sam2_hiera_s', not 'sam2_hiera_t'"):
        net.load_expert("image", str(foreign))


def test_bundle_trains_sam2_hiera_t_and_its_card_runs_inference(tmp_path, official):
    path = str(official[1])
    datalist = generate(str(tmp_path / "phantom_ct"), "ct", cases=3, unlabeled=0, shape=(40, 40, 8))
    root = tmp_path / "bundle"
    run_config(
        "bundles/samora_ct", "train", run_id="training", quick=True, bundle_root=str(root), datalist=datalist,
        **{"method": "samed", "epochs": 1, "batch_size": 4, "warmup_iters": 1, "backbone": "sam2_hiera_t",
           "backbone_checkpoint": path, "img_size": SMALL},
    )
    card = json.loads((root / "models" / "model.json").read_text())
    assert (card["backbone"], card["backbone_checkpoint"], card["img_size"]) == ("sam2_hiera_t", path, SMALL)
    assert card["backbone_sha256"] == file_sha256(path)
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    # SAM2's frozen weights stay in its checkpoint: the file holds the LoRA of every block and the decoder
    assert {k.split(".qkv.")[0] for k in state if ".qkv.expert." in k} == {
        f"encoder.image_encoder.trunk.blocks.{i}.attn" for i in range(12)}
    assert not any(".qkv.base." in k or "no_mem_embed" in k for k in state)
    assert any(k.startswith("decoder.") for k in state)

    shutil.copytree(REPO / "bundles" / "samora_ct" / "configs", root / "configs")
    predictor = BundlePredictor.from_bundle(root)
    assert predictor.network.backbone_name == "sam2_hiera_t"
    image = Path(datalist).parent / ConfigParser.load_config_file(datalist)["test"][0]["image"]
    label = predictor(str(image))
    assert label.shape == (40, 40, 8) and label.dtype == np.uint8
    window = np.clip((nib.load(image).get_fdata() + 125.0) / 400.0, 0.0, 1.0)
    with torch.no_grad():
        logits = predictor.network(torch.as_tensor(window, dtype=torch.float32).permute(2, 0, 1)[:, None])
    assert (label == logits.argmax(1).permute(1, 2, 0).numpy()).mean() > 0.999


def test_hsam_pixel_decoder_takes_sam2_high_resolution_features_as_sam2_does(official):
    """SAM2 + H-SAM: stage 2's pixel decoder adds conv_s1(stride-8) and conv_s0(stride-4) FPN maps into
    SAM's upscaling path exactly as SAM2's mask decoder does, with the checkpoint's conv_s0/conv_s1;
    they train, and switching them off (hsam_high_res false) changes the output."""
    model, path = official
    net = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=str(path), method="samed", decoder="hsam",
                    hsam_pixel_decoder=False)
    assert net.high_res and net.architecture["hsam_high_res"] is True
    pixel = net.decoder.pixel_decoder
    sam2 = model.sam_mask_decoder
    assert torch.equal(pixel.conv_s0.weight, sam2.conv_s0.weight) and torch.equal(pixel.conv_s1.bias, sam2.conv_s1.bias)
    x = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        embedding, maps = net._bb.trunk_with_skips(net._bb.stem(x))
        src = torch.randn_like(embedding)
        ours = pixel(src, None, maps)
        dc1, ln1, act1, dc2, act2 = sam2.output_upscaling  # SAM2's MaskDecoder.predict_masks
        theirs = act2(dc2(act1(ln1(dc1(src) + sam2.conv_s1(maps[1])))) + sam2.conv_s0(maps[0]))
    assert ours.shape == (2, 32, SMALL // 4, SMALL // 4) and torch.allclose(ours, theirs, atol=1e-5)

    net = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=str(path), method="samed", decoder="hsam")
    net.train()
    out = net(torch.rand(2, 1, SMALL, SMALL), torch.randint(0, 4, (2, 1, SMALL, SMALL)))
    (out.stage1.mean() + out.stage2.mean()).backward()
    assert net.decoder.pixel_decoder.conv_s0.weight.grad.abs().sum() > 0
    assert any(k.startswith("decoder.pixel_decoder.conv_s1.") for k in net.state_dict())
    torch.manual_seed(0)
    plain = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=str(path), method="samed",
                      decoder="hsam", hsam_high_res=False)
    assert not plain.high_res and not hasattr(plain.decoder.pixel_decoder, "conv_s0")
    torch.manual_seed(0)
    with_maps = SAMoraNet(4, backbone="sam2_hiera_t", img_size=SMALL, checkpoint=str(path), method="samed", decoder="hsam")
    plain.eval(), with_maps.eval()
    slices = torch.rand(1, 1, SMALL, SMALL)
    with torch.no_grad():
        assert not torch.allclose(plain(slices), with_maps(slices))
    tiny = SAMoraNet(4, backbone="tiny_tinyvit", img_size=32, checkpoint="", method="samed", decoder="hsam")
    assert not tiny.high_res  # other backbones have no such features: the flag changes nothing there
