"""Fixed random feedback matrices B_i, drawn once from a dedicated seeded generator.

All B_i are stored side by side in ONE matrix ``M`` of shape ``(d_out, K)`` so that every projection of a step
comes from a single matmul ``e @ M``; point i reads columns ``slices[i]``.

* independent (default): point i owns its own ``d_i`` columns, ``K = sum(d_i)``.
* ``shared_slices=True``: the reference TinyDFA layout, one ``(d_out, max d_i)`` matrix whose first ``d_i``
  columns feed point i (layers of equal width then get identical signals, as in the paper's code).

Init (paper: uniform): ``uniform`` U[-1, 1), ``gaussian`` N(0, 1), ``sign`` ±1.
Scale: ``per_layer`` 1/sqrt(d_i), ``max_width`` 1/sqrt(max d_i) (TinyDFA's ``normalization=True``), ``none``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dfa_lightning.errors import ConfigError

INITS = ("uniform", "gaussian", "sign")
SCALES = ("per_layer", "max_width", "none")


@dataclass(frozen=True)
class FeedbackLayout:
    """Where each point's columns live in ``M`` and the factor applied to them (folded into ``M`` when possible)."""

    widths: tuple[int, ...]
    slices: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    total: int


def layout(widths: Sequence[int], scale: str, shared_slices: bool) -> FeedbackLayout:
    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {SCALES}, got {scale!r}")
    widths = tuple(int(w) for w in widths)
    width_max = max(widths)
    if scale == "per_layer":
        scales = tuple(1.0 / math.sqrt(w) for w in widths)
    elif scale == "max_width":
        scales = tuple(1.0 / math.sqrt(width_max) for _ in widths)
    else:
        scales = tuple(1.0 for _ in widths)
    if shared_slices:
        return FeedbackLayout(widths, tuple((0, w) for w in widths), scales, width_max)
    starts = [0]
    for w in widths:
        starts.append(starts[-1] + w)
    return FeedbackLayout(widths, tuple(zip(starts[:-1], starts[1:])), scales, starts[-1])


def draw(shape: tuple[int, int], init: str, generator: torch.Generator) -> torch.Tensor:
    if init == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1
    if init == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if init == "sign":
        return torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2 - 1
    raise ConfigError(f"init must be one of {INITS}, got {init!r}")


def feedback_matrix(
    d_out: int, lay: FeedbackLayout, init: str, seed: int, shared_slices: bool
) -> torch.Tensor:
    """Draw ``M`` (fp32, CPU) deterministically from ``seed``; per-point scales are folded in when columns are
    not shared. Independent of the global RNG, so every rank and every resume draws the same matrix."""
    generator = torch.Generator().manual_seed(seed)
    matrix = draw((d_out, lay.total), init, generator)
    if not shared_slices:
        for (start, stop), s in zip(lay.slices, lay.scales):
            matrix[:, start:stop] *= s
    return matrix
