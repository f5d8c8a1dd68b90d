"""Engines: stage-1 pre-training (student, objectives, Ignite step), handlers and LR schedules of
both stages, the stage-2 losses (H-SAM's stage-weighted loss). Stage 2 runs on MONAI's
``SupervisedTrainer``, wired by ``train.yaml``."""

from . import handlers, losses, pretrain, schedules

__all__ = ["handlers", "losses", "pretrain", "schedules"]
