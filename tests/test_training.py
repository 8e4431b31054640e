"""The engine inside Lightning: accumulation, mixed precision, resume, the alignment probe, NaN handling."""
from __future__ import annotations

import csv
import math
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision

from dfa_lightning.callbacks import AlignmentMonitor, FeedbackAlignmentStrategy
from dfa_lightning.data.synthetic import SyntheticClassificationDataModule
from dfa_lightning.errors import ConfigError, NonFiniteLossError
from dfa_lightning.models.mlp import MLP
from dfa_lightning.module import TaskModule
from dfa_lightning.probe import first_training_batch, probe_forward_context
from dfa_lightning.tasks.classification import Classification
from helpers import FirstOfSeveralLoaders, adam, build, params, sgd, trainer


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=name)


@pytest.mark.parametrize("method", ["dfa", "shallow"])
def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path, method):
    full, data, dfa = build(method, batch_size=32)
    trainer(tmp_path, [dfa], max_steps=3).fit(full, data)
    half, data, dfa = build(method, batch_size=16)
    trainer(tmp_path, [dfa], max_steps=3, accumulate_grad_batches=2).fit(half, data)
    assert_same(params(full), params(half), atol=1e-6)


def test_dfa_trains_and_changes_every_layer_while_shallow_freezes_the_hidden_ones(tmp_path):
    for method in ("dfa", "shallow"):
        module, data, dfa = build(method)
        before = params(module)
        trainer(tmp_path, [dfa], max_steps=4).fit(module, data)
        after = params(module)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        hidden = {n for n in before if n.startswith("blocks")}
        assert "head.weight" in changed
        assert (hidden <= changed) if method == "dfa" else not (hidden & changed)


def test_bf16_mixed_runs_keeps_feedback_in_fp32_and_stays_close_to_fp32(tmp_path):
    ref, data, dfa32 = build("dfa")
    trainer(tmp_path, [dfa32], max_steps=2).fit(ref, data)
    module, data, dfa = build("dfa")
    trainer(tmp_path, [dfa], max_steps=2, precision="bf16-mixed").fit(module, data)
    assert dfa.engine.matrix.dtype == torch.float32
    assert torch.equal(dfa.engine.matrix, dfa32.engine.matrix)
    for name, p in params(module).items():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        torch.testing.assert_close(p, params(ref)[name], atol=2e-2, rtol=5e-2)


def _probed(tmp_path, **options) -> dict:
    """What the DFA callback's setup probe measured for the ``auto`` choice, with the error's dtype projected."""
    module, data, dfa = build("dfa")
    dfa.config["projection_dtype"] = "gradient"  # the fused signal in the error's dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDA autocast and GradScaler, disabled without CUDA, say so
        trainer(tmp_path, [dfa], max_steps=1, **options).fit(module, data)
    return dfa.engine.calibration


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_the_setup_probe_of_a_gpu_amp_run_measures_under_its_autocast_on_the_cpu(precision, tmp_path):
    """Lightning's setup runs before the model is moved to its device, and a CUDA autocast does nothing on the CPU:
    the probe of an AMP run on a GPU measured fp32 activations and an fp32 error for the ``auto`` projection choice
    (twice their size), as if AMP were off."""
    gpu_amp = _probed(tmp_path, plugins=[MixedPrecision(precision, device="cuda")])  # the probe runs on the CPU
    cpu_amp, fp32 = _probed(tmp_path, precision="bf16-mixed"), _probed(tmp_path)
    assert gpu_amp["fused_signal_bytes"] == cpu_amp["fused_signal_bytes"] == fp32["fused_signal_bytes"] // 2
    assert gpu_amp["saved_activation_bytes"] == cpu_amp["saved_activation_bytes"] < fp32["saved_activation_bytes"]


def test_the_setup_probe_of_a_bf16_true_run_measures_half_sizes_though_the_model_is_cast_after_it(tmp_path):
    true, fp32 = _probed(tmp_path, precision="bf16-true"), _probed(tmp_path)
    assert true["fused_signal_bytes"] == fp32["fused_signal_bytes"] // 2
    assert true["saved_activation_bytes"] < fp32["saved_activation_bytes"]


def test_a_half_precision_run_is_probed_in_bf16_on_the_cpu_and_in_its_own_dtype_on_its_device():
    """Only the values' size matters to the probe: two bytes either way, and the CPU has fewer fp16 kernels."""
    from pytorch_lightning.plugins.precision import HalfPrecision

    def probe_dtype(plugin, device: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CUDA autocast without CUDA is disabled, and says so
            context = probe_forward_context(SimpleNamespace(precision_plugin=plugin), torch.device(device))
        return context.fast_dtype if isinstance(context, torch.autocast) else None

    assert probe_dtype(MixedPrecision("16-mixed", device="cuda"), "cpu") == torch.bfloat16
    assert probe_dtype(HalfPrecision("16-true"), "cpu") == torch.bfloat16
    assert probe_dtype(HalfPrecision("bf16-true"), "cpu") == torch.bfloat16
    assert probe_dtype(HalfPrecision("16-true"), "cuda") == torch.half  # a model put on the GPU: its own dtype
    assert probe_dtype(pl.plugins.precision.Precision(), "cpu") is None  # fp32: nothing to stand in for


@pytest.mark.gpu
def test_the_setup_probe_of_a_bf16_gpu_run_measures_as_a_bf16_cpu_run(tmp_path):
    gpu = _probed(tmp_path, accelerator="gpu", precision="bf16-mixed")
    cpu = _probed(tmp_path, precision="bf16-mixed")
    assert {k: gpu[k] for k in ("saved_activation_bytes", "fused_signal_bytes")} == \
        {k: cpu[k] for k in ("saved_activation_bytes", "fused_signal_bytes")}


def test_the_probes_first_batch_comes_on_the_asked_device_with_the_data_order_untouched():
    module, data, _ = build("dfa")
    t = trainer(".", [], max_steps=1)
    data.setup()
    t.strategy.connect(module)
    t._data_connector.attach_data(module, datamodule=data)
    state = torch.get_rng_state()
    x, y = first_training_batch(t, torch.device("meta"))
    assert x.device.type == y.device.type == "meta" and x.shape == (32, 16)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.gpu
def test_a_model_put_on_the_gpu_before_fit_is_probed_there_with_its_batch_moved_to_it(tmp_path):
    """Lightning's setup runs before it moves the model: a notebook's ``module.cuda()`` left the probe with a CUDA
    model and a CPU batch."""
    module, data, dfa = build("dfa")
    module.cuda()
    trainer(tmp_path, [dfa], max_steps=2, accelerator="gpu").fit(module, data)
    assert dfa.engine.calibration["saved_activation_bytes"] > 0
    assert all(torch.isfinite(p).all() for p in params(module).values())


@pytest.mark.parametrize("dropout, validate", [(0.0, False), (0.3, False), (0.3, True)],
                         ids=["no-dropout", "dropout", "dropout-validated"])
def test_resume_from_checkpoint_equals_uninterrupted_run_with_the_same_feedback(tmp_path, dropout, validate):
    """Bit for bit, dropout and shuffling too: the checkpoint carries the random state (a resumed fit drew its
    masks and its data order from seed_everything's state, and differed by up to 0.045 on Cora's GCN)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    # k = one epoch (4 steps); the uninterrupted run saves a checkpoint at k and goes on to 2k
    straight, data, dfa_straight = build("dfa", optimizer=adam, dropout=dropout)
    data.shuffle = validate
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    checks = dict(limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=2)
    trainer(tmp_path, [dfa_straight, every_epoch], max_epochs=2, enable_checkpointing=True, **checks
            ).fit(straight, data)
    ckpt = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["FeedbackAlignmentStrategy"]["feedback"]["matrix"]
    assert torch.equal(saved, dfa_straight.engine.matrix)

    resumed, data, dfa_resumed = build("dfa", optimizer=adam, dropout=dropout)
    data.shuffle = validate
    trainer(tmp_path, [dfa_resumed], max_epochs=2, **checks).fit(resumed, data, ckpt_path=str(ckpt))
    assert torch.equal(dfa_resumed.engine.matrix, dfa_straight.engine.matrix)
    assert_same(params(straight), params(resumed))


def doubled_matrix_checkpoint(t: pl.Trainer, path):
    """``t``'s checkpoint with B doubled, a matrix the seed cannot produce: a fresh draw cannot pass for it."""
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    state["callbacks"]["FeedbackAlignmentStrategy"]["feedback"]["matrix"] *= 2
    torch.save(state, path)
    return path


@pytest.mark.parametrize("bare", [False, True], ids=["datamodule", "bare dataloader"])
def test_resume_uses_the_checkpointed_matrix_not_a_fresh_draw(tmp_path, bare):
    """Also without a datamodule (``fit(model, train_dataloaders=...)``): the probe still finds the first batch at
    setup, and the resumed run installs the checkpoint's B."""
    def fit(trainer_, module, data, **kwargs):
        if bare:
            data.setup("fit")
            return trainer_.fit(module, train_dataloaders=data.train_dataloader(), **kwargs)
        return trainer_.fit(module, data, **kwargs)

    first, data, dfa = build("dfa")
    t = trainer(tmp_path, [dfa], max_epochs=1)
    fit(t, first, data)
    assert dfa.engine.calibration is not None  # the probe ran at setup (the auto projection was measured)
    ckpt = doubled_matrix_checkpoint(t, tmp_path / "k.ckpt")
    resumed, data, dfa2 = build("dfa")
    fit(trainer(tmp_path, [dfa2], max_epochs=2), resumed, data, ckpt_path=str(ckpt))
    torch.testing.assert_close(dfa2.engine.matrix, dfa.engine.matrix * 2)


def test_a_matrix_loaded_before_the_widths_are_known_is_installed_at_the_first_forward():
    """No probe batch (widths unknown when the checkpoint is restored): the loaded B waits, is checkpointed as it
    is, and the first forward installs it in place of a fresh draw."""
    from dfa_lightning.feedback.engine import FeedbackEngine
    from dfa_lightning.models.mlp import MLP

    torch.manual_seed(0)
    reference = MLP(16, 4, hidden=[32, 32])
    drawn = FeedbackEngine(reference, ["blocks.*"], seed=7)
    model = MLP(16, 4, hidden=[32, 32])
    x = torch.randn(8, 16)
    reference(x).sum().backward()  # widths known: B drawn at the first forward
    saved = {"matrix": 3 * drawn.matrix}
    engine = FeedbackEngine(model, ["blocks.*"], seed=7)
    engine.load_feedback_state(saved)
    assert engine.operator is None and torch.equal(engine.feedback_state()["matrix"], saved["matrix"])
    model(x).sum().backward()
    torch.testing.assert_close(engine.matrix, saved["matrix"])


class _Attached(pl.Callback):
    """The engines whose hooks are on the model while it trains."""

    def on_train_start(self, trainer, pl_module):
        from dfa_lightning.callbacks.feedback_alignment import attached_engines

        self.engines = attached_engines(pl_module.model)


@pytest.mark.parametrize("later", ["bp rule", "no rule"])
def test_a_later_fit_of_a_dfa_trained_model_without_that_rule_trains_it_by_backprop(tmp_path, later):
    """A model trained by DFA, then fitted again by BP (a notebook comparing both on it): the hooks left by the first
    fit made the second train by DFA when its Trainer had no rule at all. They leave with the fit now; the same
    rule fitted again attaches them again. Two rules (NeRF's coarse and fine) are attached together."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.callbacks.feedback_alignment import attached_engines

    module, data, dfa = build("dfa")
    seen = _Attached()
    trainer(tmp_path, [dfa, seen], max_steps=1).fit(module, data)
    assert seen.engines == [dfa.engine] and attached_engines(module.model) == []
    reference, _, _ = build("bp")
    reference.model.load_state_dict(module.model.state_dict())
    rules = [FeedbackAlignmentStrategy(method="bp", verbose=False)] if later == "bp rule" else []
    trainer(tmp_path, rules, max_steps=2).fit(module, data)
    trainer(tmp_path, [FeedbackAlignmentStrategy(method="bp", verbose=False)], max_steps=2).fit(reference, data)
    assert_same(params(module), params(reference))

    trainer(tmp_path, [dfa, seen], max_steps=1).fit(module, data)  # the same rule again: its hooks, its B
    assert seen.engines == [dfa.engine]
    named = FeedbackAlignmentStrategy(feedback_points=["blocks.0"], name="net0", verbose=False)
    again = FeedbackAlignmentStrategy(feedback_points=["blocks.1"], verbose=False)
    trainer(tmp_path, [named, again, seen], max_steps=1).fit(module, data)
    assert {id(e) for e in seen.engines} == {id(named.engine), id(again.engine)}


def test_two_rules_on_one_feedback_point_are_refused(tmp_path):
    """The second rule skipped the point the first had taken, and reported the layers below it as trained by
    backprop, where the first rule's B e trained them."""
    module, data, _ = build("dfa")
    first = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], name="coarse", verbose=False)
    second = FeedbackAlignmentStrategy(feedback_points=["blocks.1"], name="fine", verbose=False)
    with pytest.raises(ConfigError, match=r"FeedbackAlignmentStrategy 'fine': feedback point\(s\) blocks.1 belong to "
                                          r"two rules"):
        trainer(tmp_path, [first, second], max_steps=1).fit(module, data)


def test_a_module_kept_in_eval_mode_stays_so_through_the_probes(tmp_path):
    """A BatchNorm frozen on its running statistics (``bn.eval()`` before fit, which Lightning respects): the DFA
    probe's ``model.train()`` put it back in training mode, so it normalised with batch statistics and moved its
    running ones in DFA and shallow runs only; the final alignment did the same."""
    from dfa_lightning.callbacks import FinalAlignment

    for method in ("bp", "dfa", "shallow"):
        module, data, _ = build(method)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        model[1].eval()
        module = TaskModule(model, Classification(4), optimizer=sgd)
        rule = FeedbackAlignmentStrategy(method=method, feedback_points=["2", "4"], verbose=False)
        trainer(tmp_path, [rule, FinalAlignment()], max_steps=2).fit(module, data)
        assert not model[1].training and model[0].training, method
        assert torch.equal(model[1].running_mean, torch.zeros(32)), method


def test_feedback_points_given_as_classes_leave_checkpoints_that_load_and_resume(tmp_path):
    """The class objects were saved in the rule's config: ``torch.load(weights_only=True)`` refused every checkpoint
    (resuming, ``test --ckpt_path``, the best checkpoint's test after fit)."""
    module, data, _ = build("dfa")
    module.model.blocks[0].append(torch.nn.Tanh())
    rule = FeedbackAlignmentStrategy(feedback_points=[torch.nn.Tanh], verbose=False)
    t = trainer(tmp_path, [rule], max_epochs=1)
    t.fit(module, data)
    ckpt = tmp_path / "types.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["FeedbackAlignmentStrategy"]["config"]
    assert saved["feedback_points"] == ["torch.nn.modules.activation.Tanh"]
    again = FeedbackAlignmentStrategy(feedback_points=[torch.nn.Tanh], verbose=False)
    trainer(tmp_path, [again], max_epochs=2).fit(module, data, ckpt_path=str(ckpt))
    assert torch.equal(again.engine.matrix, rule.engine.matrix)


def test_testing_a_checkpoint_of_another_operator_after_a_fit_keeps_this_runs_feedback(tmp_path):
    """A test of a lowrank run's checkpoint by a dense rule that had trained failed to load its B (KeyError
    'matrix'). Its weights are the module's now, but its B cannot serve this rule: the rule keeps its own."""
    module, data, _ = build("dfa", optimizer=adam)
    other, _, _ = build("dfa", optimizer=adam)
    t = trainer(tmp_path, [FeedbackAlignmentStrategy(feedback_points=["blocks.*"], operator="lowrank", rank=2,
                                                     verbose=False)], max_steps=1)
    t.fit(other, data)
    t.save_checkpoint(tmp_path / "lowrank.ckpt")
    rule = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], seed=1, verbose=False)
    t = trainer(tmp_path, [rule], max_steps=1)
    t.fit(module, data)
    mine = rule.engine.matrix.clone()
    t.test(module, data, ckpt_path=str(tmp_path / "lowrank.ckpt"), verbose=False)
    assert torch.equal(rule.engine.matrix, mine)


@pytest.mark.parametrize("change, refused", [
    (dict(feedback_norm={"**": "orthogonal", "blocks.0": "layer"}), True),
    (dict(feedback_points=["blocks.1", "blocks.0"]), False),
    (dict(rank=8), False),
], ids=["norm globs reordered", "points reordered", "rank under dense"])
def test_resuming_compares_the_feedback_settings_as_they_act(tmp_path, change, refused):
    """The first matching ``feedback_norm`` glob wins: reordered, the points' norms changed and the resume was
    accepted. Points listed in another order resolve to the same points, and ``rank`` means nothing to the dense
    operator: both were refused."""
    def rule(**kwargs):
        settings = dict(feedback_points=["blocks.0", "blocks.1"], seed=1, verbose=False,
                        feedback_norm={"blocks.0": "layer", "**": "orthogonal"})
        return FeedbackAlignmentStrategy(**{**settings, **kwargs})

    module, data, _ = build("dfa", optimizer=adam)
    t = trainer(tmp_path, [rule()], max_epochs=1)
    t.fit(module, data)
    ckpt = tmp_path / "dfa.ckpt"
    t.save_checkpoint(ckpt)
    resumed = trainer(tmp_path, [rule(**change)], max_epochs=2)
    if refused:
        with pytest.raises(ConfigError, match=r"other feedback settings: \['feedback_norm'\]"):
            resumed.fit(build("dfa", optimizer=adam)[0], data, ckpt_path=str(ckpt))
    else:
        resumed.fit(build("dfa", optimizer=adam)[0], data, ckpt_path=str(ckpt))


def test_one_rule_fitted_on_a_second_network_trains_it_by_direct_feedback_too(tmp_path):
    """A loop over models with one rule instance: the second fit kept the first network's engine, so the second
    network trained by plain backprop under a DFA recipe."""
    from dfa_lightning.callbacks.feedback_alignment import attached_engines

    first, data, dfa = build("dfa")
    trainer(tmp_path, [dfa], max_steps=2).fit(first, data)
    second, data, _ = build("dfa")
    trainer(tmp_path, [dfa], max_steps=2).fit(second, data)
    fresh, data, own = build("dfa")
    trainer(tmp_path, [own], max_steps=2).fit(fresh, data)
    assert_same(params(second), params(fresh))
    assert dfa.engine.model is second.model and attached_engines(first.model) == []


def test_a_point_that_runs_only_in_training_gets_its_feedback_sized_at_the_first_step(tmp_path):
    """The setup probe runs in eval mode: a branch taken only in training (an auxiliary head) was refused there as a
    point that "never ran"."""

    class TrainOnlyBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.aux, self.aux_act = torch.nn.Linear(16, 8), torch.nn.Tanh(), \
                torch.nn.Linear(16, 8), torch.nn.Tanh()
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.act(self.fc(x))
            return self.head(h + self.aux_act(self.aux(x)) if self.training else h)

    _, data, _ = build("dfa")
    module = TaskModule(TrainOnlyBranch(), Classification(4), optimizer=sgd)
    before = module.model.aux.weight.detach().clone()
    dfa = FeedbackAlignmentStrategy(feedback_points=["act", "aux_act"], verbose=False)
    trainer(tmp_path, [dfa], max_steps=2).fit(module, data)
    assert [p.width for p in dfa.engine.points] == [8, 8] and dfa.engine.matrix.shape == (4, 16)
    assert not torch.equal(module.model.aux.weight, before)


def test_a_rule_whose_points_never_run_in_training_is_refused_at_the_first_step(tmp_path):
    """The probe lets a point it did not see wait for the first training forward; a rule none of whose points ever
    run (NeRF's fine rule with ``fine_samples: 0``) then did nothing, silently."""

    class Spare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.spare, self.head = (torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Tanh(),
                                                        torch.nn.Linear(8, 4))

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    _, data, _ = build("dfa")
    dfa = FeedbackAlignmentStrategy(feedback_points=["spare"], verbose=False)
    with pytest.raises(ConfigError, match=r"FeedbackAlignmentStrategy: feedback point\(s\) never ran in a training "
                                          r"forward: spare"):
        trainer(tmp_path, [dfa], max_steps=1).fit(TaskModule(Spare(), Classification(4), optimizer=sgd), data)


def test_the_probe_leaves_a_loaders_own_generator_where_it_was(tmp_path):
    """A loader shuffled by its own ``generator``: the probe's first batch advanced it, so a DFA run saw its data in
    another order than the BP run it is compared with."""
    from torch.utils.data import DataLoader, TensorDataset

    class Seen(pl.Callback):
        def __init__(self):
            self.labels = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.labels.append(batch[1].tolist())

    x, y = torch.randn(64, 16), torch.arange(64) % 4
    orders = []
    for method in ("bp", "dfa"):
        module, _, rule = build(method)
        loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(123))
        seen = Seen()
        trainer(tmp_path, [rule, seen], max_steps=3).fit(module, loader)
        orders.append(seen.labels)
    assert orders[0] == orders[1]


def test_alignment_monitor_does_not_change_the_training_trajectory(tmp_path):
    plain, data, dfa = build("dfa", dropout=0.3)
    trainer(tmp_path, [dfa], max_steps=5).fit(plain, data)
    watched, data, dfa2 = build("dfa", dropout=0.3)
    monitor = AlignmentMonitor(every_n_steps=1)
    trainer(tmp_path, [dfa2, monitor], max_steps=5).fit(watched, data)
    assert_same(params(plain), params(watched))
    assert dfa2.engine.capture is None  # the probe's capture would hold a step of activations from then on
    keys = set(monitor.last)
    for point in ("blocks.0", "blocks.1"):
        assert {f"align/signal_cos/{point}", f"align/update_cos/{point}", f"align/update_ratio/{point}"} <= keys
    assert all(-1.0 <= monitor.last[k] <= 1.0 for k in keys if "cos" in k)


@pytest.mark.parametrize("method", ["bp", "shallow", None])
def test_the_monitor_on_a_run_without_a_dfa_rule_says_it_will_log_nothing(tmp_path, method):
    """On a BP or shallow recipe `callbacks/alignment.yaml` logged no align/ metric and said nothing."""
    module, data, rule = build(method or "bp")
    monitor = AlignmentMonitor(every_n_steps=1)
    callbacks = [rule, monitor] if method else [monitor]
    with pytest.warns(UserWarning, match=f"learning rule is {method or 'no FeedbackAlignmentStrategy'}, not dfa: "
                                         "there is no feedback signal"):
        trainer(tmp_path, callbacks, max_steps=2).fit(module, data)
    assert monitor.last == {}


def test_alignment_is_perfect_when_feedback_equals_the_transposed_top_weight(tmp_path):
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.models.mlp import MLP
    from dfa_lightning.module import TaskModule
    from dfa_lightning.tasks.classification import Classification
    from helpers import sgd
    from dfa_lightning.data.synthetic import SyntheticClassificationDataModule

    module = TaskModule(MLP(16, 4, hidden=[32]), Classification(4), optimizer=sgd)
    data = SyntheticClassificationDataModule(num_samples=64, in_features=16, num_classes=4, batch_size=32)
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.0"], scale="none", verbose=False)
    monitor = AlignmentMonitor(every_n_steps=1)
    t = trainer(tmp_path, [dfa, monitor], max_steps=1)
    data.setup()
    t.fit(module, data)  # sets up the engine
    dfa.engine.set_matrix(module.model.head.weight.detach().clone())
    batch = next(iter(data.train_dataloader()))
    out = monitor.measure(module, dfa, batch)
    assert out["align/signal_cos/blocks.0"] == pytest.approx(1.0, abs=1e-5)
    assert out["align/update_cos/blocks.0"] == pytest.approx(1.0, abs=1e-5)
    assert out["align/update_ratio/blocks.0"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("norm", ["layer", {"blocks.1": "layer"}], ids=["every point", "one point"])
def test_the_monitor_measures_the_signal_that_reaches_each_point_through_the_feedback_norm(tmp_path, norm):
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    module, data, _ = build("dfa")
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], feedback_norm=norm, seed=7, verbose=False)
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    batch = next(iter(data.train_dataloader()))
    engine = dfa.engine
    engine.attach_hooks()  # driven by hand after the fit, whose end took them off
    engine.capture = {}
    loss = module.task.step(module.model, batch, "train").loss
    raw = [engine.capture[p] for p in ("blocks.0", "blocks.1")]
    engine.capture = None
    delivered = torch.autograd.grad(loss, raw)  # a DFA backward's only path to each raw point output: the feedback
    engine.reset()
    measured, _ = AlignmentMonitor()._pass(module, engine, batch, dict(module.model.named_parameters()), cut=True)
    for name, got in zip(("blocks.0", "blocks.1"), delivered):
        torch.testing.assert_close(measured[name], got)
    plain = engine.project(*_error_and_points(module, engine, batch))
    assert not torch.allclose(plain[1], delivered[1])  # the norm's backward changed B_i e
    # with the norm on blocks.1 only, blocks.0 gets B_0 e as it is
    assert torch.allclose(plain[0], delivered[0]) == isinstance(norm, dict)


def _error_and_points(module, engine, batch):
    engine.capture = {}
    loss = module.task.step(module.model, batch, "train").loss
    captured = dict(engine.capture)
    engine.capture = None
    (e,) = torch.autograd.grad(loss, captured["__output__"], retain_graph=True)
    feats = [captured["blocks.0"], captured["blocks.1"]]
    engine.reset()
    return e, (0, 1), [f.shape for f in feats], [f.dtype for f in feats]


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    module, data, dfa = build("dfa")
    data.setup()
    data.splits["train"].tensors[0][40] = float("nan")  # second batch
    ckpt_dir = tmp_path / "ckpts"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 0, global step 1"):
        trainer(tmp_path, [dfa, checkpoint], max_steps=4, enable_checkpointing=True).fit(module, data)
    # only the state after the last good step (global step 1) was saved; nothing from the NaN step
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_gradient_clipping_scales_the_dfa_update_like_any_gradient(tmp_path):
    free, data, dfa = build("dfa")
    before = params(free)
    trainer(tmp_path, [dfa], max_steps=1).fit(free, data)
    grad = {n: (before[n] - p) / 0.1 for n, p in params(free).items()}  # SGD lr 0.1
    norm = torch.sqrt(sum((g ** 2).sum() for g in grad.values()))
    clipped, data, dfa = build("dfa")
    trainer(tmp_path, [dfa], max_steps=1, gradient_clip_val=0.01).fit(clipped, data)
    assert norm > 0.01
    for name, p in params(clipped).items():
        torch.testing.assert_close((before[name] - p) / 0.1, grad[name] * 0.01 / norm, atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
def test_16_mixed_runs_with_loss_scaling_and_matches_fp32(tmp_path):
    # fp16 AMP needs CUDA: on CPU Lightning silently substitutes bf16-mixed (tested above)
    ref, data, dfa = build("dfa")
    trainer(tmp_path, [dfa], max_steps=2, accelerator="gpu").fit(ref, data)
    module, data, dfa16 = build("dfa")
    trainer(tmp_path, [dfa16], max_steps=2, accelerator="gpu", precision="16-mixed").fit(module, data)
    assert dfa16.engine.matrix.dtype == torch.float32
    for name, p in params(module).items():
        torch.testing.assert_close(p, params(ref)[name], atol=2e-2, rtol=5e-2)


def test_auto_projection_is_settled_at_fit_start_with_the_optimizers_state_counted(tmp_path):
    module, data, dfa = build("dfa", optimizer=adam)
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    c = dfa.engine.calibration
    param_bytes = sum(p.numel() * p.element_size() for p in module.model.parameters())
    assert c["optimizer_state_bytes"] == 2 * param_bytes  # Adam's two moments, counted before they existed
    assert dfa.engine.mode == c["choice"]
    step = c["saved_activation_bytes"] + 2 * param_bytes + 2 * param_bytes
    fraction, kib = f"{100 * c['fused_signal_bytes'] / step:.0f}%", lambda n: f"{n / 1024:.1f} KiB"
    assert (f"= {fraction} of the step's {kib(step)}: saved activations {kib(c['saved_activation_bytes'])}, params "
            f"+ grads {kib(2 * param_bytes)}, optimizer state {kib(2 * param_bytes)};") in dfa.engine.report()


def test_different_feedback_on_two_ranks_is_refused_and_the_same_accepted():
    from types import SimpleNamespace

    from dfa_lightning.callbacks.feedback_alignment import feedback_checksum

    module, data, dfa = build("dfa")
    t = trainer(".", [dfa], max_steps=1)
    data.setup()
    t.strategy.connect(module)
    module.trainer = t
    t._data_connector.attach_data(module, datamodule=data)
    dfa.setup(t, module, "fit")
    def ranks(other):  # two ranks: this one's checksum, and the other's from its own matrix
        gather = lambda x: torch.stack([x, torch.tensor([feedback_checksum(other)], dtype=x.dtype)])
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"), all_gather=gather),
                               world_size=2, optimizers=[])

    same = dfa.engine.feedback_state()
    dfa.on_fit_start(ranks({k: v.clone() for k, v in same.items()}), module)  # equal B: accepted
    other = {k: v.clone() for k, v in same.items()}
    other["matrix"][0, 0] += 1e-6  # one entry off on the other rank
    with pytest.raises(RuntimeError, match="feedback matrices differ across ranks"):
        dfa.on_fit_start(ranks(other), module)


def test_per_point_projection_trains_exactly_like_the_fused_one(tmp_path):
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    fused, data, dfa = build("dfa", dropout=0.2)
    trainer(tmp_path, [dfa], max_steps=3).fit(fused, data)
    lazy, data, _ = build("dfa", dropout=0.2)
    per_point = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], seed=7, projection="per_point", verbose=False)
    trainer(tmp_path, [per_point], max_steps=3).fit(lazy, data)
    assert_same(params(fused), params(lazy), atol=1e-6)


def test_noam_schedule_steps_every_batch_and_peaks_at_warmup(tmp_path):
    from dfa_lightning.module import TaskModule
    from dfa_lightning.models.mlp import MLP
    from dfa_lightning.schedules import NoamLR
    from dfa_lightning.tasks.classification import Classification

    module = TaskModule(MLP(16, 4, hidden=[8]), Classification(4), optimizer=lambda p: torch.optim.Adam(p, lr=1.0),
                        lr_scheduler=lambda o: NoamLR(o, d_model=512, warmup=4), scheduler_interval="step")
    _, data, dfa = build("dfa")
    t = trainer(tmp_path, [dfa], max_steps=6)
    t.fit(module, data)
    lr = t.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(512 ** -0.5 * 6 ** -0.5)  # past the peak, stepped once per batch
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = NoamLR(optimizer, d_model=512, warmup=4)
    lrs = []
    for _ in range(8):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])  # after step s = 1..8
    assert lrs[:4] == pytest.approx([512 ** -0.5 * s * 4 ** -1.5 for s in (1, 2, 3, 4)])  # linear warm-up
    assert max(lrs) == lrs[3] == pytest.approx(512 ** -0.5 * 4 ** -0.5)  # the peak, at the warm-up's end
    assert lrs[4:] == pytest.approx([512 ** -0.5 * s ** -0.5 for s in (5, 6, 7, 8)])  # then 1/sqrt(step)


def test_generic_dfa_fragment_puts_feedback_after_every_relu(tmp_path):
    import yaml

    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    fragment = yaml.safe_load(open(__import__("pathlib").Path(__file__).parents[1] / "callbacks" / "dfa.yaml"))
    module, data, _ = build("dfa")
    dfa = FeedbackAlignmentStrategy(**fragment["init_args"], verbose=False)
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    assert [p.name for p in dfa.engine.points] == ["blocks.0.1", "blocks.1.1"]


def test_validating_before_fit_leaves_metrics_that_fit_can_update(tmp_path):
    """``trainer.validate`` then ``trainer.fit`` on one module (a common check of the untrained model): the epoch
    metrics reset under inference mode must not make the next validation's update fail."""
    module, data, strategy = build("dfa")
    tr = trainer(tmp_path, [strategy], max_epochs=1, limit_val_batches=2)
    before = tr.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    tr.fit(module, datamodule=data)
    after = tr.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert before > 0 and after > 0 and after != before


def test_a_dfa_checkpoint_is_tested_by_a_fresh_trainer_whatever_the_runs_seed(tmp_path):
    """`python -m dfa_lightning test --ckpt_path …` on a DFA run: evaluation uses no B, so the rule (``seed: null``,
    as every recipe) accepts the checkpoint outside fit, even under another run seed; resuming fit still checks."""
    import pytorch_lightning as pl

    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.errors import ConfigError

    def rule():
        return FeedbackAlignmentStrategy(method="dfa", feedback_points=["blocks.*"], verbose=False)

    module, data, _ = build("dfa", optimizer=adam)
    pl.seed_everything(3, verbose=False)
    t = trainer(tmp_path, [rule()], max_epochs=1)
    t.fit(module, data)
    ckpt = tmp_path / "dfa.ckpt"
    t.save_checkpoint(ckpt)
    expected = t.test(module, data, verbose=False)[0]
    pl.seed_everything(5, verbose=False)  # another run seed
    fresh, data, _ = build("dfa", optimizer=adam)
    tested = trainer(tmp_path, [rule()]).test(fresh, data, ckpt_path=str(ckpt), verbose=False)[0]
    assert tested == expected
    assert trainer(tmp_path, [rule()], limit_val_batches=1.0).validate(fresh, data, ckpt_path=str(ckpt), verbose=False)
    pl.seed_everything(5, verbose=False)
    with pytest.raises(ConfigError, match=r"other feedback settings: \['seed'\] \(this rule's seed, 0, comes from "
                                          r"seed_everything; the checkpoint's was 3\)"):
        trainer(tmp_path, [rule()], max_epochs=2).fit(build("dfa", optimizer=adam)[0], data, ckpt_path=str(ckpt))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_alignment_is_measured_when_nothing_trainable_lies_between_the_last_point_and_the_output(tmp_path, norm):
    """Post-LN LM with the error before the vocabulary: ``hidden_out`` reads the last block's (cut) output directly,
    so the raw output holds no graph; the monitor reads e at the output the engine injects into."""
    from torch.utils.data import DataLoader, TensorDataset

    from dfa_lightning.callbacks import FeedbackAlignmentStrategy, FinalAlignment
    from dfa_lightning.models.transformer import TransformerLM
    from dfa_lightning.module import TaskModule
    from dfa_lightning.tasks.language_modeling import LanguageModeling

    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (64, 8)), torch.randint(0, 50, (64, 8))
    module = TaskModule(TransformerLM(50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=8, norm=norm),
                        LanguageModeling())
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.*.out"], output="hidden_out", batch_dims=[0, 1],
                                    verbose=False)
    final = FinalAlignment()
    trainer(tmp_path, [dfa, final], max_steps=2).fit(module, train_dataloaders=DataLoader(TensorDataset(x, y),
                                                                                      batch_size=32))
    assert final.points == ["blocks.0.out", "blocks.1.out"]
    for point in final.points:
        assert -1.0 <= final.alignment[f"align/signal_cos/{point}"] <= 1.0
        assert -1.0 <= final.alignment[f"align/update_cos/{point}"] <= 1.0
    assert all(final.alignment[f"align/update_ratio/{p}"] > 0 for p in final.points)  # both passes produced updates


@pytest.mark.parametrize("change", [
    dict(method="bp"), dict(method="shallow"), dict(error="sign"), dict(feedback_norm="layer"), dict(name="other"),
    dict(init="gaussian"), dict(feedback_points=["blocks.*.0"]), dict(operator="lowrank", rank=2)],
    ids=["to bp", "to shallow", "error sign", "feedback norm", "renamed", "init", "other points of the same widths",
         "operator"])
def test_resuming_a_dfa_checkpoint_under_another_rule_or_its_signal_is_refused(tmp_path, change):
    """A DFA checkpoint resumed by a BP or shallow recipe trained on under the other rule, filed under its name; a
    changed error or feedback norm changed the signal mid-run; a renamed rule drew a new B, with only Lightning's
    note that a callback was missing."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.errors import ConfigError

    def rule(**kwargs):
        return FeedbackAlignmentStrategy(**{"method": "dfa", "feedback_points": ["blocks.*"], "seed": 1,
                                            "verbose": False, **kwargs})

    module, data, _ = build("dfa", optimizer=adam)
    t = trainer(tmp_path, [rule()], max_epochs=1)
    t.fit(module, data)
    ckpt = tmp_path / "dfa.ckpt"
    t.save_checkpoint(ckpt)
    expected = {"method": r"trained by dfa and this recipe trains by", "error": r"other feedback settings: \['error'\]",
                "feedback_norm": r"\['feedback_norm'\]", "name": r"this run's rule is .*'other'",
                "init": r"\['init'\]", "feedback_points": r"\['feedback_points'\]",
                "operator": r"\['operator'\]"}[next(iter(change))]
    with pytest.raises(ConfigError, match=expected):
        trainer(tmp_path, [rule(**change)], max_epochs=2).fit(build("dfa", optimizer=adam)[0], data,
                                                             ckpt_path=str(ckpt))
    trainer(tmp_path, [rule()], max_epochs=2).fit(build("dfa", optimizer=adam)[0], data, ckpt_path=str(ckpt))  # same


def test_resuming_a_shallow_checkpoint_with_other_points_is_refused(tmp_path):
    """The points decide which layers shallow trains: resumed with others, another set trained on in silence."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.errors import ConfigError

    def rule(points):
        return FeedbackAlignmentStrategy(method="shallow", feedback_points=points, verbose=False)

    module, data, _ = build("shallow", optimizer=adam)
    t = trainer(tmp_path, [rule(["blocks.*"])], max_epochs=1)
    t.fit(module, data)
    ckpt = tmp_path / "shallow.ckpt"
    t.save_checkpoint(ckpt)
    with pytest.raises(ConfigError, match=r"other feedback settings: \['feedback_points'\]"):
        trainer(tmp_path, [rule(["blocks.0"])], max_epochs=2).fit(build("shallow", optimizer=adam)[0], data,
                                                                  ckpt_path=str(ckpt))
    trainer(tmp_path, [rule(["blocks.*"])], max_epochs=2).fit(build("shallow", optimizer=adam)[0], data,
                                                              ckpt_path=str(ckpt))


def test_shallow_under_ddp_that_does_not_look_for_unused_parameters_is_refused_before_launch():
    """Both ranks stopped with DDP's unused-parameter traceback after the first step; the README alone said why."""
    import pytorch_lightning as pl

    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.errors import ConfigError

    shallow = FeedbackAlignmentStrategy(method="shallow", feedback_points=["blocks.*"], verbose=False)
    plain = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    with pytest.raises(ConfigError, match="use --trainer.strategy ddp_find_unused_parameters_true"):
        shallow.check_strategy(plain)
    shallow.check_strategy(pl.Trainer(accelerator="cpu", devices=1, strategy="ddp_find_unused_parameters_true",
                                      logger=False))
    FeedbackAlignmentStrategy(method="dfa", feedback_points=["blocks.*"], verbose=False).check_strategy(plain)


def test_batch_dims_that_do_not_fit_the_points_are_named_at_setup_before_any_step(tmp_path):
    """`batch_dims: [1]` on an MLP's [batch, classes] output was named only at the first training step, after the
    sanity check; the probe at setup sees every point's shape."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy
    from dfa_lightning.errors import ConfigError

    import pytorch_lightning as pl

    class Batches(pl.Callback):
        seen = 0

        def on_train_batch_start(self, *args) -> None:
            Batches.seen += 1

    module, data, _ = build("dfa")
    rule = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], batch_dims=[1], verbose=False)
    with pytest.raises(ConfigError, match=r"feedback point 'blocks.0' has 32 batch elements over batch_dims \[1\] but "
                                          r"the output has 4"):
        trainer(tmp_path, [rule, Batches()], max_steps=1).fit(module, data)
    assert Batches.seen == 0  # raised by the setup probe, before any training batch


def test_param_groups_options_reach_their_parameters_and_the_rest_keep_the_optimizers_defaults():
    groups = [{"params": "blocks.0.**", "weight_decay": 0.1}, {"params": "head.bias", "lr": 0.5}]
    module = TaskModule(MLP(16, 4, hidden=[8, 8]), Classification(4), optimizer=adam, param_groups=groups)
    groups = module.configure_optimizers().param_groups
    named = {id(p): n for n, p in module.model.named_parameters()}
    assert [[named[id(p)] for p in g["params"]] for g in groups] == [
        ["blocks.0.0.weight", "blocks.0.0.bias"], ["head.bias"],
        ["blocks.1.0.weight", "blocks.1.0.bias", "head.weight"]]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-2, 0.1), (0.5, 0), (1e-2, 0)]


def test_the_epoch_loss_is_the_mean_over_samples_when_the_last_batch_is_smaller(tmp_path):
    """val/loss is the per-sample mean over the split (batches weighted by their size), not the mean of batch means."""
    module, data, strategy = build("bp", batch_size=48, num_samples=128)  # val batches of 48, 48, 32 rows
    tr = trainer(tmp_path, [strategy], limit_val_batches=1.0)
    got = tr.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    x, y = data.splits["val"].tensors
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(module.model(x), y).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_the_training_loss_is_logged_as_train_loss_epoch_every_epoch_and_loss_step_is_the_written_steps_own(
        tmp_path):
    """``train/loss_step`` is logged only on the steps the loggers write: a value logged a step early would be
    written as the next step's loss."""
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module, data, strategy = build("bp", num_samples=64)
    trainer(tmp_path, [strategy, Losses()], max_epochs=3, logger=CSVLogger(tmp_path),
            log_every_n_steps=2).fit(module, data)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    assert [r["epoch"] for r in rows if r.get("train/loss_epoch")] == ["0", "1", "2"]
    written = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r.get("train/loss_step")]
    assert [step for step, _ in written] == [1, 3, 5]  # 6 steps, written every 2nd
    assert [value for _, value in written] == pytest.approx([losses[1], losses[3], losses[5]], rel=1e-6)


def test_the_alignment_monitor_writes_every_probe_whatever_the_trainers_logging_period(tmp_path):
    """Logged through ``log_dict(on_step=True)``, a probe at step 0, 4, 8 reached the loggers only where Lightning
    writes step metrics ((step + 1) % log_every_n_steps == 0): none of them here, and none with both defaults (50)."""
    module, data, strategy = build("dfa", num_samples=128)
    monitor = AlignmentMonitor(every_n_steps=4)
    trainer(tmp_path, [strategy, monitor], max_steps=10, logger=CSVLogger(tmp_path), log_every_n_steps=5
            ).fit(module, data)
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    probed = [int(r["step"]) for r in rows if r.get("align/signal_cos/blocks.0")]
    assert probed == [0, 4, 8]
    row = next(r for r in rows if r.get("align/signal_cos/blocks.0") and r["step"] == "8")
    assert float(row["align/update_cos/blocks.1"]) == pytest.approx(monitor.last["align/update_cos/blocks.1"])


def test_alignment_is_measured_on_a_model_with_a_frozen_parameter():
    """``torch.autograd.grad`` over every parameter refused the frozen one: FinalAlignment (every placements and
    failure_map run) died at the end of a fit that had trained fine."""
    from dfa_lightning.callbacks.final_alignment import FinalAlignment

    module, data, strategy = build("dfa")
    module.model.blocks[0][0].bias.requires_grad_(False)
    final = FinalAlignment()
    trainer(".", [strategy, final], max_steps=2).fit(module, data)
    assert set(final.alignment) >= {"align/signal_cos/blocks.0", "align/update_cos/blocks.0"}


def test_signal_cos_is_the_mean_over_samples_keeping_a_sample_where_only_one_signal_is_zero():
    """A sample where DFA sends nothing but BP has a gradient counts as cos 0 (a failure to align); only samples where
    both are zero are left out."""
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    cos = AlignmentMonitor()._sample_cos(a, b, SimpleNamespace(batch_dims=[0]))
    assert cos == pytest.approx(1 / 3)  # (1 + 0 + 0) / 3, the all-zero sample left out


def test_alignment_probes_use_the_same_dropout_masks_in_the_dfa_and_bp_pass(tmp_path):
    """With B = W_headᵀ the DFA signal at the point below the head is the BP gradient, whatever dropout drew, but only
    if both passes drew the same masks (else e differs between them)."""
    module = TaskModule(MLP(16, 4, hidden=[32, 32], dropout=0.5), Classification(4), optimizer=sgd)
    data = SyntheticClassificationDataModule(num_samples=64, in_features=16, num_classes=4, batch_size=32)
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.1"], scale="none", verbose=False)
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    dfa.engine.set_matrix(module.model.head.weight.detach().clone())
    module.train()
    out = AlignmentMonitor().measure(module, dfa, next(iter(data.train_dataloader())))
    assert out["align/signal_cos/blocks.1"] == pytest.approx(1.0, abs=1e-5)
    assert out["align/update_ratio/blocks.1"] == pytest.approx(1.0, abs=1e-4)


def test_reduce_lr_on_plateau_monitors_the_tasks_metric_and_other_schedulers_step_at_the_set_interval():
    task = Classification(4)
    plateau = TaskModule(MLP(16, 4, hidden=[8]), task, optimizer=adam,
                         lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max"))
    config = plateau.configure_optimizers()["lr_scheduler"]
    assert config["monitor"] == task.monitor and config["interval"] == "epoch"
    step = TaskModule(MLP(16, 4, hidden=[8]), task, optimizer=adam, scheduler_interval="step",
                      lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1))
    config = step.configure_optimizers()["lr_scheduler"]
    assert config["interval"] == "step" and "monitor" not in config


def test_reduce_lr_on_plateau_stepped_per_batch_steps_once_per_validation(tmp_path):
    """``scheduler_interval: step`` lets a run that ends inside its first epoch (the CPU LM sample: 1,000 steps,
    0.4 epoch) cut its rate on a plateau; every validation after the first is a plateau (threshold 10), patience 0."""
    module, data, dfa = build("dfa", optimizer=adam)
    module.scheduler_interval = "step"
    module.lr_scheduler = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=0,
                                                                                threshold=10.0)
    t = trainer(tmp_path, [dfa], max_steps=4, val_check_interval=2, limit_val_batches=1)
    t.fit(module, data)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)  # two validations: a best, a cut
    module.scheduler_interval = "step"
    with pytest.raises(ConfigError, match="val_check_interval as a number of batches"):
        trainer(tmp_path, [dfa], max_steps=4, val_check_interval=0.5, limit_val_batches=1).fit(module, data)


def test_a_plateau_scheduler_stepped_per_batch_needs_validations_on_optimizer_steps(tmp_path):
    """Lightning steps schedulers only on batches that step the optimizer: with 2 batches accumulated, a validation
    every 3 batches stepped the plateau scheduler after every other validation."""
    module, data, dfa = build("dfa", optimizer=adam)
    module.scheduler_interval = "step"
    module.lr_scheduler = lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max")
    with pytest.raises(ConfigError, match="val_check_interval 3 is not a multiple of trainer.accumulate_grad_batches 2"):
        trainer(tmp_path, [dfa], max_steps=4, val_check_interval=3, accumulate_grad_batches=2).fit(module, data)


def test_a_plateau_scheduler_against_the_tasks_metric_is_refused():
    """``mode: min`` (torch's default) on val/acc cut the rate each time the accuracy rose."""
    module = TaskModule(MLP(16, 4, hidden=[8]), Classification(4), optimizer=adam,
                        lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))
    with pytest.raises(ConfigError, match=r"ReduceLROnPlateau's mode is 'min', but it steps on val/acc, which is "
                                          r"higher-is-better.*set mode: max") as refused:
        module.configure_optimizers()
    assert refused.value.key == "model.lr_scheduler"


def _resumable(tmp_path, name, scheduler=None, optimizer=adam, epochs=4, ckpt=None):
    """A BP fit with a checkpoint at every epoch's end (e<epoch>.ckpt under tmp_path/name)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    module, data, _ = build("bp", optimizer=optimizer)
    module.lr_scheduler = scheduler
    saver = ModelCheckpoint(dirpath=tmp_path / name, filename="e{epoch}", save_top_k=-1, auto_insert_metric_name=False)
    t = trainer(tmp_path, [saver], max_epochs=epochs, limit_val_batches=1.0, enable_checkpointing=True)
    t.fit(module, data, ckpt_path=ckpt)
    return module, t


def test_a_resumed_fit_takes_the_plateau_step_its_checkpoint_was_written_before(tmp_path):
    """ReduceLROnPlateau steps at an epoch's end after that epoch's checkpoints, and Lightning keeps no metric in
    them: a fit resumed from one lost that step, so its rates (and weights) left the straight run's."""
    def plateau(o):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=0, threshold=10.0)

    straight, t = _resumable(tmp_path, "straight", plateau)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)  # a cut at each end but the first
    resumed, t = _resumable(tmp_path, "resumed", plateau, ckpt=str(tmp_path / "straight" / "e1.ckpt"))
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    assert_same(params(resumed), params(straight))


@pytest.mark.parametrize("change, said", [
    (dict(optimizer=sgd), "the checkpoint's optimizer has settings amsgrad, betas, decoupled_weight_decay, eps that "
                          "SGD has not"),
    (dict(optimizer=lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.999))),
     r"betas \(0.9, 0.999\) in the checkpoint, \(0.8, 0.999\) in the recipe"),
    (dict(scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9)),
     "gamma 0.5 in the checkpoint, 0.9 in the recipe"),
], ids=["another optimizer", "other betas", "other scheduler gamma"])
def test_resuming_under_another_optimizer_or_scheduler_setting_is_refused(tmp_path, change, said):
    """Another optimizer class took the checkpoint's groups and died at its first step (SGD: KeyError 'momentum');
    other betas, or a StepLR's gamma, were silently replaced by the checkpoint's."""
    def step(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    _resumable(tmp_path, "first", step, epochs=2)
    with pytest.raises(ConfigError, match=f"fit --ckpt_path .*: {said}"):
        _resumable(tmp_path, "again", change.get("scheduler", step), change.get("optimizer", adam),
                   ckpt=str(tmp_path / "first" / "e1.ckpt"))


@pytest.mark.parametrize("scheduler, optimizer", [
    (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=100), adam),
    (lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
], ids=["one cycle, adam", "cyclic, sgd momentum"])
def test_a_scheduler_that_keeps_settings_in_the_optimizers_groups_resumes(tmp_path, scheduler, optimizer):
    """OneCycleLR and CyclicLR add their own entries to the groups and cycle the momentum: every resume was refused
    as "trained with another optimizer"."""
    _resumable(tmp_path, "first", scheduler, optimizer, epochs=2)
    _resumable(tmp_path, "again", scheduler, optimizer, epochs=3, ckpt=str(tmp_path / "first" / "e1.ckpt"))


def test_a_fit_that_raised_takes_the_rules_hooks_off_the_model(tmp_path):
    """Lightning calls no ``teardown`` on an exception: after a NaN loss the model kept training by DFA in any later
    fit, and a retry under another rule name was refused as "two rules on one point"."""
    from helpers import NaNAfterOneStepDataModule
    from dfa_lightning.callbacks.feedback_alignment import attached_engines

    module, _, dfa = build("dfa")
    data = NaNAfterOneStepDataModule(num_samples=128, in_features=16, num_classes=4, batch_size=32)
    with pytest.raises(NonFiniteLossError):
        trainer(tmp_path, [dfa], max_steps=3).fit(module, data)
    assert attached_engines(module.model) == []


def test_a_refusal_by_the_model_during_the_probe_is_not_blamed_on_the_rule(tmp_path):
    """The rule's setup runs the model (the probe's forward): the model's, the data's or the task's own refusal was
    prefixed with the rule's name and keyed to ``trainer.callbacks``, so the CLI pointed at the callbacks."""
    class Refusing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.head = torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)

        def forward(self, x):
            raise ConfigError("Refusing: expected images, got rows")

    _, data, _ = build("dfa")
    rule = FeedbackAlignmentStrategy(feedback_points=["act"], verbose=False)
    with pytest.raises(ConfigError, match=r"^Refusing: expected images, got rows$") as refused:
        trainer(tmp_path, [rule], max_steps=1).fit(TaskModule(Refusing(), Classification(4), optimizer=sgd), data)
    assert refused.value.key is None


def test_validating_a_checkpoint_with_a_nan_loss_reports_it_rather_than_stopping_a_training(tmp_path):
    """``validate`` said "training stopped before these weights were checkpointed" of a run it did not train."""
    module, data, _ = build("bp", optimizer=adam)
    with torch.no_grad():
        module.model.head.bias.fill_(float("nan"))
    result = trainer(tmp_path, [], limit_val_batches=1.0).validate(module, data, verbose=False)[0]
    assert math.isnan(result["val/loss"])


def test_a_param_groups_entry_without_a_params_glob_is_refused():
    for spec in ({"weight_decay": 0.1}, {"params": ["head.weight"], "lr": 0.1}):
        module = TaskModule(MLP(16, 4, hidden=[8]), Classification(4), optimizer=adam, param_groups=[spec])
        with pytest.raises(ConfigError, match="needs `params:` as a glob on parameter names"):
            module.configure_optimizers()


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_update_ratio_is_the_feedback_scale_and_a_negated_feedback_has_cos_minus_one(tmp_path, scale):
    """B = s · W_headᵀ: the DFA signal and update are s times BP's: ratio |s|, cosines sign(s)."""
    module = TaskModule(MLP(16, 4, hidden=[32]), Classification(4), optimizer=sgd)
    data = SyntheticClassificationDataModule(num_samples=64, in_features=16, num_classes=4, batch_size=32)
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.0"], scale="none", verbose=False)
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    dfa.engine.set_matrix(scale * module.model.head.weight.detach().clone())
    out = AlignmentMonitor().measure(module, dfa, next(iter(data.train_dataloader())))
    sign = 1.0 if scale > 0 else -1.0
    assert out["align/signal_cos/blocks.0"] == pytest.approx(sign, abs=1e-5)
    assert out["align/update_cos/blocks.0"] == pytest.approx(sign, abs=1e-5)
    assert out["align/update_ratio/blocks.0"] == pytest.approx(abs(scale), rel=1e-4)


def test_the_probe_leaves_batchnorm_statistics_as_it_found_them(tmp_path):
    module, data, dfa = build("dfa")
    module.model.blocks[0].insert(1, torch.nn.BatchNorm1d(32))
    trainer(tmp_path, [dfa], max_steps=1).fit(module, data)
    module.train()
    before = {k: v.clone() for k, v in module.model.named_buffers()}
    AlignmentMonitor().measure(module, dfa, next(iter(data.train_dataloader())))
    assert_same(before, dict(module.model.named_buffers()))


def test_the_monitor_probes_at_steps_0_n_2n(tmp_path):
    module, data, dfa = build("dfa")
    monitor = AlignmentMonitor(every_n_steps=2)
    t = trainer(tmp_path, [dfa, monitor], max_steps=4)
    steps, measure = [], monitor.measure
    monitor.measure = lambda *args: steps.append(t.global_step) or measure(*args)
    t.fit(module, data)
    assert steps == [0, 2]


def test_the_readmes_python_example_trains_by_dfa_and_reports_alignment(tmp_path, monkeypatch):
    """The README's "From Python" block, run as written (in a scratch folder: its Trainer logs to the CWD)."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("**From Python.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md (From Python)", "exec"), scope)
    acc = scope["trainer"].callback_metrics["test/acc"]
    assert acc > 0.8
    last = scope["monitor"].last
    assert set(last) == {f"align/{kind}/{p}" for kind in ("signal_cos", "update_cos", "update_ratio") for p in "13"}
    assert last["align/signal_cos/3"] > 0.5


def test_the_setup_probe_leaves_the_mode_the_statistics_and_the_random_state_as_it_found_them(tmp_path):
    """The probe at setup runs one forward (eval mode) on the first batch of a shuffled loader, through a step that
    draws random numbers (as NeRF's jittered samples): training must start in train mode with the BatchNorm
    statistics, the global RNG (the data order, dropout) and the engine's capture as they were."""
    module, _, dfa = build("dfa", dropout=0.3)
    module.model.blocks[0].insert(1, torch.nn.BatchNorm1d(32))
    step = module.task.step
    module.task.step = lambda *args: (torch.rand(1), step(*args))[1]
    data = SyntheticClassificationDataModule(num_samples=64, in_features=16, num_classes=4, batch_size=32,
                                             shuffle=True)
    seen = {}

    class Look(pl.Callback):
        def __init__(self, when):
            self.when = when

        def setup(self, trainer, pl_module, stage):
            seen[self.when] = torch.get_rng_state(), {k: v.clone() for k, v in pl_module.model.named_buffers()}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["step"] = pl_module.model.training, dfa.engine.capture

    trainer(tmp_path, [Look("before"), dfa, Look("after")], max_steps=1).fit(module, data)
    (rng, buffers), (rng_after, buffers_after) = seen["before"], seen["after"]
    assert torch.equal(rng, rng_after)
    assert_same(buffers, buffers_after)
    assert seen["step"] == (True, None)


def test_a_named_rules_checkpoint_is_scored_by_any_rule_but_resumed_only_under_its_name(tmp_path):
    """Resumed by an unnamed rule, the named rule's B was left behind and a fresh one drawn with only Lightning's
    note that a callback is missing; `test --ckpt_path` uses no B, so any rule (BP too) scores the checkpoint."""
    def rule(**kwargs):
        return FeedbackAlignmentStrategy(**{"feedback_points": ["blocks.*"], "seed": 1, "verbose": False, **kwargs})

    module, data, _ = build("dfa")
    t = trainer(tmp_path, [rule(name="net")], max_steps=1)
    t.fit(module, data)
    ckpt = tmp_path / "named.ckpt"
    t.save_checkpoint(ckpt)
    for other in (rule(), rule(method="bp", name="net")):
        assert trainer(tmp_path, [other]).test(build("dfa")[0], data, ckpt_path=str(ckpt), verbose=False)
    with pytest.raises(ConfigError, match=r"holds the feedback state of .*'net'.*this run's rule is "
                                          r"'FeedbackAlignmentStrategy'"):
        trainer(tmp_path, [rule()], max_steps=2).fit(build("dfa")[0], data, ckpt_path=str(ckpt))


def test_a_rule_that_scored_a_checkpoint_before_its_first_fit_trains_on_with_the_checkpoints_matrix(tmp_path):
    """`test(ckpt_path=...)` loads the weights into the module and B into the rule: a fit that follows (a notebook)
    goes on with that B, not a fresh draw the weights were never trained with."""
    module, data, dfa = build("dfa")
    t = trainer(tmp_path, [dfa], max_steps=1)
    t.fit(module, data)
    ckpt = doubled_matrix_checkpoint(t, tmp_path / "k.ckpt")
    fresh, _, rule = build("dfa")
    trainer(tmp_path, [rule]).test(fresh, data, ckpt_path=str(ckpt), verbose=False)
    trainer(tmp_path, [rule], max_steps=1).fit(fresh, data)
    torch.testing.assert_close(rule.engine.matrix, dfa.engine.matrix * 2)


def test_the_feedback_checksum_covers_every_tensor_of_the_operator_in_any_key_order():
    """The ranks compare these: a low-rank B that differs only in its first factor must not pass as the same one."""
    from dfa_lightning.callbacks.feedback_alignment import feedback_checksum

    g = torch.Generator().manual_seed(0)
    state = {"u": torch.randn(4, 2, generator=g), "v": torch.randn(2, 8, generator=g)}
    other = {k: v.clone() for k, v in state.items()}
    other["u"][0, 0] += 1e-6
    assert feedback_checksum(state) != feedback_checksum(other)
    assert feedback_checksum(state) == feedback_checksum({"v": state["v"], "u": state["u"]})


def test_the_monitor_probes_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    module, data, dfa = build("dfa", batch_size=16)
    monitor = AlignmentMonitor(every_n_steps=1)
    t = trainer(tmp_path, [dfa, monitor], max_steps=2, accumulate_grad_batches=2)
    steps, measure = [], monitor.measure
    monitor.measure = lambda *args: steps.append(t.global_step) or measure(*args)
    t.fit(module, data)
    assert steps == [0, 1]


def test_the_monitor_measures_the_updates_on_a_run_without_a_probe_batch_and_final_alignment_skips_it(tmp_path):
    """With several training loaders the setup probe has no batch and the segments are unknown until the monitor's
    own pass learns them: the update metrics were otherwise missing without a word. The end-of-training measure has
    no single batch either (it took the first loader for one)."""
    from torch.utils.data import DataLoader, TensorDataset

    from dfa_lightning.callbacks import FinalAlignment

    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    loaders = [DataLoader(TensorDataset(x, y), batch_size=16) for _ in range(2)]
    module = TaskModule(MLP(16, 4, hidden=[32, 32]), FirstOfSeveralLoaders(4), optimizer=sgd)
    monitor = AlignmentMonitor(every_n_steps=1)
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], verbose=False)
    final = FinalAlignment()
    trainer(tmp_path, [dfa, monitor, final], max_steps=1).fit(module, train_dataloaders=loaders)
    assert {f"align/{m}/blocks.{i}" for m in ("update_cos", "update_ratio") for i in (0, 1)} <= set(monitor.last)
    assert final.alignment == {} and final.points == [] and final.deepest is None


def test_a_rule_that_only_scored_a_checkpoint_saves_that_checkpoints_matrix_again(tmp_path):
    """`test(ckpt_path=...)` then `save_checkpoint` (a notebook) with no fit in between: the rule has no engine,
    and the B it loaded must still go into the new file, or a later resume would draw a fresh one."""
    module, data, dfa = build("dfa")
    t = trainer(tmp_path, [dfa], max_steps=1)
    t.fit(module, data)
    ckpt = tmp_path / "k.ckpt"
    t.save_checkpoint(ckpt)
    fresh, _, rule = build("dfa")
    t2 = trainer(tmp_path, [rule])
    t2.test(fresh, data, ckpt_path=str(ckpt), verbose=False)
    assert rule.engine is None
    t2.save_checkpoint(tmp_path / "again.ckpt")
    again = torch.load(tmp_path / "again.ckpt", weights_only=False)["callbacks"]["FeedbackAlignmentStrategy"]
    torch.testing.assert_close(again["feedback"]["matrix"], dfa.engine.matrix)
