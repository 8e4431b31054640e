"""Run by test_ddp.py as a script: score the Criteo sample's test split with DeepFM (seeded, untrained) under DDP
with 2 CPU processes (gloo), or in 1 process. Usage: python ddp_eval_worker.py OUT_DIR {ddp,single}. Each rank
saves the test metrics and how many batches it scored."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]


def main(out: Path, mode: str) -> None:
    from dfa_lightning.cli import run

    cli = run(["--config", str(REPO / "recipes/deepfm_bp.yaml"), "--config", str(REPO / "recipes/sample/criteo_10k.yaml"),
               "--data.init_args.cache_dir", str(out / "cache"), "--data.init_args.eval_batch_size", "96"], run=False)
    scored = []

    class SameWeights(pl.Callback):  # DDP re-seeds each process as it starts: seeded here, right before the
        def setup(self, trainer, pl_module, stage):  # data-sized model is built, both runs score one network
            torch.manual_seed(0)

    class Count(pl.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            scored.append(len(batch[1]))

    trainer = pl.Trainer(accelerator="cpu", devices=2 if mode == "ddp" else 1,
                         strategy="ddp" if mode == "ddp" else "auto", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[SameWeights(), Count()])
    metrics = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    torch.save({"metrics": metrics, "scored": scored}, out / f"{mode}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
