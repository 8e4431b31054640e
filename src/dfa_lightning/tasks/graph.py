"""Graph tasks of the DFA paper: full-batch node classification (§2.3) and GAE link prediction (§2.4).

Both take one :class:`torch_geometric.data.Data` per step (see :class:`~dfa_lightning.data.planetoid.PlanetoidDataModule`);
which nodes / edges are scored comes from the ``stage`` argument (``train``, ``val`` or ``test``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, MulticlassAccuracy

from dfa_lightning.errors import ConfigError
from dfa_lightning.tasks.base import PROBABILITY_INPUTS, STAGES, StepOutput, Task

__all__ = ["NodeClassification", "LinkPrediction", "LinkStepOutput", "ArgmaxAccuracy"]


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


class ArgmaxAccuracy(torchmetrics.Metric):
    """Accuracy of ``argmax(preds, -1)`` (or of integer ``preds``) against ``target``, without knowing the classes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            preds = preds.argmax(-1)
        self.correct += (preds == target).sum()
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total.clamp(min=1)


class NodeClassification(Task):
    """Cross-entropy on the nodes of ``batch.<stage>_mask`` of a full graph; metric ``acc``.

    The model is called as ``model(x, edge_index)``, or ``model(x, edge_index, edge_attr)`` when the graph has edge
    attributes (Spline's pseudo-coordinates), and must return logits ``[N, C]`` (or log-probabilities with
    ``loss: nll``).

    Args:
        num_classes: number of classes, for torchmetrics' ``MulticlassAccuracy`` (micro); None: an accuracy that
            does not need it (same value) (default: None).
        loss: ``cross_entropy`` on logits, or ``nll`` on log-probabilities (a model ending in log_softmax). The loss
            values are the same; what differs is the gradient at the model output, i.e. the DFA error e:
            softmax - onehot for logits, -onehot for log-probabilities (the paper's DNA quirk)
            (default: ``"cross_entropy"``).
    """

    monitor = "val/acc"
    monitor_mode = "max"
    losses = ("cross_entropy", "nll")

    def __init__(self, num_classes: int | None = None, loss: str = "cross_entropy") -> None:
        if num_classes is not None and int(num_classes) < 2:
            raise ConfigError(f"NodeClassification: num_classes must be >= 2, got {num_classes}")
        if loss not in self.losses:
            raise ConfigError(f"NodeClassification: loss must be one of {self.losses}, got {loss!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.loss = loss
        self._checked_log_probs = False
        super().__init__()

    def make_metrics(self) -> dict[str, nn.Module]:
        if self.num_classes is None:
            return {"acc": ArgmaxAccuracy()}
        return {"acc": MulticlassAccuracy(num_classes=self.num_classes, average="micro", validate_args=False)}

    @staticmethod
    def mask(batch: Any, stage: str) -> Tensor:
        """The boolean (or index) mask of ``stage``'s nodes."""
        _check_stage(stage)
        mask = getattr(batch, f"{stage}_mask", None)
        if mask is None:
            raise ConfigError(f"NodeClassification: the graph has no {stage}_mask (use a node split, "
                              "not `link_split: true`)")
        return mask

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        mask = self.mask(batch, stage)
        edge_attr = getattr(batch, "edge_attr", None)
        if edge_attr is None:
            logits = model(batch.x, batch.edge_index)
        else:
            logits = model(batch.x, batch.edge_index, edge_attr)
        target = batch.y[mask]
        if self.loss == "nll":
            self._check_log_probs(logits)
            loss = F.nll_loss(logits[mask], target)
        else:
            loss = F.cross_entropy(logits[mask], target)
        return StepOutput(loss=loss, output=logits, target=target, batch_size=int(target.numel()))

    def _check_log_probs(self, out: Tensor) -> None:
        """``nll`` on logits would train on a wrong loss without any error: refuse it once, at the first step."""
        if self._checked_log_probs:
            return
        lse = torch.logsumexp(out.detach().float(), dim=-1)
        if not torch.allclose(lse, torch.zeros_like(lse), atol=1e-3):
            raise ConfigError("NodeClassification: `loss: nll` needs log-probabilities, but the model's rows do not "
                              "sum to probability 1 (end the model with log_softmax, e.g. `log_softmax: true` for "
                              "DNA, or use `loss: cross_entropy`)")
        self._checked_log_probs = True

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        return out.output.detach()[self.mask(batch, stage)], out.target


@dataclass
class LinkStepOutput(StepOutput):
    """A :class:`StepOutput` that also keeps the edge scores (logits) and their 0/1 labels, for the metrics."""

    scores: Tensor | None = None
    labels: Tensor | None = None


class LinkPrediction(Task):
    """GAE link prediction (paper §2.4): the model encodes ``z = model(x, edge_index)``; edges are scored by the
    inner product ``z_i · z_j`` (the GAE decoder, as a logit).

    * ``train``: the positive edges are ``batch.pos_edge_label_index`` (all train edges when the data module does
      ``RandomLinkSplit(add_negative_train_samples=False)``) and as many negatives are sampled afresh each step
      with ``torch_geometric.utils.negative_sampling`` (as ``GAE.recon_loss``).
    * ``val`` / ``test``: the fixed ``pos_edge_label_index`` / ``neg_edge_label_index`` of that split.

    The loss is ``GAE.recon_loss``: ``-log σ(pos).mean() - log(1 - σ(neg)).mean()`` (computed stably from logits).
    Metrics: ``auroc`` and ``ap`` (average precision) on the scores of positive and negative edges; monitor
    ``val/auroc``. ``StepOutput.output`` is ``z`` (where the output DFA error is taken).
    """

    monitor = "val/auroc"
    monitor_mode = "max"

    def make_metrics(self) -> dict[str, nn.Module]:
        return {"auroc": BinaryAUROC(validate_args=False, **PROBABILITY_INPUTS),
                "ap": BinaryAveragePrecision(validate_args=False, **PROBABILITY_INPUTS)}

    @staticmethod
    def edges(batch: Any, stage: str, num_nodes: int) -> tuple[Tensor, Tensor]:
        """(positive, negative) edge indices ``[2, E]`` scored at ``stage``."""
        _check_stage(stage)
        pos = getattr(batch, "pos_edge_label_index", None)
        if pos is None:
            raise ConfigError("LinkPrediction: the graph has no pos_edge_label_index; set `link_split: true` in the "
                              "data section")
        neg = getattr(batch, "neg_edge_label_index", None)
        if neg is None or stage == "train":
            from torch_geometric.utils import negative_sampling

            neg = negative_sampling(batch.edge_index, num_nodes=num_nodes, num_neg_samples=pos.size(1))
        return pos, neg

    @staticmethod
    def score(z: Tensor, edge_index: Tensor) -> Tensor:
        """Inner-product decoder logits for ``edge_index``."""
        return (z[edge_index[0]] * z[edge_index[1]]).sum(dim=-1)

    def step(self, model: nn.Module, batch: Any, stage: str) -> LinkStepOutput:
        z = model(batch.x, batch.edge_index)
        pos, neg = self.edges(batch, stage, z.size(0))
        pos_score, neg_score = self.score(z, pos), self.score(z, neg)
        loss = F.softplus(-pos_score).mean() + F.softplus(neg_score).mean()
        labels = torch.cat([torch.ones_like(pos_score), torch.zeros_like(neg_score)]).long()
        scores = torch.cat([pos_score, neg_score])
        return LinkStepOutput(loss=loss, output=z, target=labels, batch_size=int(labels.numel()),
                              scores=scores, labels=labels)

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[Tensor, Tensor]:
        scores = getattr(out, "scores", None)
        if scores is None:  # a plain StepOutput: re-score from z (fresh negatives at train)
            pos, neg = self.edges(batch, stage, out.output.size(0))
            z = out.output.detach()
            scores = torch.cat([self.score(z, pos), self.score(z, neg)])
            target = torch.cat([torch.ones(pos.size(1)), torch.zeros(neg.size(1))]).long().to(z.device)
            return torch.sigmoid(scores), target
        return torch.sigmoid(scores.detach()), out.labels
