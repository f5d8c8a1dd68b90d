"""Bundles: running configs with profiles, model cards, volume inference."""

from . import cards, evaluator, inference, inferers, workflow

__all__ = ["cards", "evaluator", "inference", "inferers", "workflow"]
