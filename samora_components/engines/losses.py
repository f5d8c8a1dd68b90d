"""Stage-2 losses: the stage-weighted loss of the H-SAM decoder and its stage-weight schedule.

H-SAM supervises both decoding stages (H-SAM paper §3.4 "Deep Supervision" and its appendix A.1;
SAMora appendix A.1, which H-SAMora follows):

```
L_total = λ_w · L(stage 1, gt at stage 1's grid) + (1 − λ_w) · L(stage 2, gt at full resolution)
```

L is the bundle's base loss (``DiceCELoss`` in ``train.yaml``); the ground truth is resized (nearest)
to each stage's grid, so stage 1 (4x the embedding grid: 1/4 of a SAM ViT input) is supervised at
1/4 resolution and stage 2 at full resolution, as the paper says.

λ_w "gradually decreases in the way of exponential decay, from 0.4 to 0" (both appendices, over
H-SAM's 300 epochs). The formula is the one of the public H-SAM trainer, whose stage-2 weight is
``0.6 ** (0.99 ** epoch)``; the run's progress p in [0, 1] stands for its epoch counter, scaled so
that any run covers the paper's 300 epochs:

```
λ_w(p) = 1 − (1 − λ0) ** (ρ ** (N · p)),   λ0 = 0.4, ρ = 0.99, N = 300
p = (iteration − 1) / (total iterations − 1)
```

so λ_w is 0.4 at the first iteration and 1 − 0.6 ** (0.99 ** 300) ≈ 0.025 at the last (for large
N·p it behaves like 0.51 · 0.99 ** (N·p), an exponential decay). :class:`StageWeightSchedule`, an
Ignite handler of the trainer, sets it before every iteration from the engine state (so a resumed
run continues the schedule where it stopped).

:class:`StageWeightedLoss` takes a plain logit tensor too (the SAMed decoder, eval-mode outputs,
LoRAHub's search): then it is exactly the base loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["StageWeightSchedule", "StageWeightedLoss", "resize_target", "stage1_weight"]


def stage1_weight(progress: float, start: float = 0.4, decay: float = 0.99, epochs: int = 300) -> float:
    """λ_w at ``progress`` in [0, 1] of the run (see the module docstring):
    ``1 − (1 − start) ** (decay ** (epochs · progress))``; ``start`` at 0, about 0.025 at 1."""
    if not 0.0 <= start < 1.0:
        raise ValueError(f"the stage-1 start weight must be in [0, 1), got {start}")
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - (1.0 - start) ** (decay ** (epochs * progress))


def resize_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class-index labels (B, 1, H, W) -> (B, 1, *size), nearest neighbour (unchanged when already that size)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)


class StageWeightedLoss(nn.Module):
    """``λ_w · L(stage 1) + (1 − λ_w) · L(stage 2)`` for a pair of stage logits, ``L`` alone for one tensor.

    Args:
        loss: the base loss, ``loss(logits (B, C, h, w), labels (B, 1, h, w))`` (e.g. MONAI ``DiceCELoss``).
        stage1_weight: λ_w until a :class:`StageWeightSchedule` sets it (0.4 = its start value).

    Shapes: pred (B, C, H, W), or a pair (stage 1 (B, C, h1, w1), stage 2 (B, C, h2, w2)) such as
    :class:`~samora_components.networks.hsam.HSAMOutput`; target (B, 1, H, W) class indices at any
    size (resized to each stage's grid, nearest) -> the loss.
    """

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], stage1_weight: float = 0.4) -> None:
        super().__init__()
        self.loss = loss
        self.stage1_weight = float(stage1_weight)

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.loss(pred, resize_target(target, pred.shape[-2:]))
        stage1, stage2 = pred
        first = self.loss(stage1, resize_target(target, stage1.shape[-2:]))
        second = self.loss(stage2, resize_target(target, stage2.shape[-2:]))
        return self.stage1_weight * first + (1.0 - self.stage1_weight) * second


class StageWeightSchedule:
    """Ignite handler: before every trainer iteration, ``loss.stage1_weight = stage1_weight(p)`` with
    p = (iteration − 1) / (total iterations − 1) from the engine state; also stored as
    ``engine.state.stage1_weight``. Harmless for networks that return one tensor.

    Args:
        loss: the :class:`StageWeightedLoss` the trainer uses.
        start / decay / epochs: see :func:`stage1_weight` (0.4 / 0.99 / 300: appendix A.1 and the
            public H-SAM trainer).
    """

    def __init__(self, loss: StageWeightedLoss, start: float = 0.4, decay: float = 0.99, epochs: int = 300) -> None:
        stage1_weight(0.0, start, decay, epochs)  # checks the arguments
        self.loss = loss
        self.start, self.decay, self.epochs = float(start), float(decay), int(epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def progress(self, engine: Engine) -> float:
        """Fraction of the run done before the current iteration: 0 at the first, 1 at the last."""
        state = engine.state
        total = int(state.max_epochs or 1) * int(state.epoch_length or 1)
        return (state.iteration - 1) / max(total - 1, 1)

    def __call__(self, engine: Engine) -> None:
        weight = stage1_weight(self.progress(engine), self.start, self.decay, self.epochs)
        self.loss.stage1_weight = weight
        engine.state.stage1_weight = weight
