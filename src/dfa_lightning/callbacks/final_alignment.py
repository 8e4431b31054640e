"""DFA-vs-BP alignment of the trained model, measured once when ``fit`` ends."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from dfa_lightning.callbacks.alignment_monitor import AlignmentMonitor
from dfa_lightning.callbacks.feedback_alignment import FeedbackAlignmentStrategy
from dfa_lightning.probe import first_training_batch, modes_kept


class FinalAlignment(pl.Callback):
    """At the end of ``fit``, :meth:`AlignmentMonitor.measure` on the first training batch, for every DFA rule.

    Why a separate callback: a table of runs wants one alignment per run, of the final weights, measured the same way
    for every run, not the last of a monitor's periodic values. It runs in training mode (the same dropout masks in
    the DFA and the BP pass) and leaves the model as it found it.

    After ``fit``: ``alignment`` holds ``align/signal_cos/<point>``, ``align/update_cos/<point>`` and
    ``align/update_ratio/<point>``; ``points`` the feedback points in forward order; ``deepest`` the last of them
    (the paper's Table A.2 reports the deepest point). Empty where no DFA rule runs (BP, shallow).

    Args:
        all_nodes: graph batches (with a ``train_mask``): score every node in the alignment loss, as the paper's
            ``alignment.py`` (default: True); False keeps the training mask.
    """

    def __init__(self, all_nodes: bool = True) -> None:
        super().__init__()
        self.all_nodes = all_nodes
        self.alignment: dict[str, float] = {}
        self.points: list[str] = []
        self.deepest: str | None = None
        self._training_modes: list[tuple[torch.nn.Module, bool]] = []

    def first_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """The first training batch, on the module's device (the random state forked: a test after fit is unchanged)."""
        return first_training_batch(trainer, pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_modes = [(module, module.training) for module in pl_module.modules()]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategies = [cb for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy)
                      and cb.method == "dfa" and cb.engine is not None]
        self.alignment, self.points, self.deepest = {}, [], None  # this fit's values only
        if not strategies:
            return
        probe = self.first_batch(trainer, pl_module)
        if probe is None:  # several training loaders: no single batch to measure on
            return
        if self.all_nodes and hasattr(probe, "train_mask"):
            probe = probe.clone()
            probe.train_mask = torch.ones_like(probe.train_mask)
        with modes_kept(pl_module):
            for module, training in self._training_modes:  # each module's mode in the training steps: a module
                module.training = training  # the user keeps in eval mode (a frozen BatchNorm) stays so
            monitor = AlignmentMonitor()
            for strategy in strategies:
                self.alignment.update(monitor.measure(pl_module, strategy, probe))
        self.points = [p.name for s in strategies for p in s.engine.points
                       if f"align/signal_cos/{p.name}" in self.alignment]
        self.deepest = self.points[-1] if self.points else None
