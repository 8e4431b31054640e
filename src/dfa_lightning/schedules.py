"""Learning-rate schedules that recipes can name (``lr_scheduler: {class_path: ...}``)."""
from __future__ import annotations

import torch


class NoamLR(torch.optim.lr_scheduler.LambdaLR):
    """The Transformer schedule (Vaswani et al. 2017), as the paper's BP baseline (``--optim noam``):
    ``lr = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)``; peak ≈ 7.0e-4 at step 4000 for d_model 512.
    Step it every batch (``TaskModule(scheduler_interval="step")``); the optimizer's own ``lr`` should be 1.

    Args:
        optimizer: the wrapped optimizer.
        d_model: model width (default: ``512``).
        warmup: warm-up steps (default: ``4000``).
        factor: multiplier (default: ``1.0``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, d_model: int = 512, warmup: int = 4000,
                 factor: float = 1.0) -> None:
        def rate(step: int) -> float:
            step = max(step, 1)
            return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)

        super().__init__(optimizer, rate)
