"""The global random state a resumed fit must continue from, in a form a ``weights_only`` load accepts.

Lightning's checkpoints hold no random state, and a resumed fit starts from ``seed_everything``'s: every dropout
mask and shuffle after the resume differed from those of the uninterrupted run, so resuming was exact only without
dropout. Saved by :class:`~dfa_lightning.module.TaskModule` in every checkpoint, restored when a resumed fit starts
(``on_fit_start``: before the training loader's first iterator draws its seed and order): a fit resumed from an
epoch's end then equals the uninterrupted one.
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import torch


def random_state() -> dict[str, Any]:
    """The CPU generator's, every visible GPU's, and Python's ``random`` state (the project draws no global NumPy
    numbers: its data pipelines use their own generators)."""
    version, state, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": (version, tuple(state), gauss)}


def restore_random_state(saved: dict[str, Any]) -> None:
    """Install ``saved`` (from :func:`random_state`); the GPUs' states only on as many GPUs as were saved."""
    torch.set_rng_state(saved["torch"])
    cuda = list(saved.get("torch.cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"the checkpoint holds the random state of {len(cuda)} GPU(s) and this process sees "
                          f"{torch.cuda.device_count()}: the GPUs keep the seed's state, so GPU-side random draws "
                          "(NeRF's samples, dropout on the GPU) differ from the uninterrupted run", stacklevel=2)
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
