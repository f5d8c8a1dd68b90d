"""Small Ignite handlers the bundle configs attach to MONAI engines."""

from __future__ import annotations

from collections.abc import Callable

from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

__all__ = ["ProgressBar", "ModelCardWriter", "TrainingCheckpoint"]


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
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import datetime

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
    """Saves everything needed to resume (network, optimizer, scheduler and the trainer itself)
    after every epoch and at the end, and resumes from it when asked.

    The trainer cannot be referenced from its own handler list in a config, so it is added here
    at ``attach`` time.

    Args:
        save_dir: folder for ``last.pt``-style files (ignite keeps one, written atomically).
        save_dict: objects with ``state_dict`` besides the trainer.
        resume: load ``save_dir/<filename>`` when training starts, if it exists.
        filename: checkpoint name.
    """

    def __init__(self, save_dir: str, save_dict: dict, resume: bool = False, filename: str = "last.pt") -> None:
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.filename = filename

    def attach(self, engine: Engine) -> None:
        import os

        from monai.handlers import CheckpointLoader, CheckpointSaver

        objects = {**self.save_dict, "trainer": engine}
        path = os.path.join(self.save_dir, self.filename)
        if self.resume and os.path.isfile(path):
            CheckpointLoader(load_path=path, load_dict=objects, map_location="cpu").attach(engine)
        CheckpointSaver(
            save_dir=self.save_dir, save_dict=objects, save_interval=1, n_saved=1, save_final=True, final_filename=self.filename,
        ).attach(engine)
