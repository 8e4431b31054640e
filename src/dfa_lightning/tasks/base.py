"""A Task says how a batch meets a model: which inputs go in, which loss comes out, which metrics are kept.

The generic :class:`~dfa_lightning.module.TaskModule` owns the model and the optimizer; the Task owns everything
that differs between node classification, CTR prediction, language modelling or view synthesis. Tasks are
``nn.Module`` so that their torchmetrics follow the model to its device.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryPrecisionRecallCurve

STAGES = ("train", "val", "test")

# Binary ranking metrics (AUROC, AP) fed with probabilities: torchmetrics >= 1.9 can be told so (``normalization:
# None``); otherwise it tests every batch for logits, a host read per update (before 1.9, on a GPU: a sync).
PROBABILITY_INPUTS: dict[str, Any] = (
    {"normalization": None} if "normalization" in inspect.signature(BinaryPrecisionRecallCurve.__init__).parameters
    else {}
)


class BatchMean(Metric):
    """Mean of per-batch values weighted by their batch sizes (the epoch loss), summed on the device.

    ``update(value, weight)`` takes ``weight`` as a Python number: no host-to-device copy, hence no sync per step
    (torchmetrics' ``MeanMetric`` turns a number weight into a tensor on the device and checks for NaN on the host).
    Synchronised across ranks by sum, so the epoch value is the global weighted mean; NaN before any update.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        if isinstance(weight, torch.Tensor):
            weight = weight.to(self.weight.device, torch.float64)
        # out of place: a reset under inference mode (a `trainer.validate` before `fit`) leaves inference tensors,
        # which an in-place add outside inference mode (validation inside `fit`) may not touch
        self.total = self.total + value.detach().double() * weight
        self.weight = self.weight + weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


@dataclass
class StepOutput:
    """What one task step produces. ``output`` is the model's output (before any loss-side transform)."""

    loss: torch.Tensor
    output: torch.Tensor
    target: torch.Tensor | None = None
    batch_size: int | None = None


class Task(nn.Module):
    """Base class. Subclasses implement :meth:`step` and :meth:`make_metrics`.

    Args:
        monitor: metric that selects the best checkpoint (e.g. ``"val/acc"``) (default: ``"val/loss"``).
        monitor_mode: ``"max"`` or ``"min"`` (default: ``"min"``).
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __init__(self) -> None:
        super().__init__()
        # keys "train_" etc.: a ModuleDict key "train" would clash with nn.Module.train
        self.metrics = nn.ModuleDict({f"{stage}_": nn.ModuleDict(self.make_metrics()) for stage in STAGES})

    def stage_metrics(self, stage: str) -> nn.ModuleDict:
        return self.metrics[f"{stage}_"]

    def make_metrics(self) -> dict[str, nn.Module]:
        """Fresh torchmetrics for one stage, keyed by short name (``acc``, ``auroc``...)."""
        return {}

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        """Run ``model`` on ``batch`` and return the loss; must not touch metrics (the alignment probe reuses it)."""
        raise NotImplementedError

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(preds, target) fed to every metric of ``stage``; override when they differ from output/target."""
        return out.output.detach(), out.target

    def update_metrics(self, out: StepOutput, batch: Any, stage: str) -> dict[str, nn.Module]:
        metrics = self.stage_metrics(stage)
        if len(metrics):
            preds, target = self.metric_inputs(out, batch, stage)
            for metric in metrics.values():
                metric.update(preds, target)
        return {f"{stage}/{name}": metric for name, metric in metrics.items()}
