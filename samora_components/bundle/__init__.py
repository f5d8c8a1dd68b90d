"""Bundles: running configs with profiles, model cards, volume inference."""

from . import cards, evaluator, inference, workflow

__all__ = ["cards", "evaluator", "inference", "workflow"]
