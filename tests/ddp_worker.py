"""Run by test_ddp.py as a script: DFA under DDP with 2 CPU processes (gloo), or 1 process on the full batch.

Usage: python ddp_worker.py OUT_DIR {ddp,single} [compiled | per_point]. Each rank saves its feedback matrix, final
parameters and validation metrics; ``compiled`` runs the model through ``torch.compile`` (aot_eager), ``per_point``
runs ``projection: per_point`` (with the receiver ``auto`` picks: matmul receivers at this size); either prefixes
the files.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

from helpers import build, params, trainer  # noqa: E402


def main(out: Path, mode: str, variant: str = "") -> None:
    per_rank = 16
    # no seed on the rule, as in the recipes: B is drawn from seed_everything's, which each process sets alike
    if mode == "ddp":
        module, data, dfa = build("dfa", batch_size=per_rank, seed=None)
        t = trainer(out, [dfa], max_steps=4, devices=2, strategy="ddp", deterministic=False,
                    use_distributed_sampler=False, limit_val_batches=1.0)
        # rank r reads rows r, r+2, ...: step k's two half batches are exactly the single run's batch k
        data.train_dataloader = lambda: DataLoader(data.splits["train"], batch_size=per_rank,
                                                   sampler=DistributedSampler(data.splits["train"], shuffle=False))
    else:
        module, data, dfa = build("dfa", batch_size=2 * per_rank, seed=None)
        t = trainer(out, [dfa], max_steps=4, limit_val_batches=1.0)
    if variant == "compiled":
        module.compile_options = {"backend": "aot_eager"}
    if variant == "per_point":
        dfa.config["projection"] = "per_point"
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[1].tolist())

    t.callbacks.append(Record())
    t.fit(module, data)
    # validation epoch values: each rank sees its half of the rows in batches of unequal size (24, 24, 16), the
    # single process all of them (48, 48, 32); the logged means must be the global ones on every rank
    val = data.splits["val"]
    loader = (DataLoader(val, batch_size=24, sampler=DistributedSampler(val, shuffle=False)) if mode == "ddp"
              else DataLoader(val, batch_size=48))
    metrics = t.validate(module, dataloaders=loader, verbose=False)[0]
    torch.save({"seen": seen, "matrix": dfa.engine.matrix, "params": params(module), "val": metrics,
                "receiver": dfa.engine.receiver if dfa.engine.mode == "per_point" else None},
               out / f"{variant + '_' if variant else ''}{mode}_rank{t.global_rank}.pt")
    if variant == "compiled":
        assert module.runner is not module.model


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
