"""Click-through-rate prediction: binary cross-entropy on the model's logit, AUROC and log loss as metrics.

Batches are ``(x LongTensor[B, F], y FloatTensor[B])`` (see :class:`~dfa_lightning.data.criteo.CriteoDataModule`);
the model returns the click logit ``[B]``. The paper reports test AUC and log loss on Criteo.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC

from dfa_lightning.tasks.base import PROBABILITY_INPUTS, StepOutput, Task


class LogLoss(Metric):
    """Mean binary cross-entropy of probabilities ``preds`` against 0/1 ``target`` (the CTR "logloss")."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        p, t = preds.double().clamp(self.eps, 1 - self.eps), target.double()
        # written out, not F.binary_cross_entropy: CUDA's autocast refuses that outright (fp64 here, nothing to
        # cast), and the metric, updated inside the step, failed every bf16-mixed/16-mixed run on a GPU
        self.total -= (t * torch.log(p) + (1 - t) * torch.log1p(-p)).sum()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class ClickThroughRate(Task):
    """Binary click prediction from the logit: loss ``BCEWithLogits``; metrics ``auroc`` and ``logloss``.

    The checkpoint monitor is ``val/auroc`` (higher is better), the paper's headline metric.
    """

    monitor = "val/auroc"
    monitor_mode = "max"

    def make_metrics(self) -> dict[str, nn.Module]:
        # validate_args=False: its check of the targets reads the device at every update (a GPU sync per step);
        # the targets are the data's 0/1 labels, checked when the rows are read
        return {"auroc": BinaryAUROC(validate_args=False, **PROBABILITY_INPUTS), "logloss": LogLoss()}

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        x, y = batch
        logit = model(x)
        loss = F.binary_cross_entropy_with_logits(logit, y.to(logit.dtype))
        return StepOutput(loss=loss, output=logit, target=y, batch_size=y.shape[0])

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Click probabilities and integer 0/1 targets, as BinaryAUROC expects. The sigmoid runs in float64 so that
        the log loss of confident predictions stays exact (float32 rounds sigmoid(17) to 1)."""
        return torch.sigmoid(out.output.detach().double()), out.target.long()
