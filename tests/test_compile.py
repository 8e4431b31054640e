"""``torch.compile``: the feedback hooks and the engine's Functions trace without a graph break, and a compiled step
computes what the eager one does. ``aot_eager`` traces forward and backward as Inductor would see them but runs them
without code generation, so these tests need no C compiler; the Inductor test is `slow` and needs one."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dfa_lightning.compile import compile_model
from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback.engine import FeedbackEngine
from dfa_lightning.models.mlp import MLP
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.classification import Classification
from helpers import build, params, trainer

SETTINGS = {
    "fused": dict(projection="fused"),
    "per_point": dict(projection="per_point"),
    "fused lowrank shared sign": dict(projection="fused", operator="lowrank", rank=2, shared_slices=True,
                                      error="sign"),
    "per_point lowrank": dict(projection="per_point", operator="lowrank", rank=2),
    "per_point shared ternary": dict(projection="per_point", shared_slices=True, scale="max_width", error="ternary"),
    "shallow": dict(method="shallow"),
    "fused tokens": dict(projection="fused", batch_dims=[0, 1]),  # [batch, token, features], as the LM
    "per_point tokens lowrank": dict(projection="per_point", batch_dims=[0, 1], operator="lowrank", rank=2),
    # matmul receivers are for eager steps: compiled, the same engine feeds tokens (one graph, the same gradients)
    "per_point matmul receivers": dict(projection="per_point", receiver="matmul"),
    "per_point tokens lowrank shared matmul receivers": dict(projection="per_point", batch_dims=[0, 1],
                                                             operator="lowrank", rank=2, shared_slices=True,
                                                             receiver="matmul"),
    "fused centred, feedback norm": dict(projection="fused", error="centered", feedback_norm="layer"),
    "per_point tokens, feedback norm": dict(projection="per_point", batch_dims=[0, 1], feedback_norm="layer"),
    "fused, orthogonal feedback norm": dict(projection="fused", batch_dims=[0, 1], feedback_norm="orthogonal"),
    "per_point tokens, feedback norm per point": dict(projection="per_point", batch_dims=[0, 1],
                                                      feedback_norm={"blocks.1": "orthogonal", "blocks.2": "layer"}),
}


class GraphCounter:
    """A ``torch.compile`` backend that records each graph Dynamo hands over, then runs it as ``aot_eager``."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm: torch.fx.GraphModule, inputs):
        self.graphs.append(gm)
        return self.aot_eager(gm, inputs)


def _engine_and_model(setting: dict):
    """An MLP with its engine after one eager forward, as the callback's setup leaves them (widths known, B drawn:
    drawing B from its seeded generator is not something to trace)."""
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=[8, 8, 6])
    engine = FeedbackEngine(model, ["blocks.*"], **{"seed": 5, **setting})
    model(torch.zeros(*[2] * len(setting.get("batch_dims", [0])), 5))
    engine.reset()
    return engine, model


def _grads_after_two_steps(model, run, x, y) -> dict[str, torch.Tensor]:
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(run(x).reshape(-1, 3), y.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_compiled_step_has_no_graph_break_and_the_eager_gradients(name):
    rows = (4, 4) if SETTINGS[name].get("batch_dims") == [0, 1] else (16,)
    x, y = torch.randn(*rows, 5), torch.randint(0, 3, rows)
    _, model = _engine_and_model(SETTINGS[name])
    eager = _grads_after_two_steps(model, model, x, y)
    _, model = _engine_and_model(SETTINGS[name])
    torch._dynamo.reset()
    counters.clear()
    backend = GraphCounter()
    compiled = _grads_after_two_steps(model, compile_model(model, backend=backend), x, y)
    assert dict(counters["graph_break"]) == {}
    assert len(backend.graphs) == 1  # the forward with every hook, the output's own included (see compile_model)
    assert compiled.keys() == eager.keys()
    for n, g in eager.items():
        torch.testing.assert_close(compiled[n], g, atol=1e-6, rtol=1e-5, msg=n)


def _matmuls_in_one_step(run, model, x, y) -> int:
    with torch.profiler.profile() as prof:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("method, matmuls", [("bp", 11), ("dfa", 9), ("shallow", 5)])
def test_compiled_dfa_step_still_skips_the_input_gradients_it_would_discard(method, matmuls):
    """4 linear layers: forward 4 and weight gradients 4; BP adds 3 input gradients (the first layer's input needs
    none), fused DFA one projection instead, shallow only the top layer's weight gradient."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    _, model = _engine_and_model(dict(method=method, projection="fused"))
    _grads_after_two_steps(model, model, x, y)
    assert _matmuls_in_one_step(model, model, x, y) == matmuls  # eager, for reference
    torch._dynamo.reset()
    run = compile_model(model, backend="aot_eager")
    _grads_after_two_steps(model, run, x, y)
    assert _matmuls_in_one_step(run, model, x, y) == matmuls


def test_models_of_one_class_compiled_in_one_process_keep_their_own_learning_rule():
    """BP, shallow and DFA copies of one MLP class, compiled one after the other without a Dynamo reset (a sweep, a
    benchmark): each compiled step gives its own eager gradients. With Dynamo's default (no guard on module hooks)
    the second and third reuse the BP graph and silently train by backprop."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    torch._dynamo.reset()
    for method in ("bp", "shallow", "dfa", "dfa"):  # the second DFA copy: another engine, another B
        engine, model = _engine_and_model(dict(method=method, seed=len(method)))
        compiled = _grads_after_two_steps(model, compile_model(model, backend="aot_eager"), x, y)
        eager = _grads_after_two_steps(model, model, x, y)
        assert compiled.keys() == eager.keys(), method  # shallow: no gradient below the last point
        for n, g in eager.items():
            torch.testing.assert_close(compiled[n], g, atol=1e-6, rtol=1e-5, msg=f"{method}: {n}")


def test_every_model_compiled_in_one_process_gets_its_own_graph_past_dynamos_recompile_limit():
    """Twelve DFA models (a sweep's worth), each compiled once: twelve graphs. Sharing one code object, Dynamo would
    stop at its recompile limit (8) and run the rest eagerly without a word."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    torch._dynamo.reset()
    backend = GraphCounter()
    for seed in range(12):
        _, model = _engine_and_model(dict(seed=seed))
        _grads_after_two_steps(model, compile_model(model, backend=backend), x, y)
    assert len(backend.graphs) == 12


def test_a_new_feedback_matrix_reaches_the_compiled_step():
    """Loading B from a checkpoint after the step was compiled must not leave the compiled step on the old B."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    engine, model = _engine_and_model(dict(projection="per_point"))
    torch._dynamo.reset()
    run = compile_model(model, backend="aot_eager")
    _grads_after_two_steps(model, run, x, y)
    engine.set_matrix(2 * engine.matrix)
    compiled = _grads_after_two_steps(model, run, x, y)
    eager = _grads_after_two_steps(model, model, x, y)
    for n, g in eager.items():
        torch.testing.assert_close(compiled[n], g, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("method, projection", [("bp", "auto"), ("dfa", "fused"), ("dfa", "per_point"),
                                                ("shallow", "auto")])
def test_compiled_training_follows_the_eager_trajectory(tmp_path, method, projection):
    """Through Lightning: training with validation (eval mode, no grad: a second graph) and a checkpoint whose keys
    are the eager ones (the compiled wrapper is not a submodule)."""
    results = {}
    for compile_ in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        module, data, strategy = build(method)
        module.compile_options = None if not compile_ else compile_
        strategy.config["projection"] = projection
        trainer(tmp_path, [strategy], max_steps=6, limit_val_batches=2, val_check_interval=3).fit(module, data)
        results[bool(compile_)] = (params(module), set(module.state_dict()))
        if compile_:
            assert module.runner is not module.model
    (eager, eager_keys), (compiled, compiled_keys) = results[False], results[True]
    assert compiled_keys == eager_keys
    for n, p in eager.items():
        torch.testing.assert_close(compiled[n], p, atol=1e-6, rtol=1e-5, msg=n)


def test_compile_setting_takes_true_false_or_options():
    model, task = MLP(5, 3, hidden=[8]), Classification(3)
    assert TaskModule(model, task).runner is model
    assert TaskModule(model, task, compile=True).compile_options == {}
    assert TaskModule(model, task, compile={"mode": "reduce-overhead"}).compile_options == {"mode": "reduce-overhead"}
    with pytest.raises(ConfigError, match="compile must be true, false or torch.compile's options"):
        TaskModule(model, task, compile="yes")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor needs a C compiler")
@pytest.mark.parametrize("projection", ["fused", "per_point"])
def test_inductor_compiled_dfa_step_matches_eager(projection):
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    _, model = _engine_and_model(dict(projection=projection))
    eager = _grads_after_two_steps(model, model, x, y)
    _, model = _engine_and_model(dict(projection=projection))
    torch._dynamo.reset()
    compiled = _grads_after_two_steps(model, compile_model(model), x, y)
    for n, g in eager.items():
        torch.testing.assert_close(compiled[n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("projection", ["fused", "per_point"])
def test_reduce_overhead_compiled_dfa_steps_on_cuda_match_eager(projection):
    """Inductor with CUDA graphs (``mode="reduce-overhead"``, what a GPU recipe would use): three DFA steps, bf16
    autocast, replayed from the graph after the first, give the eager gradients."""
    device = torch.device("cuda")
    x, y = torch.randn(64, 5, device=device), torch.randint(0, 3, (64,), device=device)

    def grads(run, model):
        out = {}
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = run(x)
            F.cross_entropy(logits.float(), y).backward()
            out = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out

    _, model = _engine_and_model(dict(projection=projection))
    eager = grads(model.to(device), model)
    engine, model = _engine_and_model(dict(projection=projection))
    model.to(device)
    engine.warm(device)
    torch._dynamo.reset()
    compiled = grads(compile_model(model, mode="reduce-overhead"), model)
    for n, g in eager.items():
        torch.testing.assert_close(compiled[n], g, atol=1e-2, rtol=5e-2, msg=n)


def test_alignment_monitor_beside_a_compiled_model_leaves_the_trajectory_unchanged(tmp_path):
    """The monitor runs the model eagerly with the feedback switched off and back on; the compiled steps around it
    must neither see that state nor be recompiled into something else (no dropout: compiled RNG differs)."""
    from dfa_lightning.callbacks import AlignmentMonitor

    torch._dynamo.reset()
    plain, data, dfa = build("dfa")
    trainer(tmp_path, [dfa], max_steps=5).fit(plain, data)
    watched, data, dfa2 = build("dfa")
    watched.compile_options = {"backend": "aot_eager"}
    monitor = AlignmentMonitor(every_n_steps=1)
    trainer(tmp_path, [dfa2, monitor], max_steps=5).fit(watched, data)
    assert watched.runner is not watched.model and monitor.last
    after_plain, after_watched = params(plain), params(watched)
    for n, p in after_plain.items():
        torch.testing.assert_close(after_watched[n], p, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("projection", ["fused", "per_point"])
def test_compiled_training_under_bf16_mixed_stays_with_the_eager_run(tmp_path, projection):
    """The GPU recipes train in bf16-mixed: autocast around the compiled model, B in fp32. Casts may round
    differently once traced, so close, not equal; SGD keeps those roundings small (Adam would turn a near-zero
    gradient's flipped sign into a full learning-rate step)."""
    results = {}
    for compile_ in (False, {"backend": "aot_eager"}):
        torch._dynamo.reset()
        module, data, strategy = build("dfa")
        module.compile_options = compile_ or None
        strategy.config["projection"] = projection
        trainer(tmp_path, [strategy], max_steps=4, precision="bf16-mixed").fit(module, data)
        assert strategy.engine.matrix.dtype == torch.float32 and strategy.engine.mode == projection
        results[bool(compile_)] = params(module)
    for n, p in results[False].items():
        torch.testing.assert_close(results[True][n], p, atol=2e-4, rtol=1e-3, msg=n)


def test_a_rule_attached_after_compiling_is_not_skipped_by_reusing_the_hook_free_graph():
    """The compiled function is guarded on the module hooks: hooks added to a model already compiled (traced as
    backprop) give a new graph, not the old one that would silently keep training by backprop."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=[8, 8, 6])
    run = compile_model(model, backend="aot_eager")
    _grads_after_two_steps(model, run, x, y)  # traced without hooks
    engine = FeedbackEngine(model, ["blocks.*"], seed=5)
    model(torch.zeros(2, 5))
    engine.reset()
    compiled = _grads_after_two_steps(model, run, x, y)
    eager = _grads_after_two_steps(model, model, x, y)
    for n, g in eager.items():
        torch.testing.assert_close(compiled[n], g, atol=1e-6, rtol=1e-5, msg=n)
