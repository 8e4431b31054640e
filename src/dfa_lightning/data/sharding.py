"""Each rank's share of the evaluation batches under DDP, with no batch repeated.

Lightning gives every rank of a distributed run a ``DistributedSampler`` over the validation and test batches, which
pads the shares to one length by repeating the first batches: a few batches were scored twice (measured with 2 CPU
processes: the Criteo sample's test AUROC 0.5147 against 0.5213 in one process). The DataModules here hand Lightning
their evaluation loaders already sharded by :class:`EvalShard`: rank ``r`` of ``w`` takes batches ``r, r + w, ...``
of the loader's own order, so the shares are disjoint and together are every batch once. The shares may differ by
one batch; the epoch metrics are torchmetrics states summed across ranks at the epoch's end, so the result is the
one-process result. Lightning leaves a ``DistributedSampler`` as it finds it.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler, Sampler, SequentialSampler


class EvalShard(DistributedSampler):
    """Batches ``rank, rank + world, ...`` of ``base`` (a sampler, or a sized dataset read in order), unpadded.

    A rank that would get no batch at all (fewer batches than ranks) gets the last one again: Lightning registers a
    stage's epoch metrics at its first batch, and a rank with none would leave the others waiting in the epoch's
    metric synchronisation. That repeat is the only one, and it is warned about.
    """

    def __init__(self, base: Sampler | Sized, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"EvalShard: rank {rank} is not one of {num_replicas} ranks")
        # not DistributedSampler.__init__, which sizes a padded share; Lightning keeps any DistributedSampler
        self.base = base if isinstance(base, Sampler) else SequentialSampler(base)
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        total = len(self.base)
        # what code that knows DistributedSampler reads (Lightning asks `shuffle` of an evaluation loader's)
        self.dataset, self.shuffle, self.seed, self.drop_last, self.total_size = base, False, 0, False, total
        self.repeats_last = 0 < total <= rank
        if 0 < total < num_replicas:  # said once, by rank 0 (which always has a batch)
            rank_zero_warn(f"{total} evaluation batch(es) for {num_replicas} ranks: ranks {total} to "
                           f"{num_replicas - 1} score the last one again (every rank needs one); use at most {total} "
                           "device(s) for exact metrics")
        self.num_samples = len(self)

    def __len__(self) -> int:
        total = len(self.base)
        return 1 if self.repeats_last else len(range(self.rank, total, self.num_replicas))

    def __iter__(self) -> Iterator[Any]:
        items = list(self.base)
        if self.repeats_last:
            return iter(items[-1:])
        return iter(items[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)


def eval_sampler(base: Sampler | Sized, trainer: Any = None, stage: str = "val") -> Sampler:
    """The evaluation order of ``base`` (a sampler, or a dataset read in order) in one process; this rank's
    :class:`EvalShard` of it under ``torch.distributed`` with several processes. ``trainer`` (the DataModule's,
    when attached) and ``stage`` (``val`` or ``test``): its ``limit_<stage>_batches`` is checked against the shares
    (see :func:`warn_limit_per_rank`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return base if isinstance(base, Sampler) else SequentialSampler(base)
    shard = EvalShard(base, dist.get_world_size(), dist.get_rank())
    if trainer is not None and not getattr(trainer, "fast_dev_run", False):  # (a smoke run limits on purpose)
        warn_limit_per_rank(getattr(trainer, f"limit_{stage}_batches", None), stage, len(shard.base),
                            shard.num_replicas)
    return shard


def warn_limit_per_rank(limit: int | float | None, stage: str, total: int, world: int) -> None:
    """Lightning applies an integer ``limit_<stage>_batches`` to each rank's share, after the sharding: ``w`` ranks
    score up to ``w`` times the batches that one process scores, so the metric is another one than the same
    command's on one device. Said once (rank 0), with the limit that gives one process's count; a fraction scales
    with the shares and is left alone."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0 or world <= 1:
        return
    scored = sum(min(limit, len(range(rank, total, world))) for rank in range(world))
    alone = min(limit, total)
    if scored != alone:
        rank_zero_warn(f"limit_{stage}_batches={limit} acts on each rank's share of the {total} {stage} batches: "
                       f"{world} ranks score {scored}, one process {alone}, so the {stage} metrics are not the "
                       f"one-device ones; for those, set limit_{stage}_batches={-(-alone // world)} (when it divides "
                       f"evenly) or a fraction, which scales with the shares")
