"""H-SAM's two-stage decoder (``decoder: hsam``): shapes and gradients with every tiny backbone and
adaptation, CMAttn (paper vs public-code gate, class-balanced noise, labels from the trainer), the
learnable mask cross-attention, the hierarchical pixel decoder, the table-4 switches, the
stage-weighted loss and its schedule, model cards, a tiny bundle run used by inference, and bench."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.transformer import Attention

from samora_components.apps import bench, cli
from samora_components.bundle.cards import ARCHITECTURE_KEYS, card_mismatches
from samora_components.bundle.inference import BundlePredictor
from samora_components.bundle.workflow import run_config
from samora_components.data.phantom import generate
from samora_components.engines.losses import StageWeightedLoss, StageWeightSchedule, resize_target, stage1_weight
from samora_components.networks import hsam
from samora_components.networks.backbones import BACKBONES, build_backbone
from samora_components.networks.decoders import PromptFreeDecoder
from samora_components.networks.hsam import (
    ClassBalancedMaskAttention,
    HierarchicalDecoder,
    HSAMOutput,
    MaskCrossAttention,
    MaskedTwoWayTransformer,
    class_balanced_noise,
    combine_stages,
)
from samora_components.networks.samora_net import SAMoraNet

REPO = Path(__file__).resolve().parents[1]
TINY_BACKBONES = sorted(name for name in BACKBONES if name.startswith("tiny"))
#: tiny input sizes: the embedding grid is 4 for both, so stage 1 is at 16 px (other tiny configs: their default)
SIZES = {"tiny_vit": 64, "tiny_tinyvit": 32}


def _net(backbone: str = "tiny_vit", method: str = "samed", decoder: str = "hsam", classes: int = 4, **kw) -> SAMoraNet:
    return SAMoraNet(classes, backbone=backbone, img_size=SIZES.get(backbone), checkpoint="", method=method,
                     decoder=decoder, **kw)


def _decoder(classes: int = 3, **kw) -> HierarchicalDecoder:
    bb = build_backbone("tiny_vit", checkpoint="")
    return HierarchicalDecoder(classes, 32, bb.prompt_encoder, depth=1, mlp_dim=64, num_heads=2, **kw)


# ---- the network: every decoder x backbone x adaptation --------------------------------------------

@pytest.mark.parametrize("backbone", TINY_BACKBONES)
@pytest.mark.parametrize("method", ["samed", "samora", "frozen"])
@pytest.mark.parametrize("decoder", ["samed", "hsam"])
def test_shapes_and_gradients_for_every_decoder_backbone_and_method(backbone, method, decoder):
    net = _net(backbone, method, decoder, gate_init=0.5 if method == "samora" else 0.0).train()
    size = net.img_size
    x, labels = torch.rand(2, 1, size, size), torch.randint(0, 4, (2, 1, size, size)).float()
    out = net(x, labels=labels)
    if decoder == "samed":
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4, size, size)
        loss = out.logsumexp(1).mean()
    else:
        assert isinstance(out, HSAMOutput)
        grid = net._bb.grid
        assert out.stage1.shape == (2, 4, 4 * grid, 4 * grid)  # stage 1 on its own grid (1/4 of a ViT input)
        assert out.stage2.shape == (2, 4, size, size)  # stage 2 at the input size
        loss = out.stage1.logsumexp(1).mean() + out.stage2.logsumexp(1).mean()
    loss.backward()
    named = dict(net.named_parameters())
    assert all(p.grad is None for p in named.values() if not p.requires_grad)  # the frozen encoder stays frozen
    decoder_grads = {n: p.grad for n, p in named.items() if n.startswith("decoder.") and p.requires_grad}
    assert decoder_grads and all(g is not None and torch.isfinite(g).all() for g in decoder_grads.values())
    if decoder == "hsam":  # each H-SAM part learns
        for part in ("decoder.cmattn.", "decoder.transformer.", "decoder.pixel_decoder.refine.", "decoder.stage1."):
            assert any(n.startswith(part) and float(g.abs().sum()) > 0 for n, g in decoder_grads.items()), part
    if method == "samed":
        assert any(".expert." in n and p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in named.items())

    net.eval()
    with torch.no_grad():
        y = net(torch.rand(3, 1, 50, 70))
    assert isinstance(y, torch.Tensor) and y.shape == (3, 4, 50, 70)  # eval: one map at the input size


def test_eval_output_is_the_mean_of_both_stages_at_the_input_size():
    net = _net(hsam_noise_std=0.0)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        stages = net.train()(x)
        combined = net.eval()(x)
    stage1 = F.interpolate(stages.stage1, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(combined, (stage1 + stages.stage2) / 2, atol=1e-5)
    assert torch.allclose(combine_stages(stages), combined, atol=1e-5)
    probs = combine_stages(stages, "probabilities").softmax(1)
    assert torch.allclose(probs, (stage1.softmax(1) + stages.stage2.softmax(1)) / 2, atol=1e-5)
    with pytest.raises(ValueError):
        combine_stages(stages, "vote")


def test_stage2_starts_from_the_checkpoint_like_stage1():
    net = SAMoraNet(4, backbone="litemedsam", img_size=64, method="frozen", decoder="hsam")
    dec = net.decoder
    assert dec.pixel_decoder.upscale_steps == 0  # LiteMedSAM: 4x the embedding grid is already the input
    for key, value in net._bb.decoder_weights.items():
        assert torch.equal(dec.stage1.mask_decoder.state_dict()[key], value), key
        if key.startswith("transformer."):
            assert torch.equal(dec.transformer.state_dict()[key[len("transformer."):]], value), key
        else:
            upscaling = dec.pixel_decoder.output_upscaling.state_dict()
            assert torch.equal(upscaling[key[len("output_upscaling."):]], value), key


# ---- CMAttn ----------------------------------------------------------------------------------------

def test_cmattn_as_coded_is_a_constant_gate_and_the_paper_gate_is_not():
    torch.manual_seed(0)
    paper = ClassBalancedMaskAttention(3, grid=14, num_heads=7, mlp_dim=32, noise_std=0.0)
    coded = ClassBalancedMaskAttention(3, grid=14, num_heads=7, mlp_dim=32, noise_std=0.0, as_coded=True)
    coded.load_state_dict(paper.state_dict())  # same weights: only the gate differs
    embedding = torch.randn(2, 8, 6, 6)
    feature_a, feature_b = torch.randn(2, 3, 6, 6) * 4, torch.randn(2, 3, 6, 6) * 4
    # the public code: softmax over one channel = 1 everywhere, whatever the mask feature -> 2x
    assert torch.equal(coded.gate(feature_a.softmax(1)), torch.ones(2, 1, 6, 6))
    assert torch.allclose(coded(embedding, feature_a), 2 * embedding)
    assert torch.allclose(coded(embedding, feature_a), coded(embedding, feature_b))
    # the paper's intent: a gate in (0, 1) that follows the mask feature
    gate = paper.gate(feature_a.softmax(1))
    assert float(gate.min()) > 0 and float(gate.max()) < 1 and float(gate.std()) > 1e-4
    assert not torch.allclose(paper(embedding, feature_a), paper(embedding, feature_b))
    assert float((paper(embedding, feature_a) - coded(embedding, feature_a)).abs().max()) > 0.1
    # and only the paper's CMAttn can learn: the as-coded one gives its weights zero gradient
    for module in (paper, coded):
        module(embedding, feature_a.requires_grad_()).sum().backward()
    assert float(paper.compress.weight.grad.abs().sum()) > 0
    assert float(coded.compress.weight.grad.abs().sum()) == 0.0
    assert float(coded.self_attn.q_proj.weight.grad.abs().sum()) == 0.0


def test_the_two_cmattn_variants_change_the_network_output():
    torch.manual_seed(0)
    paper = _net(hsam_cmattn_as_coded=False, hsam_noise_std=0.0).eval()
    coded = _net(hsam_cmattn_as_coded=True, hsam_noise_std=0.0).eval()
    coded.load_state_dict(paper.state_dict())
    coded.encoder.load_state_dict(paper.encoder.state_dict())
    assert coded.architecture["hsam_cmattn_as_coded"] and not paper.architecture["hsam_cmattn_as_coded"]
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert float((paper(x) - coded(x)).abs().max()) > 1e-4


def test_class_balanced_noise_variance_is_inversely_proportional_to_class_frequency():
    torch.manual_seed(0)
    classes = torch.zeros(1, 200, 200, dtype=torch.long)
    classes[:, :20] = 1  # 10 % of the positions; class 0 90 %, class 2 absent
    probs = torch.zeros(1, 3, 200, 200)
    noise = class_balanced_noise(probs, classes, 0.3)
    std1 = float(noise[:, :, :20].std())
    std0 = float(noise[:, :, 20:].std())
    assert std1 == pytest.approx(0.3, rel=0.03)  # the rarest class present gets the given deviation
    assert std0 == pytest.approx(0.3 * math.sqrt(0.1 / 0.9), rel=0.03)  # var ∝ 1 / frequency
    # a per-class list computed offline (as the paper stores `var`)
    listed = class_balanced_noise(probs, classes, torch.tensor([0.0, 0.2, 0.5]))
    assert float(listed[:, :, 20:].abs().max()) == 0.0
    assert float(listed[:, :, :20].std()) == pytest.approx(0.2, rel=0.03)
    with pytest.raises(ValueError):
        class_balanced_noise(probs, classes, torch.tensor([0.1, 0.2]))


def test_labels_reach_cmattn_noise_in_training_only(monkeypatch):
    seen = []

    def spy(probs, classes, std):
        seen.append(classes.clone())
        return torch.zeros_like(probs)

    monkeypatch.setattr(hsam, "class_balanced_noise", spy)
    net = _net(classes=4).train()
    labels = torch.zeros(2, 1, 64, 64)
    labels[0, :, :32] = 3  # top half of image 0
    labels[1, :, :, 48:] = 2  # right quarter of image 1
    net(torch.rand(2, 1, 64, 64), labels=labels)
    (classes,) = seen
    grid = net._bb.grid  # 4: the labels arrive at the embedding grid, nearest
    expected = F.interpolate(labels, size=(grid, grid), mode="nearest")[:, 0].long()
    assert torch.equal(classes, expected) and set(classes.unique().tolist()) == {0, 2, 3}
    net(torch.rand(2, 1, 64, 64))  # no labels: the stage-1 prediction gives the classes
    assert len(seen) == 2 and seen[1].shape == (2, grid, grid)
    net.eval()
    with torch.no_grad():
        net(torch.rand(2, 1, 64, 64), labels=labels)
    assert len(seen) == 2  # no noise at inference


def test_training_noise_is_on_in_training_and_off_in_eval():
    torch.manual_seed(0)
    dec = _decoder(noise_std=0.5)
    emb = torch.rand(2, 32, 4, 4)
    with torch.no_grad():
        a, b = dec.train().stages(emb), dec.stages(emb)
        c, d = dec.eval().stages(emb), dec.stages(emb)
    assert not torch.allclose(a.stage2, b.stage2) and torch.equal(a.stage1, b.stage1)  # stage 2 only
    assert torch.equal(c.stage2, d.stage2)


# ---- learnable mask cross-attention ---------------------------------------------------------------

def test_mask_cross_attention_multiplies_the_attention_map_by_the_prior():
    torch.manual_seed(0)
    ours, sam = MaskCrossAttention(16, 2, 2), Attention(16, 2, 2)
    sam.load_state_dict(ours.state_dict())  # same parameter names: SAM checkpoints load
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    assert torch.allclose(ours(q, k, v), sam(q=q, k=k, v=v), atol=1e-6)
    assert torch.allclose(ours(q, k, v, torch.ones(2, 3, 10)), sam(q=q, k=k, v=v), atol=1e-6)
    # a zero prior removes every key: only the output projection's bias is left (not -inf masking)
    assert torch.allclose(ours(q, k, v, torch.zeros(2, 3, 10)), ours.out_proj.bias.expand(2, 3, 16), atol=1e-6)
    # by hand: X = (M ⊙ softmax(QK^T/sqrt(d))) V, per head
    weight = torch.rand(2, 3, 10)
    qh = ours._separate_heads(ours.q_proj(q), 2)
    kh, vh = ours._separate_heads(ours.k_proj(k), 2), ours._separate_heads(ours.v_proj(v), 2)
    attn = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1]), -1) * weight[:, None]
    assert torch.allclose(ours(q, k, v, weight), ours.out_proj(ours._recombine_heads(attn @ vh)), atol=1e-6)
    prior = weight.clone().requires_grad_()
    ours(q, k, v, prior).sum().backward()
    assert float(prior.grad.abs().sum()) > 0  # learnable: the prior keeps its gradient


def test_stage2_learns_through_the_prior_only_with_mask_attention():
    """With CMAttn and the hierarchical pixel decoder off, stage 2 reaches stage 1 only through the
    learnable mask cross-attention."""
    for mask_attention in (True, False):
        torch.manual_seed(0)
        dec = _decoder(cmattn=False, hierarchical_pixel_decoder=False, mask_cross_attention=mask_attention).train()
        dec.stages(torch.rand(2, 32, 4, 4)).stage2.logsumexp(1).mean().backward()
        grads = [p.grad for p in dec.stage1.mask_decoder.output_hypernetworks_mlps.parameters()]
        reached = any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert reached == mask_attention


# ---- the table-4 switches -------------------------------------------------------------------------

@pytest.mark.parametrize("cmattn,mask_attention,pixel_decoder", list(itertools.product((False, True), repeat=3)))
def test_ablation_switches_build_each_table4_row(cmattn, mask_attention, pixel_decoder):
    net = _net(hsam_cmattn=cmattn, hsam_mask_attention=mask_attention, hsam_pixel_decoder=pixel_decoder).train()
    dec = net.decoder
    assert (dec.cmattn is not None) == cmattn
    assert isinstance(dec.transformer, MaskedTwoWayTransformer) == mask_attention
    assert isinstance(dec.transformer, TwoWayTransformer)
    assert dec.pixel_decoder.hierarchical == pixel_decoder
    assert not any(".cmattn." in k for k in net.state_dict()) or cmattn
    with torch.no_grad():
        stages = dec.stages(torch.rand(1, 32, 4, 4))
    # stage 2 at 4x the grid (SAM's pixel decoder) or up to the 64 px input (hierarchical)
    assert stages.stage1.shape == (1, 4, 16, 16)
    assert stages.stage2.shape == (1, 4, 64, 64) if pixel_decoder else (1, 4, 16, 16)
    arch = net.architecture
    switches = (arch["hsam_cmattn"], arch["hsam_mask_attention"], arch["hsam_pixel_decoder"])
    assert switches == (cmattn, mask_attention, pixel_decoder)
    out = net(torch.rand(1, 1, 40, 40))
    assert out.stage2.shape == (1, 4, 40, 40)


def test_decoder_only_hsam_is_samed_lora_with_the_hsam_decoder():
    net = _net(method="samed", decoder="hsam")
    samed = _net(method="samed", decoder="samed")
    assert not any(".experts." in k or ".fusion." in k for k in net.state_dict())
    lora = {k for k in net.state_dict() if ".expert." in k}
    assert lora and lora == {k for k in samed.state_dict() if ".expert." in k}  # the same LoRA as SAMed
    assert isinstance(net.decoder, HierarchicalDecoder) and isinstance(samed.decoder, PromptFreeDecoder)
    with pytest.raises(ValueError):
        _net(decoder="unet")
    with pytest.raises(ValueError):
        _net(hsam_ensemble="vote")


# ---- model card and state dict --------------------------------------------------------------------

def test_card_round_trip_rebuilds_the_hsam_network(tmp_path):
    net = _net(method="samora", hsam_mask_attention=False, hsam_cmattn_as_coded=True, hsam_ensemble="probabilities",
               gate_init=0.5)
    card = json.loads(json.dumps(net.architecture))
    assert card["decoder"] == "hsam" and {"decoder", "hsam_cmattn", "hsam_pixel_decoder"} <= set(ARCHITECTURE_KEYS)
    state = net.state_dict()
    assert not any(k.startswith("decoder.stage1.prompt.") for k in state)  # frozen prompt encoder left out
    assert not any(".attn.base.qkv." in k for k in state) and any(k.startswith("decoder.cmattn.") for k in state)
    torch.save(state, tmp_path / "model.pt")

    other = SAMoraNet.from_card(card)
    assert other.architecture == net.architecture and card_mismatches(other, card) == []
    assert not isinstance(other.decoder.transformer, MaskedTwoWayTransformer) and other.decoder.cmattn.as_coded
    other.encoder.load_state_dict(net.encoder.state_dict())  # the frozen base: random here, from the checkpoint in use
    other.decoder.prompt.load_state_dict(net.decoder.prompt.state_dict())
    result = other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), other.eval()(x), atol=1e-6)
    samed = {**card, "decoder": "samed"}
    assert "decoder='samed' (config: 'hsam')" in card_mismatches(other, samed)


# ---- loss and stage weights -----------------------------------------------------------------------

def test_stage1_weight_decays_exponentially_from_0_4_to_about_0():
    assert stage1_weight(0.0) == pytest.approx(0.4)
    assert stage1_weight(1.0) == pytest.approx(1 - 0.6 ** (0.99 ** 300)) and stage1_weight(1.0) < 0.025
    # the public trainer's 1 - 0.6 ** (0.99 ** epoch), its 300 epochs spread over the run
    for epoch in (0, 1, 30, 150, 299):
        assert stage1_weight(epoch / 300) == pytest.approx(1 - 0.6 ** (0.99 ** epoch))
    weights = [stage1_weight(p) for p in np.linspace(0, 1, 101)]
    assert all(a > b for a, b in zip(weights, weights[1:]))
    # late in the run ~0.51 * 0.99 ** epoch: each paper epoch scales it by ~0.99
    assert stage1_weight(0.9 + 1 / 300) / stage1_weight(0.9) == pytest.approx(0.99, abs=2e-3)
    with pytest.raises(ValueError):
        stage1_weight(0.0, start=1.0)


def test_schedule_handler_sets_the_weight_from_the_trainer_iteration():
    loss = StageWeightedLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    seen = []
    engine = Engine(lambda e, batch: seen.append((e.state.iteration, loss.stage1_weight, e.state.stage1_weight)))
    StageWeightSchedule(loss).attach(engine)
    engine.run(range(4), max_epochs=3)  # 12 iterations
    assert [i for i, _, _ in seen] == list(range(1, 13))
    for iteration, weight, on_state in seen:
        assert weight == on_state == pytest.approx(stage1_weight((iteration - 1) / 11))
    assert seen[0][1] == pytest.approx(0.4) and seen[-1][1] == pytest.approx(stage1_weight(1.0))
    # the weight follows the engine state, so a resumed run (iteration restored) continues the schedule
    engine.state.iteration = 6
    StageWeightSchedule(loss)(engine)
    assert loss.stage1_weight == pytest.approx(stage1_weight(5 / 11))


def test_stage_weighted_loss_numbers():
    torch.manual_seed(0)
    base = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.1, lambda_dice=0.9)
    loss = StageWeightedLoss(base, stage1_weight=0.3)
    target = torch.randint(0, 3, (2, 1, 32, 32)).float()
    single = torch.randn(2, 3, 32, 32)
    assert torch.equal(loss(single, target), base(single, target))  # one map: the base loss, unchanged
    s1, s2 = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 32, 32, requires_grad=True)
    low = target[:, :, ::4, ::4]  # nearest to the stage-1 grid
    assert torch.equal(resize_target(target, (8, 8)), low)
    expected = 0.3 * base(s1, low) + 0.7 * base(s2, target)
    assert torch.allclose(loss(HSAMOutput(s1, s2), target), expected)
    loss.stage1_weight = 0.0
    loss(HSAMOutput(s1, s2), target).backward()
    assert s1.grad is None or float(s1.grad.abs().sum()) == 0.0
    assert float(s2.grad.abs().sum()) > 0


# ---- bundles, inference, bench --------------------------------------------------------------------

@pytest.mark.parametrize("bundle", ["samora_ct", "samora_mr"])
def test_train_config_wires_decoder_loss_schedule_and_labels(bundle):
    configs = {}
    for decoder in ("samed", "hsam"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
        parser.update({"decoder": decoder, "backbone": "tiny_vit", "backbone_checkpoint": "", "img_size": 64})
        configs[decoder] = parser
    for decoder, parser in configs.items():
        assert parser.get_parsed_content("network_def").architecture["decoder"] == decoder
        loss = parser.get_parsed_content("loss")
        assert isinstance(loss, StageWeightedLoss) and loss.stage1_weight == 0.4
        base = loss.loss
        assert (base.lambda_ce, base.lambda_dice) == ((0.1, 0.9) if decoder == "hsam" else (0.2, 0.8))
        assert parser.get_parsed_content("base_lr") == (0.0025 if decoder == "hsam" else 0.005)
        card = parser.get_parsed_content("model_card")
        assert card["decoder"] == decoder and card["hsam_cmattn"] is True
    for method, epochs in (("samora", 30), ("samed", 300)):  # table 8: H-SAMora 30; H-SAM 300
        configs["hsam"]["method"] = method
        assert configs["hsam"].get_parsed_content("epochs") == epochs
    prepare = configs["hsam"].get_parsed_content("train#trainer#prepare_batch")
    batch = {"image": torch.rand(2, 1, 8, 8), "label": torch.ones(2, 1, 8, 8)}
    image, label, args, kwargs = prepare(batch, "cpu")
    assert torch.equal(kwargs["labels"], batch["label"]) and not args  # network(image, labels=label)


def test_tiny_hsam_bundle_run_is_what_inference_uses(tmp_path):
    datalist = generate(str(tmp_path / "phantom_ct"), "ct", cases=3, unlabeled=0, shape=(40, 40, 8))
    root = tmp_path / "bundle"
    run_config(
        "bundles/samora_ct", "train", run_id="training", quick=True, bundle_root=str(root), datalist=datalist,
        method="samed", decoder="hsam", hsam_mask_attention=False, epochs=2, batch_size=4, warmup_iters=2,
        backbone="tiny_vit", backbone_checkpoint="", img_size=64, val_interval=2,
    )
    history = json.loads((root / "runs" / "samed" / "validation.json").read_text())  # eval mode inside training
    assert history["epochs"] == [2] and 0.0 <= history["val_mean_dice"][0] <= 1.0
    card = json.loads((root / "models" / "model.json").read_text())
    recorded = (card["decoder"], card["hsam_mask_attention"], card["hsam_cmattn"], card["base_lr"])
    assert recorded == ("hsam", False, True, 0.0025)
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("decoder.cmattn.") for k in state) and any(k.startswith("decoder.stage1.") for k in state)
    assert any(".expert.b_q" in k for k in state)  # SAMed's LoRA trained with it (decoder-only H-SAM)

    shutil.copytree(REPO / "bundles" / "samora_ct" / "configs", root / "configs")
    torch.manual_seed(0)
    predictor = BundlePredictor.from_bundle(root)  # inference.yaml + the card
    net = predictor.network
    assert isinstance(net.decoder, HierarchicalDecoder) and not net.training
    assert not isinstance(net.decoder.transformer, MaskedTwoWayTransformer)  # the card's switch
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    image = Path(datalist).parent / ConfigParser.load_config_file(datalist)["test"][0]["image"]
    label = predictor(str(image))
    assert label.shape == (40, 40, 8) and label.dtype == np.uint8

    out = tmp_path / "pred"
    torch.manual_seed(0)  # the same random frozen backbone as the predictor's
    cli.main(["infer", "--bundle", str(root), "--input", str(image), "--output", str(out)])
    written = sorted(out.iterdir())
    assert len(written) == 1
    assert np.array_equal(np.asarray(nib.load(written[0]).dataobj), label)


def test_bench_reports_the_hsam_decoder(monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: 1.0)  # the peak is not what is tested here
    results = {d: bench.benchmark("tiny_vit", batch=1, dtype="fp32", warmup=0, repeats=1, decoder=d)
               for d in ("samed", "hsam")}
    hsam_run, samed_run = results["hsam"], results["samed"]
    assert hsam_run["decoder"] == "hsam" and samed_run["decoder"] == "samed"
    for method in ("samed", "samora"):
        entry = hsam_run[method]
        assert entry["latency_ms_per_slice"] > 0 and entry["gflop_per_slice"] > 0
        # the second stage costs FLOPs and parameters on top of the SAMed decoder
        assert entry["gflop_per_slice"] > samed_run[method]["gflop_per_slice"]
        assert entry["params_trainable"] > samed_run[method]["params_trainable"]
    json.dumps(hsam_run)
