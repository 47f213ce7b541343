"""Training schedules of DINO, as closed forms of the global optimizer step.

Like the original DINO (which precomputes them as arrays indexed by the global iteration), every
value is a pure function of the step, so a run resumed from a checkpoint (which stores the step)
continues on exactly the same curve.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine annealing from ``start`` (step 0) towards ``end`` over ``total_steps`` steps.

    ``value(k) = end + (start - end) * (1 + cos(pi * k / total_steps)) / 2``, the formula of the
    original DINO's ``cosine_scheduler`` (its last value, at ``k = total_steps - 1``, is just short
    of ``end``). Steps past the end return ``end``.
    """
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    step = max(step, 0)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps)))


def warmup_cosine_schedule(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_value: float,
    final_value: float,
    warmup_start_value: float,
) -> float:
    """Linear warm-up then cosine annealing, as the original DINO's learning-rate schedule.

    Warm-up: ``linspace(warmup_start_value, base_value, warmup_steps)[step]`` for
    ``step < warmup_steps``; then ``cosine_schedule(step - warmup_steps, total_steps -
    warmup_steps, base_value, final_value)``.
    """
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    if step < warmup_steps:
        if warmup_steps == 1:
            return float(warmup_start_value)
        frac = max(step, 0) / (warmup_steps - 1)
        return float(warmup_start_value + (base_value - warmup_start_value) * frac)
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, base_value, final_value)


class WarmupCosineLR(LRScheduler):
    """Learning rate following :func:`warmup_cosine_schedule`, one ``step()`` per interval.

    Written by hand because torch has no warm-up + cosine scheduler; chaining ``LinearLR`` and
    ``CosineAnnealingLR`` with ``SequentialLR`` recomputes the rate recursively, which drifts and
    is awkward to restore mid-run. Each parameter group's initial ``lr`` is its base value, so
    groups keep their ratios.

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: number of warm-up steps (or epochs, if stepped per epoch).
        total_steps: total number of steps of the run.
        warmup_start_lr: learning rate at step 0.
        min_lr: learning rate reached at the end of the cosine.
        last_epoch: index of the last step (-1: start of training).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        if total_steps < 1:
            raise ValueError(f"WarmupCosineLR: total_steps must be >= 1, got {total_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.warmup_start_lr = float(warmup_start_lr)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [
            warmup_cosine_schedule(
                self.last_epoch,
                self.total_steps,
                self.warmup_steps,
                base_lr,
                self.min_lr,
                self.warmup_start_lr,
            )
            for base_lr in self.base_lrs
        ]
