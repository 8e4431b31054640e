"""Supervised classification of ``(x, y)`` batches with cross-entropy (the error is taken at the logits)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dfa_lightning.tasks.base import StepOutput, Task


class Classification(Task):
    """Args:
        num_classes: number of classes, for the accuracy metric.
    """

    monitor, monitor_mode = "val/acc", "max"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        super().__init__()

    def make_metrics(self) -> dict[str, nn.Module]:
        # validate_args=False: the argument checks read the device at every update (a GPU sync per step); the
        # cross-entropy already rejects out-of-range targets
        return {"acc": MulticlassAccuracy(self.num_classes, average="micro", validate_args=False)}

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        x, y = batch
        logits = model(x)
        return StepOutput(F.cross_entropy(logits, y), logits, y, batch_size=y.shape[0])
