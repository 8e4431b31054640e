"""Evaluation batches under DDP: each rank its own, none repeated (dfa_lightning.data.sharding)."""
from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler, Sampler

from dfa_lightning.data.sharding import EvalShard, eval_sampler


class Batches(Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epochs = n, []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(f"batch{i}" for i in range(self.n))

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_the_ranks_share_every_batch_once_in_the_loaders_order():
    parts = [list(EvalShard(Batches(7), 3, rank)) for rank in range(3)]
    assert parts == [["batch0", "batch3", "batch6"], ["batch1", "batch4"], ["batch2", "batch5"]]
    assert [len(EvalShard(Batches(7), 3, rank)) for rank in range(3)] == [3, 2, 2]  # no padding


def test_lightning_keeps_the_shard_and_it_passes_the_epoch_on():
    """Lightning replaces an evaluation sampler under DDP unless it is a DistributedSampler already."""
    base = Batches(4)
    shard = EvalShard(base, 2, 1)
    assert isinstance(shard, DistributedSampler)
    shard.set_epoch(3)
    assert base.epochs == [3]


def test_a_rank_with_no_batch_scores_the_last_one_again_and_says_so():
    """Every rank must run a batch: Lightning registers the epoch metrics at the first one, and a rank without
    any would leave the others waiting in the metrics' synchronisation."""
    with pytest.warns(UserWarning, match="2 evaluation batch.*ranks 2 to 3 score the last one again"):
        EvalShard(Batches(2), 4, 0)  # rank 0 says it, for every rank
    assert [list(EvalShard(Batches(2), 4, rank)) for rank in range(4)] == [["batch0"], ["batch1"], ["batch1"],
                                                                           ["batch1"]]
    assert len(EvalShard(Batches(2), 4, 3)) == 1


def test_one_process_keeps_the_loaders_own_order():
    base = Batches(3)
    assert eval_sampler(base) is base
    assert list(eval_sampler([10, 20, 30])) == [0, 1, 2]  # a dataset: read in order


def test_an_empty_loader_gives_every_rank_nothing_alike():
    """No batch anywhere: every rank skips the stage alike (no rank waits for another in the metrics' sync)."""
    assert [list(EvalShard(Batches(0), 2, rank)) for rank in range(2)] == [[], []]


@pytest.mark.parametrize(("limit", "total", "says"), [
    (40, 100, "2 ranks score 80, one process 40, .* set limit_val_batches=20"),
    (60, 100, "2 ranks score 100, one process 60, .* set limit_val_batches=30"),
])
def test_an_integer_batch_limit_under_ddp_says_it_counts_per_rank(limit, total, says):
    """Lightning cuts each rank's share to the limit: two ranks scored twice the batches that one process scores
    (the LM sample's 40 validation chunks became 80), silently another metric than the same command's on one GPU."""
    from dfa_lightning.data.sharding import warn_limit_per_rank

    with pytest.warns(UserWarning, match=f"limit_val_batches={limit} acts on each rank's share of the {total} val "
                                         f"batches: {says}"):
        warn_limit_per_rank(limit, "val", total, 2)


@pytest.mark.parametrize(("limit", "total", "world"), [
    (0.25, 100, 2),  # a fraction scales with the shares: one process's count
    (200, 100, 2), (100, 100, 2),  # no cut anywhere
    (40, 100, 1),  # one process
    (0, 100, 2),  # the stage is off
    (None, 100, 2),
])
def test_a_batch_limit_that_counts_alike_on_one_or_many_ranks_says_nothing(limit, total, world, recwarn):
    from dfa_lightning.data.sharding import warn_limit_per_rank

    warn_limit_per_rank(limit, "val", total, world)
    assert not [w for w in recwarn if "acts on each rank" in str(w.message)]
