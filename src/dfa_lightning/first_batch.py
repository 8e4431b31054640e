"""The first training batch of a run, drawn before it starts (with the random state forked, so the run's data order
is unchanged): what the DFA callback's setup probe and the step-memory check run on."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


def first_training_batch(trainer: pl.Trainer) -> Any | None:
    """The first training batch, from the datamodule or from the loader given to ``fit`` (``train_dataloaders=``);
    ``None`` where there is no single one (several loaders, an empty loader)."""
    with torch.random.fork_rng(devices=[]):
        if trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        else:  # Lightning keeps what fit was given here (a loader, or the module's own train_dataloader)
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            loader = source.dataloader() if source is not None and source.is_defined() else None
        if loader is None or isinstance(loader, (dict, list, tuple)):  # several loaders: no single first batch
            return None
        try:
            return next(iter(loader))
        except StopIteration:
            return None
