"""Small builders shared by the Lightning-level tests (synthetic data, an MLP, the DFA callback)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.data.synthetic import SyntheticClassificationDataModule
from dfa_lightning.models.mlp import MLP
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.classification import Classification


class FirstOfSeveralLoaders(Classification):
    """Trains on the first of the loaders given to ``fit`` (Lightning hands the step one batch from each): a fit
    with several training loaders has no single first batch, so the setup probe has none."""

    def step(self, model, batch, stage):
        return super().step(model, batch[0] if stage == "train" else batch, stage)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def build(method: str = "dfa", batch_size: int = 32, num_samples: int = 128, optimizer=sgd, dropout: float = 0.0,
          seed: int = 7):
    pl.seed_everything(0, verbose=False)
    module = TaskModule(MLP(16, 4, hidden=[32, 32], dropout=dropout), Classification(4), optimizer=optimizer)
    data = SyntheticClassificationDataModule(num_samples=num_samples, in_features=16, num_classes=4,
                                             batch_size=batch_size)
    strategy = FeedbackAlignmentStrategy(method=method, feedback_points=["blocks.*"], seed=seed, verbose=False)
    return module, data, strategy


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, default_root_dir=tmp_path, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def params(module: TaskModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


class NaNAfterOneStepDataModule(__import__("dfa_lightning.data.synthetic", fromlist=["x"]).SyntheticClassificationDataModule):
    """Synthetic rows whose second training batch holds a NaN (for the NaN-loss error path)."""

    def setup(self, stage=None):
        super().setup(stage)
        self.splits["train"].tensors[0][self.batch_size] = float("nan")


class NaNValidationDataModule(__import__("dfa_lightning.data.synthetic", fromlist=["x"]).SyntheticClassificationDataModule):
    """Synthetic rows whose validation split holds a NaN (training stays finite): the validation-loss check."""

    def setup(self, stage=None):
        super().setup(stage)
        self.splits["val"].tensors[0][0] = float("nan")


def shards(monkeypatch, loader_of, world: int = 2) -> list[list]:
    """The batches each rank's evaluation loader gives under a ``world``-process ``torch.distributed`` run, as
    ``loader_of()`` builds it in that rank (the process group simulated: the DataModules only ask who they are)."""
    import torch.distributed as dist

    out = []
    for rank in range(world):
        with monkeypatch.context() as m:
            m.setattr(dist, "is_initialized", lambda: True)
            m.setattr(dist, "get_world_size", lambda group=None: world)
            m.setattr(dist, "get_rank", lambda group=None: rank)
            out.append(list(loader_of()))
    return out
