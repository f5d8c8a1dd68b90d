"""Metrics: per-case Dice/HD95 under the paper protocols, evaluation reports and plots."""

from . import cases, plots, reports

__all__ = ["cases", "plots", "reports"]
