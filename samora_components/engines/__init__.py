"""Engines: stage-1 pre-training (student, objectives, Ignite step), handlers and LR schedules of
both stages. Stage 2 runs on MONAI's ``SupervisedTrainer``, wired by ``train.yaml``."""

from . import handlers, pretrain, schedules

__all__ = ["handlers", "pretrain", "schedules"]
