"""A training step through Lightning reads nothing back from the device but the finite-loss check.

On a GPU every host read (``bool(t)``, ``t.item()``, a metric's argument check) waits for the queue to drain, and
a small step is host-bound: the host must stay ahead. These tests count host reads on the CPU, where they are
cheap but still visible, inside ``TaskModule``'s steps (forward, loss, metrics, logging) and its backward (the DFA
projection), with and without the DFA engine, for every per-batch task. Logging is also pinned down: the epoch
values stay exact although nothing is logged per step.
"""
from __future__ import annotations

from collections import Counter
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.models.mlp import MLP
from dfa_lightning.models.recsys import MODELS
from dfa_lightning.models.transformer import TransformerLM
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.classification import Classification
from dfa_lightning.tasks.base import PROBABILITY_INPUTS
from dfa_lightning.tasks.ctr import ClickThroughRate
from dfa_lightning.tasks.language_modeling import LanguageModeling
from helpers import trainer

HOST_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "numpy")


@contextmanager
def counting_host_reads(inside: list[bool]):
    """Count tensor-to-host reads made while ``inside[0]`` is true."""
    counts: Counter = Counter()
    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, wrapper)
    try:
        yield counts
    finally:
        for name, value in own.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


@pytest.fixture
def watched(monkeypatch):
    """Patch TaskModule so that reads are counted inside its steps and its backward only."""
    inside = [False]
    steps = Counter()
    step, backward = TaskModule._step, pl.LightningModule.backward

    def counted_step(self, batch, stage):
        steps[stage] += 1
        inside[0] = True
        try:
            return step(self, batch, stage)
        finally:
            inside[0] = False

    def counted_backward(self, loss, *args, **kwargs):
        inside[0] = True
        try:
            return backward(self, loss, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(TaskModule, "_step", counted_step)
    monkeypatch.setattr(TaskModule, "backward", counted_backward)
    with counting_host_reads(inside) as reads:
        yield reads, steps


def classification_case():
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    model = MLP(8, 3, hidden=[16, 16])
    return TaskModule(model, Classification(3)), TensorDataset(x, y), dict(feedback_points=["blocks.*"])


def ctr_case():
    x = torch.stack([torch.randint(0, n, (96,)) for n in (5, 7, 3)], dim=1)
    y = torch.randint(0, 2, (96,)).float()
    model = MODELS["deepfm"](field_dims=[5, 7, 3], embed_dim=4, mlp_dims=[16, 16])
    return TaskModule(model, ClickThroughRate()), TensorDataset(x, y), dict(feedback_points=["mlp.*"])


def lm_case():
    x, y = torch.randint(0, 50, (96, 8)), torch.randint(0, 50, (96, 8))
    model = TransformerLM(50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=8)
    points = dict(feedback_points=["blocks.*.out"], output="hidden_out", batch_dims=[0, 1], shared_slices=True)
    return TaskModule(model, LanguageModeling()), TensorDataset(x, y), points


CASES = {"classification": classification_case, "ctr": ctr_case, "lm": lm_case}


@pytest.mark.parametrize("method", ["bp", "dfa"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_reads_the_device_once_for_the_finite_loss_check_and_never_else(tmp_path, watched, case,
                                                                                      method):
    reads, steps = watched
    pl.seed_everything(0, verbose=False)
    module, data, points = CASES[case]()
    dfa = FeedbackAlignmentStrategy(method=method, verbose=False, **points)
    loader = DataLoader(data, batch_size=32)
    fit = trainer(tmp_path, [dfa], max_steps=5, log_every_n_steps=2, limit_val_batches=2)
    fit.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert steps["train"] == 5 and steps["val"] >= 2
    expected = 5  # the finite-loss check, once per training step
    if case == "ctr" and not PROBABILITY_INPUTS:  # torchmetrics < 1.9 tests every batch of AUROC inputs for logits
        expected += steps["train"] + steps["val"]
    assert dict(reads) == {"__bool__": expected}, f"host reads in {steps} steps: {dict(reads)}"


def test_without_the_finite_loss_check_a_training_step_reads_nothing(tmp_path, watched):
    reads, steps = watched
    module, data, points = CASES["lm"]()
    module.check_finite_loss = False
    dfa = FeedbackAlignmentStrategy(verbose=False, **points)
    trainer(tmp_path, [dfa], max_steps=3).fit(module, train_dataloaders=DataLoader(data, batch_size=32))
    assert steps["train"] == 3 and not reads


def test_epoch_values_are_exact_means_though_nothing_is_logged_per_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, data, _ = classification_case()
    loader = DataLoader(data, batch_size=40)  # batches of 40, 40, 16: a weighted mean differs from a plain one
    logger = CSVLogger(tmp_path, name="run")
    fit = trainer(tmp_path, [], max_epochs=2, logger=logger, log_every_n_steps=2, limit_val_batches=None)
    fit.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    metrics = fit.validate(module, dataloaders=loader, verbose=False)[0]
    with torch.no_grad():
        logits = module.model(data.tensors[0])
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, data.tensors[1]).item(), rel=1e-5)
    assert metrics["val/acc"] == pytest.approx((logits.argmax(1) == data.tensors[1]).float().mean().item())
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, r.split(","))) for r in rows[1:]]
    step_rows = [r for r in logged if r.get("train/loss_step")]
    epoch_rows = [r for r in logged if r.get("train/loss_epoch")]
    # 3 steps per epoch, 6 in all: the loggers write every 2nd step; both epochs have their mean loss and accuracy
    assert [int(r["step"]) for r in step_rows] == [1, 3, 5]
    assert len(epoch_rows) == 2 and all(r.get("train/acc") for r in epoch_rows)
    assert sum(1 for r in logged if r.get("val/acc")) == 3  # two epochs of fit, then the validate() above


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_on_a_gpu_a_dfa_training_step_synchronises_once_for_the_finite_loss_check(tmp_path, case):
    """What the CPU count stands for, measured where it matters: CUDA's own sync detector (which also sees the
    host-to-device copies and the data-dependent shapes that the CPU count cannot), under bf16 autocast."""
    pl.seed_everything(0, verbose=False)
    module, data, points = CASES[case]()
    dfa = FeedbackAlignmentStrategy(verbose=False, **points)
    loader = DataLoader(data, batch_size=32)
    # not deterministic: the attention backward has no deterministic CUDA kernel
    options = dict(accelerator="gpu", precision="bf16-mixed", limit_val_batches=2, log_every_n_steps=2,
                   deterministic=False)
    trainer(tmp_path, [dfa], max_steps=2, **options).fit(module, loader, loader)  # warm-up: B and metrics on the GPU
    step, backward = TaskModule._step, pl.LightningModule.backward
    counted: Counter = Counter()
    where: list[str] = []  # each sync's Python stack (the project's frames and the last one), for the message

    def watched(fn, key):
        def run(self, *args, **kwargs):
            def record(message, *_, **__):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if not f.filename.endswith("warnings.py")]  # the hook's own frames
                # one warning came from the switch itself on the H200 (torch 2.11), in no step's code: not counted
                if "synchroniz" in str(message) and frames[-1].name != "set_sync_debug_mode":
                    counted[key(args)] += 1
                    ours = [f for f in frames if "dfa_lightning" in f.filename or "benchmarks" in f.filename]
                    where.append(f"{key(args)}: " + " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                               for f in reversed(ours[-4:] + frames[-1:])))

            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return fn(self, *args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskModule, "_step", watched(step, lambda args: args[1]))
        mp.setattr(TaskModule, "backward", watched(backward, lambda args: "backward"))
        trainer(tmp_path, [dfa], max_steps=4, **options).fit(module, loader, loader)  # 3 steps, validation, 1 step
    assert counted["train"] == 4 and counted["val"] == 0 and counted["backward"] == 0, (dict(counted), where)


def test_the_sanity_check_leaves_nothing_in_the_first_validation_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    module, data, _ = classification_case()
    loader = DataLoader(data, batch_size=40)  # the sanity check's 2 batches counted twice would shift the mean
    fit = trainer(tmp_path, [], max_epochs=1, logger=CSVLogger(tmp_path, name="run"), limit_val_batches=None,
                  num_sanity_val_steps=2)
    fit.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    with torch.no_grad():  # the epoch's validation ran with the final weights
        logits = module.model(data.tensors[0])
    assert fit.callback_metrics["val/loss"].item() == pytest.approx(
        F.cross_entropy(logits, data.tensors[1]).item(), rel=1e-5)
    assert fit.callback_metrics["val/acc"].item() == pytest.approx(
        (logits.argmax(1) == data.tensors[1]).float().mean().item())
