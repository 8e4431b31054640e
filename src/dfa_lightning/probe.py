"""What the setup probes (the DFA callback's, the step-memory check) run on, and under: the first training batch on
the model's device, and the run's autocast on that device. Both run in Lightning's ``setup``, before the model is
moved to its device: usually on the CPU, or wherever the user put the model before ``fit``."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import HalfPrecision, MixedPrecision
from pytorch_lightning.utilities import move_data_to_device
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` is now (its first parameter's device; the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def forked_rng(device: torch.device) -> AbstractContextManager:
    """The random state forked for a probe on ``device``: the CPU's, and on CUDA the device's own (NeRF draws its
    samples along the rays there), so the run's random draws are those it would make without the probe."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every submodule's own train/eval mode, restored on exit. ``model.train(flag)`` sets all of them: a module the
    user keeps in eval mode (a frozen BatchNorm on its running statistics, as Lightning leaves it) came back from a
    probe training, in DFA runs only, so they were no longer comparable with BP."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def first_training_batch(trainer: pl.Trainer, device: torch.device | None = None) -> Any | None:
    """The first training batch, from the datamodule or from the loader given to ``fit`` (``train_dataloaders=``),
    drawn with the random state forked, the global one and the loader's own generators (the run's data order is
    unchanged), and moved to ``device``; ``None`` where there is no single one (several loaders, an empty loader)."""
    with torch.random.fork_rng(devices=[]):
        if trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        else:  # Lightning keeps what fit was given here (a loader, or the module's own train_dataloader)
            source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
            loader = source.dataloader() if source is not None and source.is_defined() else None
        if loader is None or isinstance(loader, (dict, list, tuple)):  # several loaders: no single first batch
            return None
    batch = first_batch(loader)
    return batch if batch is None or device is None else move_data_to_device(batch, device)


def first_batch(loader: Any) -> Any | None:
    """``loader``'s first batch (``None`` if empty), drawn with the global random state and the loader's own
    generators forked: the run draws the same order and the same numbers as without the look."""
    generators = loader_generators(loader)
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):
            return next(iter(loader), None)
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The generators a loader's shuffling draws from: ``DataLoader(generator=...)`` and its sampler's (or batch
    sampler's) own; iterating the loader advances them, outside the global random state."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    holders = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    found: list[torch.Generator] = []
    for holder in holders:
        g = getattr(holder, "generator", None)
        if isinstance(g, torch.Generator) and not any(g is f for f in found):
            found.append(g)
    return found


def probe_forward_context(trainer: pl.Trainer, device: torch.device) -> AbstractContextManager:
    """The precision plugin's forward context, with its autocast moved to ``device``: at ``setup`` the model is still
    on the CPU, where a CUDA autocast does nothing, so a probe for a ``bf16-mixed`` GPU run measured fp32
    activations and an fp32 error (twice their size in the step's memory and in the ``auto`` projection choice).
    Under ``bf16-true``/``16-true`` the model is still fp32 at ``setup``: an autocast to its dtype stands in. On the
    CPU an fp16 run is probed in bf16: the same two bytes a value, and the CPU has fewer fp16 kernels."""
    plugin = trainer.precision_plugin
    moved = isinstance(plugin, MixedPrecision) and plugin.device != device.type
    if not (moved or isinstance(plugin, HalfPrecision)):  # HalfPrecision: the model is cast after setup
        return plugin.forward_context()
    bf16 = str(plugin.precision).startswith("bf16") or device.type == "cpu"  # fp16 is probed in bf16 on the CPU
    return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.half)
