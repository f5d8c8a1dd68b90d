"""Nothing lost on SIGKILL: a stage-2 (and a stage-1) training run killed outright, after a checkpoint or in the
middle of writing one, and started again with the same command (``resume: auto``, the default) repeats at most
one epoch, leaves no partial file, and ends with exactly the weights of an uninterrupted run (seeded,
on the CPU, with augmentation on: the checkpoint carries every random stream)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samora_components.data.phantom import generate
from samora_components.engines.handlers import HOLD_ENV

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


@pytest.fixture(scope="module")
def mr_phantom(tmp_path_factory) -> str:
    # 4 cases: 2 train (2 x 8 axial slices), 1 validation, 1 test
    return generate(str(tmp_path_factory.mktemp("data") / "phantom_mr"), "mr", cases=4, unlabeled=0, shape=(32, 32, 8))


def _command(root: Path, datalist: str) -> list[str]:
    """The tiny quick-profile training command, with augmentation (the quick profile's: affine,
    flips, contrast, intensity shift) and validation after every epoch."""
    return [sys.executable, "-m", "samora_components", "train", "--bundle", "bundles/samora_mr", "--quick", "True",
            "--bundle_root", str(root), "--datalist", datalist, "--backbone", "tiny_tinyvit",
            "--backbone_checkpoint", "", "--img_size", "32", "--epochs", str(EPOCHS), "--batch_size", "4",
            "--warmup_iters", "2", "--val_interval", "1"]


def _start(root: Path, datalist: str, **env) -> subprocess.Popen:
    # one thread each: runs go two at a time on two cores, and every run computes alike
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    log = open(root.parent / f"{root.name}.log", "a")
    return subprocess.Popen(_command(root, datalist), cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.01)


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def _finish(process: subprocess.Popen, root: Path) -> str:
    status = process.wait(timeout=180)
    log = (root.parent / f"{root.name}.log").read_text()
    assert status == 0, log[-4000:]
    return log


def _checkpoint(root: Path) -> dict:
    return torch.load(root / "runs" / "samed" / "last.pt", map_location="cpu", weights_only=True)


def _epoch(checkpoint: dict) -> int:
    return checkpoint["trainer"]["iteration"] // checkpoint["trainer"]["epoch_length"]


def _partials(root: Path) -> list[Path]:
    return sorted((root / "runs" / "samed").glob(".partial-*-last.pt"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_anywhere_then_the_same_command_ends_with_the_uninterrupted_weights(tmp_path, mr_phantom):
    reference, after_epoch, mid_write = tmp_path / "reference", tmp_path / "after_epoch", tmp_path / "mid_write"
    uninterrupted = _start(reference, mr_phantom)

    # 1. killed as soon as the first checkpoint exists (the start of epoch 2)
    victim = _start(after_epoch, mr_phantom)
    _wait_for(lambda: (after_epoch / "runs" / "samed" / "last.pt").exists(), victim)
    _kill(victim)
    killed_at = _epoch(_checkpoint(after_epoch))  # loads: the file is complete
    assert killed_at in (1, 2)
    resumed = _start(after_epoch, mr_phantom)

    # 2. killed in the middle of writing epoch 2's checkpoint (held there half written by the hook)
    holder = _start(mid_write, mr_phantom, **{HOLD_ENV: "2"})
    _wait_for(lambda: (mid_write / "runs" / "samed" / "last.pt").exists() and bool(_partials(mid_write)), holder)
    _kill(holder)
    assert _epoch(_checkpoint(mid_write)) == 1  # the previous checkpoint is intact
    assert len(_partials(mid_write)) == 1  # what the kill left: a hidden temporary file
    log_resumed = _finish(resumed, after_epoch)
    again = _start(mid_write, mr_phantom)

    log_reference = _finish(uninterrupted, reference)
    log_again = _finish(again, mid_write)
    assert "resumed from" not in log_reference
    # each resumed run went on after the last epoch it had finished: at most one epoch repeated
    assert f"after epoch {killed_at}" in log_resumed.split("resumed from", 1)[1].splitlines()[0]
    assert "after epoch 1" in log_again.split("resumed from", 1)[1].splitlines()[0]
    assert "left by an interrupted write" in log_again and _partials(mid_write) == []

    for root in (after_epoch, mid_write):
        # the same final weights, bit for bit, and the same resumable state and learning curve
        assert _same_weights(reference / "models" / "model.pt", root / "models" / "model.pt")
        final, expected = _checkpoint(root), _checkpoint(reference)
        assert _epoch(final) == EPOCHS and final["trainer"] == expected["trainer"]
        assert all(torch.equal(final["network"][k], expected["network"][k]) for k in expected["network"])
        assert torch.equal(final["random"][0]["torch"], expected["random"][0]["torch"])
        curve = json.loads((root / "runs" / "samed" / "validation.json").read_text())
        assert curve == json.loads((reference / "runs" / "samed" / "validation.json").read_text())
        assert curve["epochs"] == [1, 2, 3]
        card = json.loads((root / "models" / "model.json").read_text())
        assert card["epochs_done"] == EPOCHS


def _pretrain_command(root: Path, datalist: str) -> list[str]:
    """Stage 1, pixel level (no teacher), quick profile, tiny student; full passes over the 16 pool
    slices (4 iterations per epoch)."""
    return [sys.executable, "-m", "samora_components", "pretrain", "--bundle", "bundles/samora_mr", "--level", "pixel",
            "--quick", "True", "--bundle_root", str(root), "--datalist", datalist, "--backbone", "tiny_tinyvit",
            "--backbone_checkpoint", "", "--img_size", "32", "--epochs", str(EPOCHS), "--batch_size", "4",
            "--decoder_width", "8"]


def test_stage1_sigkill_after_a_checkpoint_then_the_same_command_ends_with_the_uninterrupted_expert(tmp_path):
    datalist = generate(str(tmp_path / "phantom_mr"), "mr", cases=2, unlabeled=2, shape=(32, 32, 8))
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = {}
    for name in ("reference", "victim"):
        root = tmp_path / name
        runs[name] = (root, open(tmp_path / f"{name}.log", "a"))

    def start(name: str) -> subprocess.Popen:
        root, log = runs[name]
        return subprocess.Popen(_pretrain_command(root, datalist), cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT)

    uninterrupted, victim = start("reference"), start("victim")
    checkpoint = runs["victim"][0] / "runs" / "pretrain_pixel" / "last.pt"
    _wait_for(checkpoint.exists, victim)
    _kill(victim)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    killed_at = state["trainer"]["iteration"] // state["trainer"]["epoch_length"]
    assert killed_at in (1, 2)
    for process in (start("victim"), uninterrupted):
        assert process.wait(timeout=180) == 0, (tmp_path / "victim.log").read_text()[-4000:]
    log = (tmp_path / "victim.log").read_text()
    assert f"after epoch {killed_at}" in log.split("resumed from", 1)[1].splitlines()[0]

    expert = "models/experts/lora_pixel.safetensors"
    a, b = (load_file(str(runs[name][0] / expert)) for name in ("reference", "victim"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref, resumed = (torch.load(runs[name][0] / "runs" / "pretrain_pixel" / "last.pt", map_location="cpu", weights_only=True)
                    for name in ("reference", "victim"))
    assert resumed["trainer"] == ref["trainer"]
    assert all(torch.equal(resumed["objective"][k], ref["objective"][k]) for k in ref["objective"])
    # the loss history keeps the epochs before the kill: the same curve as the uninterrupted run
    curves = [json.loads((runs[name][0] / "runs" / "pretrain_pixel" / "loss.json").read_text()) for name in ("reference", "victim")]
    assert curves[0] == curves[1] and curves[0]["epochs"] == [1, 2, 3]


def _tiny_run(folder: Path, epochs: int, resume, width: int = 3, stop_after: int | None = None) -> tuple[int, list[str]]:
    """A 2-iteration-per-epoch Ignite run of a Linear network with a TrainingCheckpoint; returns the
    epoch the run started from and the checkpoint's log lines."""
    import logging

    from ignite.engine import Engine, Events

    from samora_components.engines.handlers import TrainingCheckpoint

    net = torch.nn.Linear(width, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, batch):
        opt.zero_grad()
        net(batch).sum().backward()
        opt.step()

    engine = Engine(step)
    TrainingCheckpoint(str(folder), {"network": net, "optimizer": opt}, resume=resume).attach(engine)
    started = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    if stop_after is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("samora_components.engines.handlers")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine.run([torch.ones(2, width)] * 2, max_epochs=epochs)
    finally:
        logger.removeHandler(handler)
    return started[0], records


def test_resume_auto_continues_only_an_unfinished_run_with_the_same_settings(tmp_path):
    assert _tiny_run(tmp_path, 4, "auto", stop_after=2)[0] == 1  # stopped after epoch 2 of 4
    first, log = _tiny_run(tmp_path, 4, "auto")
    assert first == 3 and any("resumed from" in line for line in log)  # the same command goes on
    first, log = _tiny_run(tmp_path, 4, "auto")  # that run finished: a rerun is a new run
    assert first == 1 and any("finished all 4 epochs" in line for line in log)
    _tiny_run(tmp_path, 4, "auto", stop_after=1)
    first, log = _tiny_run(tmp_path, 6, "auto")  # other settings (epochs): from scratch, said so
    assert first == 1 and any("other settings" in line for line in log)
    _tiny_run(tmp_path, 6, "auto", stop_after=1)
    assert _tiny_run(tmp_path, 6, "auto", width=5)[0] == 1  # another network: from scratch
    _tiny_run(tmp_path, 6, False, stop_after=1)
    assert _tiny_run(tmp_path, 6, False)[0] == 1  # false: always from scratch
    with pytest.raises(ValueError, match="resume must be"):
        _tiny_run(tmp_path, 2, "yes")
