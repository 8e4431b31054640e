"""CTR models on the real Criteo sample: shapes, deferred build, feedback points, BP learns; the CTR task."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfa_lightning.data.criteo import CriteoDataModule
from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback.points import glob_match, resolve_points
from dfa_lightning.models.recsys import (FEEDBACK_POINTS, LNN, MODELS, CrossNetwork, FactorizationMachine,
                                         FeaturesEmbedding, FeaturesLinear)
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


def test_logloss_updates_inside_a_mixed_precision_step(monkeypatch):
    """The metric is updated inside the training step, under the Trainer's autocast; CUDA's autocast refuses
    binary_cross_entropy outright, which failed every bf16-mixed CTR run on a GPU (seen on an H200). Here the CPU's
    autocast stands in, with the function made to refuse as CUDA's does."""
    real = F.binary_cross_entropy

    def refused_under_autocast(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("binary_cross_entropy is unsafe to autocast")
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", refused_under_autocast)
    metric = LogLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric.update(torch.tensor([0.25, 0.75], dtype=torch.bfloat16), torch.tensor([0, 1]))
    assert metric.compute().item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_fm_term_is_the_sum_of_pairwise_inner_products_of_the_field_embeddings():
    torch.manual_seed(0)
    e = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = sum((e[:, i] * e[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(FactorizationMachine()(e), expected.unsqueeze(1))


def test_linear_term_sums_one_weight_per_category_over_the_fields_plus_a_zero_initialised_bias():
    torch.manual_seed(0)
    linear = FeaturesLinear()
    linear.fc.build(10)
    assert torch.equal(linear.bias, torch.zeros(1))
    with torch.no_grad():
        linear.bias.fill_(0.5)
    x = torch.tensor([[0, 3, 7], [1, 1, 9]])
    expected = linear.fc.weight[x].squeeze(-1).sum(1, keepdim=True) + 0.5
    assert torch.allclose(linear(x), expected)


def test_cross_network_applies_x_next_equals_x0_times_x_dot_w_plus_b_plus_x():
    torch.manual_seed(0)
    cross = CrossNetwork(4, num_layers=2)
    for layer in cross.layers:
        nn.init.normal_(layer.b)
    x0 = torch.randn(3, 4)
    x = x0
    for layer in cross.layers:
        x = x0 * (x @ layer.w.weight.T) + layer.b + x
    assert torch.allclose(cross(x0), x, atol=1e-6)


def test_logarithmic_neurons_compute_the_clipped_weighted_product_of_one_plus_abs_embeddings():
    """AFN's neuron j: relu(prod_i (1 + |e_i|)^{w_ji} - 1) (with torchfm's 1e-7 inside the log)."""
    lnn = LNN(num_fields=2, embed_dim=3, lnn_dim=3)
    with torch.no_grad():
        lnn.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0]]))
    e = torch.tensor([[[0.5, -2.0, 0.0], [1.0, 0.0, -3.0]]], dtype=torch.float32)  # [B=1, F=2, E=3]
    a = 1 + e.abs() + 1e-7
    expected = torch.stack([a[:, 0] - 1, a[:, 0] ** 2 * a[:, 1] - 1, torch.zeros_like(a[:, 0])], 1)
    assert torch.allclose(lnn(e), expected.flatten(1), atol=1e-5)


def test_embedding_tables_are_xavier_uniform_and_the_linear_weights_standard_normal():
    torch.manual_seed(0)
    table = FeaturesEmbedding(8, num_embeddings=20000)
    assert table.weight.abs().max() <= math.sqrt(6 / (20000 + 8))  # xavier_uniform's bound
    linear = FeaturesEmbedding(1, num_embeddings=20000, init="normal")
    assert 0.95 < linear.weight.std().item() < 1.05


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_of_every_model_receives_a_gradient(name):
    """No term of the model is left out of the logit (FM's, the cross network's, AutoInt's attention and residual,
    the linear term)."""
    torch.manual_seed(0)
    sizes = {"fm": {}, "deepfm": {"mlp_dims": [8]}, "deepcross": {"mlp_dims": [8], "num_cross_layers": 2},
             "autoint": {"mlp_dims": [8], "num_attn_layers": 1}, "afn": {"lnn_dim": 4, "mlp_dims": [8]}}[name]
    model = MODELS[name](field_dims=[3, 4, 5], embed_dim=4, **sizes)
    x = torch.stack([torch.randint(0, 3, (6,)), torch.randint(3, 7, (6,)), torch.randint(7, 12, (6,))], 1)
    model(x).sum().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


@pytest.mark.parametrize("name", ["deepfm", "deepcross", "autoint", "afn"])
def test_mlp_blocks_are_linear_batchnorm_relu_dropout_with_the_given_dropout(name):
    model = MODELS[name](field_dims=[3, 4, 5], dropout=0.3, **SMALL.get(name, {}))
    for block in model.mlp:
        assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
        assert block[3].p == 0.3
    if name == "autoint":
        assert all(layer.attn.dropout == 0.3 for layer in model.attention)


def test_default_sizes_are_the_reference_codes():
    deepfm, afn = MODELS["deepfm"](), MODELS["afn"]()
    assert deepfm.detach_mlp_input and deepfm.embedding.dim == 10
    assert [b[0].out_features for b in deepfm.mlp] == [400, 400, 400]
    assert afn.embedding.dim == 10 and tuple(afn.lnn.weight.shape) == (1500, 39)
    assert MODELS["fm"]().embedding.dim == 16
    deepcross = MODELS["deepcross"]()
    assert deepcross.embedding.dim == 16 and [b[0].out_features for b in deepcross.mlp] == [1024, 1024]
    autoint = MODELS["autoint"]()
    assert autoint.embedding.dim == 16 and autoint.attn_embedding.out_features == 32
    assert autoint.attention[0].attn.num_heads == 2 and autoint.residual is not None
