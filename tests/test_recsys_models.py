"""CTR models on the real Criteo sample: shapes, deferred build, feedback points, BP learns; the CTR task."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfa_lightning.data.criteo import CriteoDataModule
from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback.points import glob_match, resolve_points
from dfa_lightning.models.recsys import FEEDBACK_POINTS, MODELS
from dfa_lightning.tasks.ctr import ClickThroughRate, LogLoss

SAMPLE = Path("/work/shared/data/criteo/train_10k.txt")
pytestmark = pytest.mark.skipif(not SAMPLE.is_file(), reason="shared Criteo sample not available")
SMALL = {"afn": {"lnn_dim": 100}}  # keeps the slowest model light where the paper size is not the point


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a small shared CPU box, torch's thread pool spinning against other jobs makes steps 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> CriteoDataModule:
    folder = tmp_path_factory.mktemp("criteo")
    shutil.copyfile(SAMPLE, folder / "train_10k.txt")
    dm = CriteoDataModule(path=str(folder / "train_10k.txt"), cache_dir=str(folder / "cache"), batch_size=512)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def batch(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return next(iter(datamodule.train_dataloader()))


def test_feedback_points_cover_every_model():
    assert set(FEEDBACK_POINTS) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_feedback_points(name, datamodule, batch):
    x, _ = batch
    torch.manual_seed(0)
    model = MODELS[name](field_dims=datamodule.field_dims)  # paper sizes
    assert model.built
    outputs = {}
    modules = dict(model.named_modules())
    points = [n for n, _ in resolve_points(model, FEEDBACK_POINTS[name])]  # the DFA engine's resolution
    for n in points:
        modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
    logit = model(x)
    assert logit.shape == (len(x),) and torch.isfinite(logit).all()
    assert set(outputs) == set(points)
    for n, out in outputs.items():
        assert isinstance(out, torch.Tensor) and out.shape[0] == len(x), n
    assert model.feedback_points == FEEDBACK_POINTS[name]


def test_paper_feedback_points(datamodule):
    def points(name):
        return [n for n, _ in MODELS[name]().named_modules() if any(glob_match(n, p) for p in FEEDBACK_POINTS[name])]

    assert points("deepfm") == ["mlp.0", "mlp.1", "mlp.2"]
    assert points("deepcross") == ["embedding"] + [f"cross.layers.{i}" for i in range(6)] + ["mlp.0", "mlp.1", "stack"]
    assert points("autoint") == ["embedding", "attn_embedding", "attention.0", "attention.1", "attention.2",
                                 "attn_out", "mlp.0", "mlp.1", "mlp.2"]
    assert points("afn") == ["lnn", "mlp.0", "mlp.1", "mlp.2"]
    assert points("fm") == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deferred_build(name, datamodule, batch):
    x, _ = batch
    model = MODELS[name](**SMALL.get(name, {}))
    assert not model.built and model.field_dims is None
    names_before = {n for n, _ in model.named_modules()}
    with pytest.raises(ConfigError, match="build"):
        model(x)
    with pytest.raises(ConfigError, match="field_dims"):
        model.build()
    model.build(**datamodule.model_hints(), ignored_hint=1)
    assert model.built and model.field_dims == datamodule.field_dims
    assert {n for n, _ in model.named_modules()} == names_before  # feedback points resolve before build too
    weight = model.embedding.weight
    model.build(**datamodule.model_hints())
    model.build()
    assert model.embedding.weight is weight  # idempotent
    with pytest.raises(ConfigError, match="field_dims"):
        model.build(field_dims=[d + 1 for d in datamodule.field_dims])
    with pytest.raises(ConfigError, match="39 fields"):
        model.build(field_dims=[2] * 38)
    model.eval()
    logit = model(x)
    assert logit.shape == (len(x),) and torch.isfinite(logit).all()
    restored = MODELS[name](**SMALL.get(name, {}))  # loading a checkpoint builds the tables from their shapes
    restored.load_state_dict(model.state_dict())
    assert restored.built and torch.equal(restored.eval()(x), logit)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backprop_reduces_training_loss(name, datamodule, batch):
    x, y = batch
    torch.manual_seed(0)
    model = MODELS[name](field_dims=datamodule.field_dims, **SMALL.get(name, {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_deepfm_detach_flag(datamodule, batch):
    x, _ = batch
    for detach in (True, False):
        torch.manual_seed(0)
        model = MODELS["deepfm"](field_dims=datamodule.field_dims, detach_mlp_input=detach)
        full = torch.autograd.grad(model(x).sum(), model.embedding.weight)[0]
        fm_only = torch.autograd.grad(model.fm(model.embedding(x)).sum(), model.embedding.weight)[0]
        # detached: the embeddings learn through the FM part only; otherwise the MLP adds its gradient.
        assert torch.allclose(full, fm_only) == detach


def test_click_through_rate_task(datamodule, batch):
    x, y = batch
    task = ClickThroughRate()
    assert task.monitor == "val/auroc" and task.monitor_mode == "max"
    torch.manual_seed(0)
    model = MODELS["fm"](field_dims=datamodule.field_dims)
    out = task.step(model, (x, y), "train")
    assert out.output.shape == (len(x),) and out.batch_size == len(x)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(model(x), y))
    out.loss.backward()  # the loss is differentiable w.r.t. the model
    logged = task.update_metrics(out, (x, y), "val")
    assert set(logged) == {"val/auroc", "val/logloss"}
    auroc, logloss = logged["val/auroc"].compute(), logged["val/logloss"].compute()
    assert 0.0 <= auroc <= 1.0
    assert torch.allclose(logloss, out.loss.detach(), rtol=1e-3)
    preds, target = task.metric_inputs(out, (x, y), "val")
    assert target.dtype == torch.long and ((preds >= 0) & (preds <= 1)).all()
    train_metrics = task.stage_metrics("train")
    assert len(train_metrics) == 2 and not train_metrics["auroc"].update_count  # stages keep separate metrics


def test_logloss_is_the_mean_over_rows_not_over_batches():
    """Epoch log loss of uneven batches (a last partial batch) = BCE over every row, as the paper's logloss."""
    torch.manual_seed(0)
    probs, target = torch.rand(13).double(), (torch.rand(13) > 0.5).long()
    metric = LogLoss()
    for part in (slice(0, 10), slice(10, 13)):
        metric.update(probs[part], target[part])
    expected = F.binary_cross_entropy(probs, target.double())
    assert torch.allclose(metric.compute().double(), expected, rtol=1e-6)


def test_logloss_of_a_certain_wrong_prediction_is_capped_at_minus_log_eps():
    """A probability of exactly 0 for a click counts -log(1e-15) = 34.5 (sklearn/Kaggle logloss), not torch's
    log clamp of 100, which would let one saturated row outweigh thousands of others."""
    metric = LogLoss()
    metric.update(torch.tensor([0.0], dtype=torch.float64), torch.tensor([1]))
    assert metric.compute().item() == pytest.approx(-math.log(1e-15), rel=1e-6)
