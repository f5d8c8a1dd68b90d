"""Data-parallel stage-2 training (``multi_gpu_train.yaml``) with two real CPU processes (torchrun,
gloo) on the tiny MR phantom: both ranks finish with identical weights after every epoch, the
``DistributedSampler`` splits each epoch into disjoint shares, rank 0 alone writes files and logs,
and the run follows a 1-process run with the same global batch (measured agreement below)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Events
from monai.bundle import run as bundle_run

from samora_components.data.phantom import generate

REPO = Path(__file__).resolve().parents[1]
MR = REPO / "bundles" / "samora_mr" / "configs"
EPOCHS, BATCH = 2, 4  # global batch; 16 training slices -> 4 iterations per epoch, 2 slices per rank each

#: 1-process vs 2-process agreement: the largest absolute difference of any trainable weight after each
#: epoch, relative to the largest change of any weight since the start. Per-sample Dice and no
#: augmentation make the gradient of the global batch the mean of the ranks' gradients in exact
#: arithmetic; only the order of float sums differs. Measured on this phantom (2 epochs, 8 AdamW
#: steps): 4.4e-6 / 2.5e-3 = 1.7e-3 after epoch 1, 5.1e-6 / 3.7e-3 = 1.4e-3 after epoch 2, all of it in
#: attention key biases, whose exact gradient is 0 (softmax ignores a constant shift): AdamW turns
#: their rounding noise into steps of up to the learning rate. Every other weight agrees to ~3e-6.
RELATIVE_TOLERANCE = 1e-2


class RankProbe:
    """Test-only handler: records, per rank and epoch, the sampler's indices (at EPOCH_STARTED,
    after MONAI's ``set_epoch``) and the trainable weights (at EPOCH_COMPLETED; epoch 0 = start)."""

    def __init__(self, network, sampler, folder: str) -> None:
        self.network, self.sampler, self.folder = network, sampler, Path(folder)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.indices: list[int] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._weights)
        engine.add_event_handler(Events.EPOCH_STARTED, self._indices)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._weights)

    def _indices(self, engine) -> None:
        self.indices = [int(i) for i in self.sampler]

    def _weights(self, engine) -> None:
        weights = {k: v.detach().clone() for k, v in self.network.named_parameters() if v.requires_grad}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "indices": self.indices, "iteration": engine.state.iteration},
                   self.folder / f"rank{self.rank}_epoch{engine.state.epoch}.pt")


def _settings(root: Path, datalist: str, probe: Path, **extra) -> dict:
    """The tiny configuration (tests/test_bundles.py's TINY) without augmentation and with a
    per-sample Dice, plus the probe."""
    return {
        "bundle_root": str(root), "datalist": datalist, "backbone": "tiny_tinyvit", "backbone_checkpoint": "",
        "img_size": 32, "fit_windows": True, "epochs": EPOCHS, "batch_size": BATCH, "warmup_iters": 2,
        "val_interval": 1, "elastic_prob": 0.0, "train#augment": None, "base_loss#batch": False,
        "probe": {"_target_": "test_ddp.RankProbe", "network": "@network_def", "sampler": "@train#sampler",
                  "folder": str(probe)},
        "run": ["$@probe.attach(@train#trainer)", "$@train#trainer.run()"],
        **extra,
    }


@pytest.fixture(scope="module")
def mr_phantom(tmp_path_factory) -> str:
    # 4 cases: 2 train (2 x 8 axial slices), 1 validation, 1 test
    return generate(str(tmp_path_factory.mktemp("data") / "phantom_mr"), "mr", cases=4, unlabeled=0, shape=(32, 32, 8))


def test_the_override_keeps_every_rank_entries_and_skips_the_rank0_only_ones():
    """multi_gpu_train.yaml names entries of train.yaml's lists by index: they must stay what it says."""
    override = yaml.safe_load((REPO / "bundles" / "common" / "configs" / "multi_gpu_train.yaml").read_text())
    skipped = {key for key, value in override.items() if key.endswith("#_disabled_") and value == "@not_rank0"}
    for bundle in ("samora_ct", "samora_mr"):
        config = yaml.safe_load((REPO / "bundles" / bundle / "configs" / "train.yaml").read_text())
        train = [h["_target_"].rsplit(".", 1)[-1] for h in config["train"]["handlers"]]
        validate = [h["_target_"].rsplit(".", 1)[-1] for h in config["validate"]["handlers"]]
        assert train == ["LrScheduleHandler", "Validation", "StageWeightSchedule", "StatsHandler",
                         "TensorBoardStatsHandler", "TrainingCheckpoint", "ProgressBar", "ModelSaver", "LoRAHubSearch"]
        assert validate == ["StatsHandler", "TensorBoardStatsHandler", "ValidationHistory"]
        every_rank = {i for i in range(len(train)) if f"train#handlers#{i}#_disabled_" not in skipped}
        assert {train[i] for i in every_rank} == {"LrScheduleHandler", "Validation", "StageWeightSchedule",
                                                  "TrainingCheckpoint"}
        assert all(f"validate#handlers#{i}#_disabled_" in skipped for i in range(len(validate)))


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """stdout + stderr of each rank as torchrun's --log-dir keeps them (``.../<rank>/stdout.log``)."""
    logs: dict[int, str] = {}
    for path in sorted(log_dir.rglob("*.log")):
        if path.parent.name.isdigit():
            logs[int(path.parent.name)] = logs.get(int(path.parent.name), "") + path.read_text()
    return logs


def _torchrun(files: list[str], log_dir: Path) -> dict[int, str]:
    """Run the MR bundle's config ``files`` in 2 torchrun processes (CPU, gloo); each rank's log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "monai.bundle", "run", "training", "--config_file", str(files),
               "--meta_file", str(MR / "metadata.json"), "--logging_file", str(MR / "logging.conf")]
    torchrun = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = torchrun.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        torchrun.terminate()  # torchrun stops its workers on SIGTERM
        _, stderr = torchrun.communicate(timeout=60)
    logs = _rank_logs(log_dir)
    assert torchrun.returncode == 0, stderr[-3000:] + "\n".join(text[-3000:] for text in logs.values())
    return logs


def _load(folder: Path, rank: int, epoch: int) -> dict:
    return torch.load(folder / f"rank{rank}_epoch{epoch}.pt", map_location="cpu", weights_only=True)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, mr_phantom):
    ddp_root, ddp_probe = tmp_path / "ddp", tmp_path / "probe_ddp"
    settings = tmp_path / "tiny_ddp.yaml"
    settings.write_text(yaml.safe_dump(_settings(ddp_root, mr_phantom, ddp_probe)))
    files = [str(MR / "train.yaml"), str(MR / "multi_gpu_train.yaml"), str(settings)]
    logs = _torchrun(files, tmp_path / "logs")

    # the 1-process reference: same files without the override, the same shuffled order (a sampler
    # of one replica with the same seed), the whole global batch in one step
    ref_root, ref_probe = tmp_path / "one", tmp_path / "probe_one"
    reference = tmp_path / "tiny_one.yaml"
    sampler = {"_target_": "DistributedSampler", "dataset": "@train#dataset", "num_replicas": 1, "rank": 0,
               "shuffle": True, "even_divisible": True, "seed": "@seed"}
    reference.write_text(yaml.safe_dump(_settings(ref_root, mr_phantom, ref_probe, **{"train#sampler": sampler})))
    bundle_run(run_id="training", config_file=[str(MR / "train.yaml"), str(reference)],
               meta_file=str(MR / "metadata.json"), logging_file=str(MR / "logging.conf"))

    n = len(_load(ref_probe, 0, 1)["indices"])
    assert n == 16
    for epoch in range(0, EPOCHS + 1):
        ranks = [_load(ddp_probe, rank, epoch) for rank in (0, 1)]
        one = _load(ref_probe, 0, epoch)
        # every rank holds the same trainable weights, bit for bit
        assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys() == one["weights"].keys()
        assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in one["weights"])
        if epoch == 0:  # DDP starts every rank from rank 0's weights, which are the 1-process run's
            start = one["weights"]
            assert all(torch.equal(ranks[0]["weights"][k], start[k]) for k in start)
            continue
        # disjoint shares that together are the 1-process run's shuffled epoch, interleaved
        share0, share1 = ranks[0]["indices"], ranks[1]["indices"]
        assert len(share0) == len(share1) == n // 2 and not set(share0) & set(share1)
        assert sorted(share0 + share1) == list(range(n))
        assert share0 == one["indices"][0::2] and share1 == one["indices"][1::2]
        # as many steps as the 1-process run (global batch 4 = 2 per rank)
        assert ranks[0]["iteration"] == ranks[1]["iteration"] == one["iteration"] == epoch * n // BATCH
        change = max(float((one["weights"][k] - start[k]).abs().max()) for k in start)
        diff = max(float((ranks[0]["weights"][k] - one["weights"][k]).abs().max()) for k in start)
        assert change > 1e-3  # the weights did move
        assert diff <= RELATIVE_TOLERANCE * change, (epoch, diff, change)
    epochs = [_load(ddp_probe, 0, e)["indices"] for e in (1, 2)]
    assert epochs[0] != epochs[1]  # set_epoch reshuffles every epoch

    # rank 0 alone writes: the same files as the 1-process run, one TensorBoard file per writer
    def written(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)).split(".tfevents")[0] for p in root.rglob("*") if p.is_file())
    assert written(ddp_root) == written(ref_root)
    assert (ddp_root / "models" / "model.pt").is_file() and (ddp_root / "runs" / "samed" / "last.pt").is_file()
    card = yaml.safe_load((ddp_root / "models" / "model.json").read_text())
    assert card["epochs_done"] == EPOCHS
    final = torch.load(ddp_root / "models" / "model.pt", map_location="cpu", weights_only=True)
    last = _load(ddp_probe, 0, EPOCHS)["weights"]
    assert all(torch.equal(final[k], last[k]) for k in last)
    # and alone logs: weights, validation and the progress bar appear in rank 0's output only
    assert set(logs) == {0, 1}
    assert "written to" in logs[0] and "written to" not in logs[1]
    assert "val_mean_dice" in logs[0] and "val_mean_dice" not in logs[1]
    assert "Epoch[1] Complete" in logs[0] and "Epoch[" not in logs[1]  # engines' reports: rank 0 only
    assert "ignite.engine" not in logs[1] and "samora_components" not in logs[1]
    assert "train [1/2]" in logs[0] and "train [1/2]" not in logs[1]


# ---------------------------------------------------------------- stage 1


class ObjectiveProbe(RankProbe):
    """RankProbe for stage 1: the objective's trainable weights (its expert and head) per epoch."""

    def _weights(self, engine) -> None:
        weights = {k: v.detach().clone() for k, v in self.network.named_parameters() if v.requires_grad}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": weights, "indices": self.indices, "iteration": engine.state.iteration},
                   self.folder / f"rank{self.rank}_epoch{engine.state.epoch}.pt")


def _stage1_settings(root: Path, datalist: str, probe: Path, **extra) -> dict:
    """Patch-level expert on the tiny backbone with a tiny MAE teacher (random weights: DDP starts every
    rank from rank 0's), the phantom's training images as the pool, no augmentation."""
    return {
        "bundle_root": str(root), "datalist": datalist, "pool_section": "training", "backbone": "tiny_tinyvit",
        "backbone_checkpoint": "", "img_size": 32, "fit_windows": True, "teacher_config": "tiny",
        "epochs": EPOCHS, "warmup_epochs": 0, "batch_size": BATCH, "lr_scaling": "none", "base_lr": 1e-3,
        "pool_slice_transforms": {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32]},
        "probe": {"_target_": "test_ddp.ObjectiveProbe", "network": "@objective", "sampler": "@sampler",
                  "folder": str(probe)},
        "run": ["$samora_components.bundle.workflow.attach_handlers(@trainer, @handlers)",
                "$@trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED, lambda e: @sampler.set_epoch(e.state.epoch))",
                "$@probe.attach(@trainer)",
                "$@trainer.run(@dataloader, max_epochs=@epochs, epoch_length=@iters_per_epoch)"],
        **extra,
    }


def test_stage1_handler_indices_of_the_override():
    """multi_gpu_pretrain.yaml names entries of pretrain.yaml's handler list by index."""
    override = yaml.safe_load((REPO / "bundles" / "common" / "configs" / "multi_gpu_pretrain.yaml").read_text())
    for bundle in ("samora_ct", "samora_mr"):
        config = yaml.safe_load((REPO / "bundles" / bundle / "configs" / "pretrain.yaml").read_text())
        names = [h if isinstance(h, str) else h["_target_"].rsplit(".", 1)[-1] for h in config["handlers"]]
        assert names == ["LrScheduleHandler", "StatsHandler", "TensorBoardStatsHandler", "TrainingCheckpoint",
                         "ProgressBar", "@export", "LossHistory"]
    skipped = {int(k.split("#")[1]) for k, v in override.items() if k.endswith("#_disabled_") and v == "@not_rank0"}
    assert skipped == {1, 2, 4, 6} and "process_rank() == 0" in override["handlers#5"]


def test_stage1_two_processes_train_the_expert_like_one(tmp_path, mr_phantom):
    ddp_root, ddp_probe = tmp_path / "ddp", tmp_path / "probe_ddp"
    settings = tmp_path / "stage1_ddp.yaml"
    settings.write_text(yaml.safe_dump(_stage1_settings(ddp_root, mr_phantom, ddp_probe)))
    files = [str(MR / "pretrain.yaml"), str(MR / "pretrain_patch.yaml"), str(MR / "multi_gpu_pretrain.yaml"),
             str(settings)]
    logs = _torchrun(files, tmp_path / "logs")

    ref_root, ref_probe = tmp_path / "one", tmp_path / "probe_one"
    sampler = {"_target_": "DistributedSampler", "dataset": "@pool", "num_replicas": 1, "rank": 0,
               "shuffle": True, "even_divisible": True, "seed": "@seed"}
    reference = tmp_path / "stage1_one.yaml"
    reference.write_text(yaml.safe_dump(_stage1_settings(ref_root, mr_phantom, ref_probe, sampler=sampler,
                                                         **{"dataloader#sampler": "@sampler", "dataloader#shuffle": False})))
    bundle_run(run_id="training", config_file=[str(MR / "pretrain.yaml"), str(MR / "pretrain_patch.yaml"), str(reference)],
               meta_file=str(MR / "metadata.json"), logging_file=str(MR / "logging.conf"))

    n = len(_load(ref_probe, 0, 1)["indices"])
    assert n == 16
    start = _load(ref_probe, 0, 0)["weights"]
    for epoch in range(0, EPOCHS + 1):
        ranks = [_load(ddp_probe, rank, epoch) for rank in (0, 1)]
        one = _load(ref_probe, 0, epoch)
        assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in one["weights"])
        if epoch == 0:
            assert all(torch.equal(ranks[0]["weights"][k], start[k]) for k in start)
            continue
        share0, share1 = ranks[0]["indices"], ranks[1]["indices"]
        assert not set(share0) & set(share1) and sorted(share0 + share1) == list(range(n))
        assert share0 == one["indices"][0::2] and share1 == one["indices"][1::2]
        assert ranks[0]["iteration"] == one["iteration"] == epoch * n // BATCH
        change = max(float((one["weights"][k] - start[k]).abs().max()) for k in start)
        diff = max(float((ranks[0]["weights"][k] - one["weights"][k]).abs().max()) for k in start)
        assert change > 1e-4 and diff <= RELATIVE_TOLERANCE * change, (epoch, diff, change)

    def written(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)).split(".tfevents")[0] for p in root.rglob("*") if p.is_file())
    assert written(ddp_root) == written(ref_root)
    assert (ddp_root / "models" / "experts" / "lora_patch.safetensors").is_file()
    assert "written to" in logs[0] and "written to" not in logs[1]
    assert "Epoch[" not in logs[1] and "patch [1/2]" not in logs[1]
