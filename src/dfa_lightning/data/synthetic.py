"""Synthetic classification data for unit tests, smoke runs and benchmarks (no download, deterministic)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class SyntheticClassificationDataModule(pl.LightningDataModule):
    """Gaussian inputs labelled by a fixed random linear teacher (learnable, not trivial).

    Args:
        num_samples: rows per split (default: ``512``).
        in_features, num_classes: sizes (default: ``32``, ``4``).
        batch_size: rows per batch (default: ``64``).
        seed: seed of the data generator (default: ``0``).
        shuffle: shuffle the training rows each epoch (default: ``False``, so runs compare batch by batch).
    """

    def __init__(self, num_samples: int = 512, in_features: int = 32, num_classes: int = 4, batch_size: int = 64,
                 seed: int = 0, shuffle: bool = False) -> None:
        super().__init__()
        self.num_samples, self.in_features, self.num_classes = num_samples, in_features, num_classes
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        g = torch.Generator().manual_seed(self.seed)
        teacher = torch.randn(self.in_features, self.num_classes, generator=g)
        for split in ("train", "val", "test"):
            x = torch.randn(self.num_samples, self.in_features, generator=g)
            self.splits[split] = TensorDataset(x, (x @ teacher).argmax(dim=1))

    def model_hints(self) -> dict[str, int]:
        return {"in_features": self.in_features, "out_features": self.num_classes}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.batch_size)
