"""Next-token language modelling: cross-entropy over ``[B, T, V]`` logits, perplexity as the metric.

Batches are ``(x LongTensor[B, T], y LongTensor[B, T])`` with ``y`` the next token of ``x`` (see
:class:`~dfa_lightning.data.wikitext.WikiTextDataModule`); the model maps ``x`` to logits ``[B, T, V]``. The loss
is the mean cross-entropy per token; ``{stage}/loss`` is logged with ``batch_size = B*T`` so that the epoch value is
the mean over all tokens, and ``{stage}/ppl`` = exp(mean cross-entropy over all tokens of the epoch), exactly (the
sum is kept in float64, not averaged per batch). The paper reports the best validation perplexity (Table 5); the
checkpoint monitor is ``val/loss`` (min), which selects the same epoch.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfa_lightning.errors import ConfigError
from dfa_lightning.tasks.base import BatchMean, StepOutput, Task


class TokenPerplexity(BatchMean):
    """``exp(sum of per-token NLL / number of tokens)`` from per-batch mean NLLs and token counts.

    ``update(mean_nll, count)``: ``mean_nll`` is a batch's mean cross-entropy (natural log) over ``count`` tokens
    (a Python int: no host-to-device copy, which would sync every step): the exponential of the token-weighted
    :class:`~dfa_lightning.tasks.base.BatchMean`, kept in float64 so that millions of tokens add up exactly enough
    and synchronised across ranks by sum.
    """

    higher_is_better = False

    def compute(self) -> torch.Tensor:
        return torch.exp(self.total / self.weight).float()  # in float64 until the end


class LanguageModeling(Task):
    """Causal language modelling: loss = mean token cross-entropy, metric ``ppl`` (perplexity).

    The checkpoint monitor is ``val/loss`` (lower is better; its exp is ``val/ppl``).
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def make_metrics(self) -> dict[str, nn.Module]:
        return {"ppl": TokenPerplexity()}

    def step(self, model: nn.Module, batch: Any, stage: str) -> StepOutput:
        x, y = batch
        try:
            logits = model(x)  # [B, T, V]
        except IndexError as err:  # nn.Embedding with fewer rows than the data's vocabulary
            raise ConfigError(f"{type(model).__name__}: token id {int(x.max())} is outside the model's vocabulary "
                              f"({err}); set the model's vocab_size to the data's (WikiTextDataModule.vocab_size)"
                              ) from None
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        return StepOutput(loss=loss, output=logits, target=y, batch_size=y.numel())

    def metric_inputs(self, out: StepOutput, batch: Any, stage: str) -> tuple[torch.Tensor, int]:
        """``(mean NLL of the batch, its token count)``: perplexity needs no second pass over the logits."""
        return out.loss.detach(), out.target.numel()
