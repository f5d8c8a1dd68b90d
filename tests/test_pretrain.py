"""Stage 1: every objective learns, frozen parts stay bit-identical, experts are portable files."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine, Events

from samora_components.engines.pretrain import (
    ContrastiveCPT,
    ExpertExport,
    ExpertStudent,
    ImageDistillation,
    MaskedCPT,
    PatchDistillation,
    PixelDenoising,
    PretrainStep,
)
from samora_components.networks.lora import load_expert, read_expert_metadata
from samora_components.networks.samora_net import SAMoraNet
from samora_components.networks.teachers import build_teacher


def _slices(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth synthetic slices (n, 1, size, size) in [0, 1]: a few bright discs on a darker body."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        img = 0.3 * ((xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1).float()
        for _ in range(3):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.2]) + torch.tensor([-0.5, -0.5, 0.1])).tolist()
            img = img + 0.5 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).float()
        images.append(img.clamp(0, 1))
    return torch.stack(images)[:, None]


def _run(objective, keys, batches, steps: int, lr: float, optimizer: str = "adamw") -> list[float]:
    params = objective.trainable_parameters()
    if optimizer == "lars":
        from timm.optim import Lars

        opt = Lars(params, lr=lr, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = PretrainStep(objective, opt, "cpu", keys=keys)
    losses = []
    engine = Engine(step)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    engine.run(batches, max_epochs=max(1, steps // len(batches)))
    return losses


def _falls(losses: list[float], fraction: float = 0.3, k: int = 5) -> bool:
    """The mean of the last ``k`` losses is at least ``fraction`` below the mean of the first ``k``:
    robust to the step-to-step noise that differs between CPU kernels (AVX2 vs AVX-512)."""
    head, tail = losses[:k], losses[-k:]
    return sum(tail) / k <= (1 - fraction) * sum(head) / k


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _base_encoder_state(student: ExpertStudent) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _snapshot(student.encoder).items() if ".expert." not in k}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data():
    images = _slices()
    return [{"image": images[i : i + 8]} for i in range(0, 16, 8)]


@pytest.mark.parametrize("backbone", ["tiny_tinyvit", "tiny_vit"])
def test_image_distillation_learns_with_lars_and_leaves_frozen_parts_untouched(data, backbone):
    student = ExpertStudent(backbone, checkpoint="")
    teacher = build_teacher("simclr", "tiny")
    objective = ImageDistillation(student, teacher, hidden=64)
    base, frozen_teacher = _base_encoder_state(student), _snapshot(teacher)
    losses = _run(objective, ["image"], data, 40, lr=0.3, optimizer="lars")  # a stable LARS rate
    assert _falls(losses), losses
    assert _same(base, _base_encoder_state(student))
    assert _same(frozen_teacher, _snapshot(teacher))  # BatchNorm statistics included
    assert all(not p.requires_grad for p in teacher.parameters())


def test_patch_distillation_learns(data):
    student = ExpertStudent("tiny_tinyvit", checkpoint="")
    teacher = build_teacher("mae", "tiny")
    objective = PatchDistillation(student, teacher)
    base, frozen_teacher = _base_encoder_state(student), _snapshot(teacher)
    losses = _run(objective, ["image"], data, 60, lr=3e-3)
    assert _falls(losses), losses
    assert _same(base, _base_encoder_state(student)) and _same(frozen_teacher, _snapshot(teacher))


def test_pixel_denoising_learns_and_only_expert_and_decoder_train(data):
    student = ExpertStudent("tiny_tinyvit", checkpoint="")
    objective = PixelDenoising(student, sigma=0.1, width=16)
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") or ".expert." in n for n in trainable)
    base = _base_encoder_state(student)
    losses = _run(objective, ["image"], data, 40, lr=3e-3)
    assert _falls(losses), losses
    assert _same(base, _base_encoder_state(student))


def test_denoising_input_is_noisy_clipped_and_optionally_blurred():
    student = ExpertStudent("tiny_tinyvit", checkpoint="")
    clean = torch.full((4, 1, 64, 64), 0.95)
    torch.manual_seed(0)
    noisy = PixelDenoising(student, sigma=0.1, width=8).corrupt(clean)
    assert noisy.min() >= 0 and noisy.max() == 1.0  # clipped to [0, 1]
    assert 0.05 < (noisy - clean).abs().mean() < 0.09  # E|N(0, 0.1)| = 0.08, less where clipped
    torch.manual_seed(0)
    blurred = PixelDenoising(student, sigma=0.1, blur_prob=1.0, width=8).corrupt(clean)
    roughness = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert roughness(blurred) < 0.5 * roughness(noisy)


def test_mae_cpt_objective_learns(data):
    teacher = build_teacher("mae", "tiny")
    losses = _run(MaskedCPT(teacher, mask_ratio=0.75), ["image"], data, 60, lr=3e-3)
    assert _falls(losses), losses


def test_simclr_cpt_objective_learns_at_a_stable_lars_rate():
    """NT-Xent with LARS at lr 0.3 (stable on every CPU kind; lr 2.0 diverges on some kernels)."""
    simclr = build_teacher("simclr", "tiny")
    images = _slices(16, 64, seed=1)
    views = [{"view1": images[i : i + 8], "view2": images[i : i + 8].flip(-1) * 0.9} for i in (0, 8)]
    losses = _run(ContrastiveCPT(simclr, temperature=0.1), ["view1", "view2"], views, 40, lr=0.3, optimizer="lars")
    assert _falls(losses, fraction=0.5), losses
    assert any(p.requires_grad for p in simclr.parameters())


def test_expert_file_loads_into_a_fresh_encoder_and_changes_its_output(tmp_path, data):
    student = ExpertStudent("tiny_tinyvit", checkpoint="")
    objective = PatchDistillation(student, build_teacher("mae", "tiny"))
    engine = Engine(PretrainStep(objective, torch.optim.AdamW(objective.trainable_parameters(), lr=3e-3), "cpu"))
    path = tmp_path / "experts" / "lora_patch.safetensors"
    teacher = objective.teacher
    ExpertExport(student, str(path), "patch", str(tmp_path / "datalist.json"), range(16), {"kind": "mae"}, {"epochs": 2},
                 teacher).attach(engine)
    engine.run(data, max_epochs=2)
    read = read_expert_metadata(path)
    assert read["level"] == "patch" and read["backbone"] == "tiny_tinyvit" and read["rank"] == 4
    assert read["epochs_done"] == 2 and read["data"]["unlabeled_slices"] == 16 and read["img_size"] == 64
    # a fresh student: same frozen base (random backbone here), the file changes its embedding
    fresh = ExpertStudent("tiny_tinyvit", checkpoint="")
    fresh.load_state_dict({k: v for k, v in student.state_dict().items() if ".expert." not in k}, strict=False)
    x = _slices(2, 64, seed=3)
    fresh.eval(), student.eval()
    with torch.no_grad():
        before = fresh(x)
        load_expert(path, fresh.experts())
        after = fresh(x)
        assert not torch.allclose(before, after, atol=1e-4)
        assert torch.allclose(after, student(x), atol=1e-5)
    # and it plugs into the SAMora network as that level's expert (gate 0 at start, so set it)
    net = SAMoraNet(3, backbone="tiny_tinyvit", checkpoint="", method="samora", levels=("patch",))
    net.load_expert("patch", str(path))
    assert torch.equal(net.sites[0].experts["patch"].b_q, fresh.experts()[0].b_q)


def test_bundle_stage1_quick_all_levels(tmp_path):
    """``pretrain --level all`` through the bundle configs: teachers and three expert files written."""
    from samora_components.bundle.workflow import pretrain
    from samora_components.data.phantom import generate

    datalist = generate(str(tmp_path / "phantom_ct"), "ct", cases=2, unlabeled=2, shape=(48, 48, 8))
    steps = pretrain(
        "bundles/samora_ct", "all", quick=True, datalist=datalist, backbone="tiny_tinyvit", img_size=64,
        backbone_checkpoint="", expert_dir=str(tmp_path / "experts"), teacher_dir=str(tmp_path / "teachers"),
        output_dir=f"$'{tmp_path}/run_' + @level", epochs=1, epoch_length=2, batch_size=4, decoder_width=8,
    )
    assert steps == ["cpt_simclr", "cpt_mae", "image", "patch", "pixel"]
    assert (tmp_path / "teachers" / "simclr_cpt.pt").is_file() and (tmp_path / "teachers" / "mae_cpt.pt").is_file()
    for level in ("image", "patch", "pixel"):
        meta = read_expert_metadata(tmp_path / "experts" / f"lora_{level}.safetensors")
        assert meta["level"] == level and meta["epochs_done"] == 1
    image_meta = read_expert_metadata(tmp_path / "experts" / "lora_image.safetensors")
    assert image_meta["teacher"]["checkpoint"].endswith("simclr_cpt.pt")  # distilled from the CPT teacher
    history = json.loads((tmp_path / "run_pixel" / "loss.json").read_text())
    assert history["iterations"] == 2 and (tmp_path / "run_pixel" / "loss.png").is_file()
    last = torch.load(tmp_path / "run_image" / "last.pt", weights_only=True)
    assert set(last) == {"objective", "optimizer", "lr_scheduler", "trainer", "random", "run"}
    assert all(".expert." in k or k.startswith("head.") for k in last["objective"])  # no frozen weights


def test_pretrain_rejects_bad_levels_and_paths(tmp_path):
    from samora_components.bundle.workflow import pretrain

    with pytest.raises(ValueError, match="unknown level"):
        pretrain("bundles/samora_ct", "voxel")
    with pytest.raises(ValueError, match="teacher-checkpoint"):
        pretrain("bundles/samora_ct", "all", teacher_checkpoint="x.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        pretrain("bundles/samora_ct", "image", teacher_checkpoint=str(tmp_path / "missing.pth"))
