"""Learning-rate schedules of the SAMora recipes (SPEC §6)."""

from __future__ import annotations

import math

__all__ = ["WarmupPoly", "WarmupCosine", "scaled_lr", "LR_SCALINGS"]


class WarmupPoly:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR``: linear warm-up, then polynomial decay.

    ``lr(t) = base * t / warmup`` for ``t <= warmup`` and
    ``lr(t) = base * (1 - (t - warmup) / max_iters) ** power`` afterwards (paper eq. 11 with
    ``power = 1``; SAMed uses 0.9), floored at 0. ``t`` counts optimizer steps from 1.
    """

    def __init__(self, warmup: int, max_iters: int, power: float = 1.0) -> None:
        if max_iters <= 0:
            raise ValueError("max_iters must be positive")
        self.warmup = max(0, int(warmup))
        self.max_iters = int(max_iters)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        t = step + 1  # LambdaLR calls with the number of completed steps
        if self.warmup and t <= self.warmup:
            return t / self.warmup
        return max(0.0, 1.0 - (t - self.warmup) / self.max_iters) ** self.power


class WarmupCosine:
    """``LambdaLR`` multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at
    ``max_iters`` (the stage-1 schedules of SimCLRv2 and MAE)."""

    def __init__(self, warmup: int, max_iters: int) -> None:
        if max_iters <= 0:
            raise ValueError("max_iters must be positive")
        self.warmup = max(0, int(warmup))
        self.max_iters = int(max_iters)

    def __call__(self, step: int) -> float:
        t = step + 1
        if self.warmup and t <= self.warmup:
            return t / self.warmup
        progress = min(1.0, (t - self.warmup) / max(1, self.max_iters - self.warmup))  # warm-up past the end: lr keeps rising
        return 0.5 * (1.0 + math.cos(math.pi * progress))


LR_SCALINGS = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, batch_size: int, reference_batch: int = 256, rule: str = "linear") -> float:
    """The learning rate a recipe's base rate gives at ``batch_size``, the way its method defines it.

    * ``linear``: ``base_lr * batch_size / reference_batch`` (MAE: base rate per 256 images; stage 2:
      the paper's rate at its batch of 32);
    * ``sqrt``: ``base_lr * sqrt(batch_size)`` (SimCLR/SimCLRv2 with LARS: 0.075 x sqrt(B));
    * ``none``: ``base_lr`` as given (short CPU schedules).
    """
    if rule not in LR_SCALINGS:
        raise ValueError(f"lr scaling must be one of {', '.join(LR_SCALINGS)}, got {rule!r}")
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(int(batch_size))
    if rule == "none":
        return float(base_lr)
    return float(base_lr) * int(batch_size) / int(reference_batch)
