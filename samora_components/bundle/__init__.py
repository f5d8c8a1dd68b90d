"""Bundles: running configs with profiles, model cards, volume inference."""

from . import cards, inference, workflow

__all__ = ["cards", "inference", "workflow"]
