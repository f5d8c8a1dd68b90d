"""Small Ignite handlers the bundle configs attach to MONAI engines."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers import ProgressBar as _IgniteProgressBar

logger = logging.getLogger(__name__)

__all__ = ["ProgressBar", "ModelCardWriter", "TrainingCheckpoint", "TrainableState", "LossHistory"]


class ProgressBar:
    """Ignite's tqdm progress bar, configurable from a bundle (MONAI calls ``attach(engine)`` only).

    Args:
        output_transform: maps ``engine.state.output`` to a number or dict shown on the bar.
        desc: bar description.
    """

    def __init__(self, output_transform: Callable | None = None, desc: str = "", persist: bool = False) -> None:
        self.output_transform = output_transform
        self.bar = _IgniteProgressBar(persist=persist, desc=desc)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)


class ModelCardWriter:
    """Writes ``model.json`` (the architecture and provenance of ``model.pt``) next to the weights
    each time validation improves, so the two files always describe the same model.

    Attach to the validation evaluator, after its ``CheckpointSaver``.

    Args:
        path: where to write the card.
        card: configuration values (see :data:`samora_components.workflow.MODEL_CARD_KEYS`).
    """

    def __init__(self, path: str, card: dict) -> None:
        self.path = path
        self.card = dict(card)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from .workflow import write_json

        state = engine.state
        if state.best_metric_epoch != state.epoch:
            return
        card = dict(self.card)
        card.update(
            best_metric=float(state.best_metric),
            best_epoch=int(state.best_metric_epoch),
            saved=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        write_json(self.path, card)


class TrainingCheckpoint:
    """Everything needed to resume (network, optimizer, scheduler and the trainer's own counters),
    written to ``save_dir/filename`` after every epoch through a temporary file and a rename, so
    an interrupted run always leaves a complete checkpoint of its last finished epoch.

    With ``resume=True`` an existing checkpoint is loaded when the run starts and training goes on
    from the epoch after it. The trainer cannot be referenced from its own handler list in a
    config, so it joins the saved objects at ``attach`` time.

    Args:
        save_dir: folder of the checkpoint.
        save_dict: objects with ``state_dict``/``load_state_dict`` besides the trainer.
        resume: continue from an existing checkpoint.
        filename: checkpoint name.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool = False, filename: str = "last.pt") -> None:
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.filename = filename

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        self._objects = {**self.save_dict, "trainer": engine}
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _load(self, engine: Engine) -> None:
        if not os.path.isfile(self.path):
            logger.info("no checkpoint at %s: starting from scratch", self.path)
            return
        Checkpoint.load_objects(to_load=self._objects, checkpoint=torch.load(self.path, map_location="cpu", weights_only=True))
        logger.info("resumed from %s after epoch %d", self.path, engine.state.epoch)

    def _save(self, engine: Engine) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        tmp = self.path + ".partial"
        torch.save({name: obj.state_dict() for name, obj in self._objects.items()}, tmp)
        os.replace(tmp, self.path)


class TrainableState:
    """``state_dict``/``load_state_dict`` view of a module restricted to what training changes:
    parameters with ``requires_grad`` and the buffers of modules that own such parameters.

    Resumable checkpoints of stage 1 then hold the expert and its head (or the teacher during CPT),
    not the frozen SAM encoder or a frozen teacher.
    """

    def __init__(self, module) -> None:
        self.module = module

    def _keys(self) -> set[str]:
        keys = set()
        for name, child in self.module.named_modules():
            own = list(child.named_parameters(recurse=False))
            if any(p.requires_grad for _, p in own):
                prefix = f"{name}." if name else ""
                keys |= {prefix + n for n, p in own if p.requires_grad}
                keys |= {prefix + n for n, _ in child.named_buffers(recurse=False)}
        return keys

    def state_dict(self) -> dict:
        keys = self._keys()
        return {k: v for k, v in self.module.state_dict().items() if k in keys}

    def load_state_dict(self, state: dict) -> None:
        missing = self._keys() - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable entries, e.g. {sorted(missing)[:3]}")
        self.module.load_state_dict(state, strict=False)


class LossHistory:
    """Records the mean training loss of every epoch in ``path`` (JSON) and draws it next to it
    (``.png``), rewriting both after each epoch.

    The JSON holds ``{"epochs": [...], "loss": [...], "first_iterations": [...], "iterations": n}``;
    ``first_iterations`` keeps the losses of the first ten iterations (before any averaging).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch_losses: list[float] = []
        self.first: list[float] = []
        self._running: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        loss = float(engine.state.output["loss"])
        self._running.append(loss)
        if len(self.first) < 10:
            self.first.append(loss)

    def _epoch(self, engine: Engine) -> None:
        from .workflow import write_json

        if self._running:
            self.epoch_losses.append(sum(self._running) / len(self._running))
        self._running = []
        epochs = list(range(1, len(self.epoch_losses) + 1))
        write_json(self.path, {"epochs": epochs, "loss": self.epoch_losses, "first_iterations": self.first,
                               "iterations": int(engine.state.iteration)})
        from .plots import line_plot

        line_plot(epochs, {"training loss": self.epoch_losses}, self.path.rsplit(".", 1)[0] + ".png",
                  xlabel="epoch", ylabel="loss", title="stage-1 training loss")
