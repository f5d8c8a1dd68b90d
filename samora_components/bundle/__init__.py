"""Bundles: running configs with profiles, model cards, volume inference."""

from . import cards, evaluator, export, inference, inferers, workflow

__all__ = ["cards", "evaluator", "export", "inference", "inferers", "workflow"]
