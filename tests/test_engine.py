"""The DFA engine in pure PyTorch: exact gradients, the cut, and the matrices."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback import operators
from dfa_lightning.feedback.engine import FeedbackEngine, optimizer_state_bytes
from dfa_lightning.feedback.points import glob_match
from dfa_lightning.models.mlp import MLP




@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# fused, and per point with each receiver (see FeedbackEngine's `receiver`)
PROJECTIONS = {"fused": dict(projection="fused"), "per_point-token": dict(projection="per_point", receiver="token"),
               "per_point-matmul": dict(projection="per_point", receiver="matmul")}


def draw(engine: FeedbackEngine, *inputs: torch.Tensor) -> None:
    """Learn the widths from one forward without grad and draw B, so that the next forward can go per point (a
    first forward runs fused: per point needs B's width)."""
    with torch.no_grad():
        engine.model(*inputs)
    engine.ensure_matrix()


def ran(out: torch.Tensor, projection: str) -> torch.Tensor:
    """``out`` after checking that its forward fed the output the way ``projection`` (a PROJECTIONS key) says."""
    assert out.grad_fn.kind == {"fused": "fused", "per_point-token": "token", "per_point-matmul": "matmul"}[projection]
    return out


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dfa_equals_bp_when_feedback_matrix_is_the_transposed_top_weight():
    torch.manual_seed(0)
    model = MLP(6, 4, hidden=[10], activation="tanh")
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    F.cross_entropy(model(x), y).backward()
    bp = grads(model)
    model.zero_grad()
    engine = FeedbackEngine(model, ["blocks.0"], scale="none")
    model(x)  # learn widths
    engine.reset()
    engine.set_matrix(model.head.weight.detach().clone())  # e @ M = e @ W_2 = (W_2^T e)^T
    F.cross_entropy(model(x), y).backward()
    dfa = grads(model)
    assert bp.keys() == dfa.keys()
    for name in bp:
        torch.testing.assert_close(dfa[name], bp[name], atol=1e-6, rtol=0)


def test_each_layer_gets_hand_computed_dfa_update_with_random_feedback():
    torch.manual_seed(1)
    model = MLP(5, 3, hidden=[8, 6], activation="tanh")
    engine = FeedbackEngine(model, ["blocks.*"], init="gaussian", scale="per_layer", seed=3)
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 3)) / 9  # dL/dlogits
    M = engine.matrix.to(torch.float64)
    (s0, t0), (s1, t1) = engine._layout.slices
    W1, b1 = model.blocks[0][0].weight, model.blocks[0][0].bias
    W2, b2 = model.blocks[1][0].weight, model.blocks[1][0].bias
    a1 = x @ W1.T + b1
    h1 = torch.tanh(a1)
    a2 = h1 @ W2.T + b2
    delta1 = (e @ M[:, s0:t0]) * (1 - torch.tanh(a1) ** 2)  # B_1 e ⊙ f'(a_1)
    delta2 = (e @ M[:, s1:t1]) * (1 - torch.tanh(a2) ** 2)
    torch.testing.assert_close(W1.grad, delta1.T @ x, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(W2.grad, delta2.T @ h1.detach(), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(b2.grad, delta2.sum(0), atol=1e-10, rtol=1e-8)
    # the top layer still trains by backprop from e
    torch.testing.assert_close(model.head.weight.grad, e.T @ torch.tanh(a2).detach(), atol=1e-10, rtol=1e-8)


class SmallCNN(nn.Module):
    """Two conv blocks (points with 4-D outputs [N, C, H, W]) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()),
                                    nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh()))
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).flatten(1))


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_a_conv_point_gets_b_e_over_its_channels_and_pixels_and_no_gradient_from_above(projection):
    """Any model: a conv block's point is C·H·W wide; each sample's B_i e is shaped as its feature map."""
    torch.manual_seed(4)
    model = SmallCNN()
    engine = FeedbackEngine(model, ["blocks.*"], init="gaussian", seed=2, **PROJECTIONS[projection])
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 5, (6,))
    draw(engine, x)
    assert [p.width for p in engine.points] == [3 * 5 * 5, 4 * 3 * 3]
    engine.reset()
    logits = ran(model(x), projection)
    F.cross_entropy(logits, y).backward()
    e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 5)) / 6
    M = engine.matrix.to(torch.float64)
    (s0, t0), (s1, t1) = engine._layout.slices
    conv1, conv2 = model.blocks[0][0], model.blocks[1][0]
    h1 = torch.tanh(conv1(x)).detach()
    for conv, inp, (s, t) in ((conv1, x, (s0, t0)), (conv2, h1, (s1, t1))):
        out = torch.tanh(conv(inp))
        expected = torch.autograd.grad(out, [conv.weight, conv.bias], (e @ M[:, s:t]).view_as(out))
        torch.testing.assert_close(conv.weight.grad, expected[0], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(conv.bias.grad, expected[1], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_points_before_the_activation_send_b_e_to_the_pre_activation_without_f_prime(projection):
    """The f' switch is placement: with the points on each block's Linear (``blocks.*.0``), the update is
    (B_i e) h_{i-1}ᵀ with no activation derivative, and the activation above a point is never differentiated."""
    torch.manual_seed(4)
    model = MLP(5, 3, hidden=[8, 6], activation="tanh")
    engine = FeedbackEngine(model, ["blocks.*.0"], init="gaussian", seed=3, **PROJECTIONS[projection])
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    draw(engine, x)
    logits = ran(model(x), projection)
    F.cross_entropy(logits, y).backward()
    e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 3)) / 9
    M = engine.matrix.to(torch.float64)
    (s0, t0), (s1, t1) = engine._layout.slices
    W1, W2 = model.blocks[0][0].weight, model.blocks[1][0].weight
    h1 = torch.tanh(x @ W1.T + model.blocks[0][0].bias).detach()
    torch.testing.assert_close(W1.grad, (e @ M[:, s0:t0]).T @ x, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(W2.grad, (e @ M[:, s1:t1]).T @ h1, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model.blocks[1][0].bias.grad, (e @ M[:, s1:t1]).sum(0), atol=1e-10, rtol=1e-8)
    # the same B after the activation is the paper's rule: it differs by exactly f'(a_i) = 1 - tanh(a_i)^2
    after = FeedbackEngine(MLP(5, 3, hidden=[8, 6], activation="tanh"), ["blocks.*"], init="gaussian", seed=3)
    after.model.load_state_dict(model.state_dict())
    draw(after, x)
    torch.testing.assert_close(after.matrix, engine.matrix)
    F.cross_entropy(after.model(x), y).backward()
    a1 = x @ W1.T + model.blocks[0][0].bias
    torch.testing.assert_close(after.model.blocks[0][0].weight.grad, ((e @ M[:, s0:t0]) * (1 - torch.tanh(a1) ** 2)).T @ x,
                               atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("method", ["dfa", "shallow"])
def test_nothing_above_a_feedback_point_sends_gradient_below_it(method):
    torch.manual_seed(2)
    model = MLP(5, 3, hidden=[8, 8])
    engine = FeedbackEngine(model, ["blocks.*"], method=method, seed=0)
    received: dict[str, list[torch.Tensor]] = {"blocks.0": [], "blocks.1": []}
    input_grads: list = []

    def probe(name):
        def hook(module, args, out):
            out.register_hook(lambda g: received[name].append(g.clone()))
        return hook

    # registered BEFORE the engine's hooks would be too late; these see the raw (uncut) output
    for name in received:
        dict(model.named_modules())[name].register_forward_hook(probe(name), prepend=True)
    model.head.register_full_backward_hook(lambda m, gin, gout: input_grads.append(gin))
    model.blocks[1].register_full_backward_hook(lambda m, gin, gout: input_grads.append(gin))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    # layers above a cut are never asked for the gradient w.r.t. their (detached) input
    assert all(g is None for gin in input_grads for g in gin)
    if method == "shallow":
        assert received == {"blocks.0": [], "blocks.1": []}
        assert model.blocks[0][0].weight.grad is None and model.blocks[1][0].weight.grad is None
        assert model.head.weight.grad is not None
    else:
        e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 3)) / 4
        for i, name in enumerate(["blocks.0", "blocks.1"]):
            start, stop = engine._layout.slices[i]
            (g,) = received[name]  # exactly one gradient arrives, and it is B_i e, nothing else
            torch.testing.assert_close(g, e @ engine.matrix.double()[:, start:stop], atol=1e-12, rtol=1e-10)


class _TwiceThroughOneBlock(nn.Module):
    """A weight-shared block called twice in one forward (a recurrent step, a tied layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.block(x)))


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_a_point_called_twice_gets_its_feedback_at_each_call(projection):
    torch.manual_seed(4)
    model = _TwiceThroughOneBlock()
    engine = FeedbackEngine(model, ["block"], seed=2, **PROJECTIONS[projection])
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    draw(engine, x)
    logits = ran(model(x), projection)
    F.cross_entropy(logits, y).backward()
    e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 3)) / 6
    signal = e @ engine.matrix.to(torch.float64)  # one point: the same B e for both calls
    W, b = model.block[0].weight, model.block[0].bias
    h1 = torch.tanh(x @ W.T + b).detach()
    h2 = torch.tanh(h1 @ W.T + b).detach()
    local = [signal * (1 - h1 ** 2), signal * (1 - h2 ** 2)]  # through each call's tanh, nothing further down
    torch.testing.assert_close(W.grad, local[0].T @ x + local[1].T @ h1)
    torch.testing.assert_close(b.grad, local[0].sum(0) + local[1].sum(0))


def test_projection_is_a_single_matmul_per_step():
    model = MLP(5, 3, hidden=[8, 8, 8])
    FeedbackEngine(model, ["blocks.*"])
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with torch.profiler.profile() as prof:
        F.cross_entropy(model(x), y).backward()
    names = [e.name for e in prof.events()]
    # forward: 4 linears (addmm); backward: weight grads via mm; the projection: one aten::matmul from backward
    inject = [e for e in prof.events() if e.name == "_InjectFeedbackBackward"]
    assert len(inject) == 1
    assert names.count("aten::matmul") == 1


def test_auto_projection_goes_per_point_when_fused_signals_would_grow_the_step_memory():
    # a deep narrow MLP on a big batch: the fused B_i e (N x sum widths, fp64 here) rival the saved activations
    model = MLP(64, 4, hidden=[64] * 4)
    engine = FeedbackEngine(model, ["blocks.*"])
    x, y = torch.randn(2048, 64), torch.randint(0, 4, (2048,))
    c = engine.calibrate(lambda: F.cross_entropy(model(x), y))
    assert c["fused_signal_bytes"] == 2048 * 256 * 8 and c["fused_fraction"] > 0.1
    assert engine.mode == "per_point" and "auto -> per_point" in engine.report()
    engine.reset()
    with torch.profiler.profile() as prof:
        F.cross_entropy(model(x), y).backward()
    assert sum(e.name == "_ReceiveFeedbackBackward" for e in prof.events()) == 4  # B_i e computed at each point


def test_the_probe_forward_of_calibrate_leaves_no_graph_behind():
    """calibrate() counts what autograd saves through a pack hook; a hook that handed back the saved output itself
    tied it to its own grad_fn, a cycle no collector frees: every probe leaked a forward's activations (GPU memory
    over a benchmark's variants) and kept the parameters' gradient accumulators on the probe's stream (a CUDA graph
    captured later failed on the H200)."""
    import gc

    def graph_tensors() -> int:  # tensors still holding a graph, wherever they are held from
        gc.collect()
        return sum(isinstance(o, torch.Tensor) and o.grad_fn is not None for o in gc.get_objects())

    model = MLP(8, 4, hidden=[16, 16])
    engine = FeedbackEngine(model, ["blocks.*"])
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    before = graph_tensors()
    c = engine.calibrate(lambda: F.cross_entropy(model(x), y))
    assert graph_tensors() == before  # the points' ReLU outputs and the log-softmax had stayed
    assert c["saved_activation_bytes"] > 0  # still measured


def test_a_point_whose_output_nothing_takes_is_named_at_calibration():
    """Backprop gives a dropped branch's layers no gradient; DFA's B e would train them anyway, unsaid."""
    import warnings

    class DroppedBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.dropped, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            self.dropped(h)  # computed, then left out
            return self.head(h)

    x = torch.randn(16, 4)
    for norm in ("none", {"a": "layer"}):  # the norm's path makes and drops temporaries of the same size first
        engine = FeedbackEngine(DroppedBranch(), ["a", "dropped"], feedback_norm=norm)
        with pytest.warns(UserWarning, match=r"feedback point\(s\) dropped: nothing in the forward takes the outp"):
            engine.calibrate(lambda: engine.model(x).sum())
    used = FeedbackEngine(MLP(4, 2, hidden=[8, 8]), ["blocks.*"], feedback_norm={"blocks.0": "layer"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every point taken: no word (the norm's clone counted as handed on)
        used.calibrate(lambda: used.model(x).sum())


def test_auto_projection_stays_fused_when_the_signals_are_small():
    # a wide input layer and a 16-wide hidden point (a GCN-like shape): the fused signals cost next to nothing
    model = MLP(1000, 4, hidden=[16])
    engine = FeedbackEngine(model, ["blocks.*"])
    x, y = torch.randn(64, 1000), torch.randint(0, 4, (64,))
    c = engine.calibrate(lambda: F.cross_entropy(model(x), y))
    assert c["fused_fraction"] < 0.1 and engine.mode == "fused" and "auto -> fused" in engine.report()
    explicit = FeedbackEngine(MLP(64, 4, hidden=[64] * 4), ["blocks.*"], projection="fused")
    xb = torch.randn(2048, 64)
    explicit.calibrate(lambda: explicit.model(xb).sum())
    assert explicit.mode == "fused"  # an explicit choice is measured but never overridden


def test_optimizer_state_counts_lazy_adam_as_two_tensors_per_parameter_and_sgd_by_its_momentum():
    model = MLP(8, 2, hidden=[4])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    adam = torch.optim.Adam(model.parameters())
    assert optimizer_state_bytes([adam]) == 2 * param_bytes  # before the first step: no state exists yet
    model(torch.randn(3, 8)).sum().backward()
    adam.step()
    assert optimizer_state_bytes([adam]) == 2 * param_bytes  # the real state now (the scalar `step` aside)
    assert optimizer_state_bytes([torch.optim.Adam(model.parameters(), amsgrad=True)]) == 3 * param_bytes
    assert optimizer_state_bytes([torch.optim.SGD(model.parameters(), lr=0.1)]) == 0
    assert optimizer_state_bytes([torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)]) == param_bytes


def test_auto_projection_counts_the_optimizer_state_in_the_step_memory():
    # 10.4% of activations + params + grads: per point; Adam's two moments make it 5.6% of the step: fused
    model = MLP(256, 4, hidden=[256, 256])
    engine = FeedbackEngine(model, ["blocks.*"])
    x, y = torch.randn(64, 256), torch.randint(0, 4, (64,))
    assert engine.calibrate(lambda: F.cross_entropy(model(x), y))["choice"] == "per_point"
    adam = optimizer_state_bytes([torch.optim.Adam(model.parameters())])
    c = engine.count_optimizer_state(adam)
    assert c["optimizer_state_bytes"] == adam > 0 and c["fused_fraction"] < 0.1 and engine.mode == "fused"
    assert "optimizer state" in engine.report()
    sgd = FeedbackEngine(MLP(256, 4, hidden=[256, 256]), ["blocks.*"])
    sgd.calibrate(lambda: F.cross_entropy(sgd.model(x), y), optimizer_state_bytes([torch.optim.SGD(
        sgd.model.parameters(), lr=0.1)]))
    assert sgd.mode == "per_point"  # plain SGD holds no state: the same step stays per point


def test_auto_per_point_gives_the_same_gradients_as_fused():
    torch.manual_seed(0)
    x, y = torch.randn(2048, 64), torch.randint(0, 4, (2048,))
    results = []
    for projection in ("auto", "fused"):
        torch.manual_seed(1)
        model = MLP(64, 4, hidden=[64] * 4)
        engine = FeedbackEngine(model, ["blocks.*"], projection=projection, seed=3)
        engine.calibrate(lambda: F.cross_entropy(model(x), y))
        engine.reset()
        F.cross_entropy(model(x), y).backward()
        results.append((engine.mode, grads(model)))
    (mode_a, auto), (mode_f, fused) = results
    assert (mode_a, mode_f) == ("per_point", "fused")
    for name in fused:
        torch.testing.assert_close(auto[name], fused[name], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(("operator", "receiver"), [("dense", "token"), ("lowrank", "token"), ("sparse", "token"),
                                                     ("dense", "matmul"), ("lowrank", "matmul")])
def test_per_point_computes_each_signal_after_the_one_above_is_consumed(operator, receiver):
    """Per point, autograd reaches point i's projection only after the segment above used its own: one feedback
    signal is alive at a time (the memory that makes `auto` choose it). Observed at the points themselves (a
    gradient hook on each point's output), whichever node computed B_i e."""
    import weakref

    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    torch.manual_seed(0)
    model = MLP(6, 3, hidden=[16, 16, 16, 16])
    signals, alive_at_each_arrival = [], []

    def arrived(g):
        alive_at_each_arrival.append(sum(ref() is not None for ref in signals))
        signals.append(weakref.ref(g))

    def watch(module, args, out):  # registered before the engine's hook: sees the point's own output
        if out.requires_grad:
            out.register_hook(arrived)

    for block in model.blocks:
        block.register_forward_hook(watch)
    engine = FeedbackEngine(model, ["blocks.*"], projection="per_point", receiver=receiver, operator=operator,
                            rank=2, nnz=2, seed=2)
    draw(engine, x)
    F.cross_entropy(ran(model(x), f"per_point-{receiver}"), y).backward()
    assert alive_at_each_arrival == [0, 0, 0, 0]  # a signal kept by the engine (or its node) would count here


def test_shared_slices_reproduce_tinydfa_layout():
    model = MLP(5, 3, hidden=[8, 6])
    engine = FeedbackEngine(model, ["blocks.*"], shared_slices=True, scale="max_width", seed=5)
    model(torch.randn(2, 5))
    engine.ensure_matrix()
    assert engine.matrix.shape == (3, 8)
    assert engine._layout.slices == ((0, 8), (0, 6))
    raw = torch.Generator().manual_seed(5)
    expected = (torch.rand((3, 8), generator=raw, dtype=torch.float32) * 2 - 1) / 8 ** 0.5
    torch.testing.assert_close(engine.matrix, expected)


@pytest.mark.parametrize("operator", ["lowrank", "sparse"])
def test_shared_slices_give_equal_width_points_the_same_signal_with_cheap_operators(operator):
    # TinyDFA's layout (one B e for all blocks of one width) through a low-rank or sparse B: columns 0:d of one operator
    model = MLP(5, 3, hidden=[8, 8, 6])
    engine = FeedbackEngine(model, ["blocks.*"], shared_slices=True, scale="max_width", operator=operator, rank=2,
                            nnz=2, seed=5)
    engine.capture = {}
    out = model(torch.randn(4, 5))
    engine.ensure_matrix()
    assert engine.operator.kind == operator and engine._layout.total == 8
    e = torch.randn(4, 3)
    grads = engine.project(e, (0, 1, 2), [torch.Size([4, 8])] * 2 + [torch.Size([4, 6])], [torch.float64] * 3)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[2], grads[0][:, :6])
    torch.testing.assert_close(grads[0], e @ engine.matrix.to(e.dtype))  # the scale 1/sqrt(8) is folded in once
    raw = operators.draw_operator(operator, 3, engine._layout, "uniform", 5, True, 2, 2).dense()
    torch.testing.assert_close(engine.matrix, raw / 8 ** 0.5)
    assert out.shape == (4, 3)


@pytest.mark.parametrize("operator", ["dense", "lowrank"])
@pytest.mark.parametrize("scale", ["max_width", "per_layer"])
def test_per_point_with_shared_slices_computes_the_shared_product_once_and_matches_fused(operator, scale):
    """Tokens: one product e B for the three points (when the backward starts), sliced 0:8, 0:8, 0:6. Matmul
    receivers: each point's own block of the shared columns, with its own factor (``per_layer`` scales differ)."""
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    results, calls = {}, {}
    for projection in PROJECTIONS:
        torch.manual_seed(0)
        model = MLP(5, 3, hidden=[8, 8, 6])
        engine = FeedbackEngine(model, ["blocks.*"], shared_slices=True, scale=scale, operator=operator,
                                rank=2, seed=5, **PROJECTIONS[projection])
        draw(engine, x)
        op, count = engine.operator, []
        project, project_slice = op.project, op.project_slice
        op.project = lambda e: count.append("project") or project(e)
        op.project_slice = lambda p, a, b: count.append((a, b)) or project_slice(p, a, b)
        F.cross_entropy(ran(model(x), projection), y).backward()
        results[projection], calls[projection] = grads(model), count
    # matmul receivers: no operator call at all for dense (autograd's matmuls multiply e by each block)
    assert calls == {"fused": ["project"], "per_point-token": ["project"], "per_point-matmul": []}
    for name, g in results["fused"].items():
        torch.testing.assert_close(results["per_point-token"][name], g, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(results["per_point-matmul"][name], g, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_projection_dtype_gradient_projects_in_bf16_under_autocast_close_to_fp32(projection):
    torch.set_default_dtype(torch.float32)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    results = {}
    for projection_dtype in ("float32", "gradient"):
        torch.manual_seed(0)
        model = MLP(16, 4, hidden=[32, 32])
        engine = FeedbackEngine(model, ["blocks.*"], projection_dtype=projection_dtype, seed=1,
                                **PROJECTIONS[projection])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            draw(engine, x)
            out = ran(model(x), projection)
        assert out.dtype == torch.bfloat16  # a matmul receiver turns autocast off around itself, and back on
        F.cross_entropy(out.float(), y).backward()
        results[projection_dtype] = grads(model)
        expected = torch.bfloat16 if projection_dtype == "gradient" else torch.float32
        assert [dtype for _, dtype in engine.operator._cache] == [expected]  # the device copy B is projected in
        assert engine.operator.dense().dtype == torch.float32  # the checkpointed B stays fp32
    for name, g in results["float32"].items():
        torch.testing.assert_close(results["gradient"][name], g, rtol=5e-2, atol=5e-3)
    with pytest.raises(ConfigError, match="projection_dtype must be one of"):
        FeedbackEngine(MLP(16, 4, hidden=[8]), ["blocks.*"], projection_dtype="half")


@pytest.mark.parametrize("init", ["uniform", "gaussian", "sign"])
def test_feedback_matrix_depends_only_on_the_seed(init):
    torch.set_default_dtype(torch.float32)
    mats = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        model = MLP(5, 3, hidden=[8, 6])
        engine = FeedbackEngine(model, ["blocks.*"], init=init, scale="none", seed=11)
        model(torch.randn(2, 5))
        mats.append(engine.ensure_matrix())
    assert torch.equal(mats[0], mats[1]) and mats[0].dtype == torch.float32
    if init == "sign":
        assert set(mats[0].unique().tolist()) == {-1.0, 1.0}
    if init == "uniform":
        assert mats[0].min() >= -1 and mats[0].max() < 1


def test_pattern_matching_nothing_lists_the_module_names():
    with pytest.raises(ConfigError, match=r"'blok\.\*' matches no module of MLP; modules: blocks, blocks.0"):
        FeedbackEngine(MLP(4, 2, hidden=[3]), ["blok.*"])


def test_points_by_module_type_and_glob_semantics():
    model = MLP(4, 2, hidden=[3, 3])
    engine = FeedbackEngine(model, ["torch.nn.ReLU"])
    assert [p.name for p in engine.points] == ["blocks.0.1", "blocks.1.1"]
    assert glob_match("blocks.0", "blocks.*") and not glob_match("blocks.0.1", "blocks.*")
    assert glob_match("blocks.0.1", "blocks.**")


def test_tuple_output_is_a_clear_error_naming_the_module():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = TwoHeads()
    FeedbackEngine(model, ["lstm"])
    with pytest.raises(ConfigError, match="feedback point 'lstm' \\(LSTM\\) returns tuple"):
        model(torch.randn(2, 3, 4))


def test_token_level_batch_dims_and_mixed_dtypes():
    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    engine = FeedbackEngine(model, ["1"], batch_dims=[0, 1])
    x = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert engine.matrix.dtype == torch.float32 and engine.matrix.shape == (5, 6)
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


class _FeaturesFirst(nn.Module):
    """A layer on [features, samples] activations (column-major data, as some recsys and graph code keeps it)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.T).T


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_a_non_leading_batch_dim_sends_each_sample_its_own_projection(projection):
    """Features-first activations [d, N] with ``batch_dims=[1]`` and d == N (a square point, where a missing
    transpose back would go unnoticed by shapes): sample n's point receives e_n @ B, laid out as [d, N] again."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(_FeaturesFirst(4, 6), nn.ReLU(), _FeaturesFirst(6, 5))
    engine = FeedbackEngine(model, ["1"], batch_dims=[1], seed=3, **PROJECTIONS[projection])
    x, w = torch.randn(4, 6), torch.randn(5, 6)  # 6 samples
    draw(engine, x)
    (ran(model(x), projection) * w).sum().backward()  # e = dL/d(out) = w, [5, 6]
    m = engine.matrix
    assert m.shape == (5, 6)
    signal = (w.T @ m).T  # [N, 6] per sample, back to [6, N]
    h = torch.relu(model[0](x))
    expected = torch.autograd.grad(h, model[0].lin.weight, signal)[0]
    torch.testing.assert_close(model[0].lin.weight.grad, expected)


def test_evaluation_without_grad_leaves_outputs_untouched():
    model = MLP(4, 2, hidden=[3])
    FeedbackEngine(model, ["blocks.*"])
    x = torch.randn(3, 4)
    with torch.no_grad():
        a = model(x)
    b = model(x)
    torch.testing.assert_close(a, b.detach())
    assert b.grad_fn is not None and "InjectFeedback" in type(b.grad_fn).__name__


@pytest.mark.parametrize("operator", ["dense", "lowrank", "sparse"])
def test_every_operator_projects_like_its_dense_matrix_and_trains_the_same_way(operator):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(4)
    model = MLP(5, 40, hidden=[8, 6])
    engine = FeedbackEngine(model, ["blocks.*"], operator=operator, rank=4, nnz=3, seed=2)
    x, y = torch.randn(7, 5), torch.randint(0, 40, (7,))
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    dense = engine.matrix
    assert dense.shape == (40, 14)
    e = (torch.softmax(logits.detach(), 1) - F.one_hot(y, 40)) / 7
    (got,) = engine.project(e, (1,), [torch.Size([7, 6])], [torch.float32])
    start, stop = engine._layout.slices[1]
    torch.testing.assert_close(got, e @ dense[:, start:stop], atol=1e-6, rtol=1e-5)
    if operator == "sparse":
        assert ((dense != 0).sum(0) == 3).all()  # each hidden unit listens to nnz output units
    if operator == "lowrank":
        assert torch.linalg.matrix_rank(dense) <= 4


@pytest.mark.parametrize("error", ["sign", "ternary"])
def test_quantised_errors_send_only_sign_information(error):
    torch.set_default_dtype(torch.float32)
    model = MLP(5, 3, hidden=[8])
    engine = FeedbackEngine(model, ["blocks.*"], error=error, scale="none")
    model(torch.randn(2, 5))
    engine.ensure_matrix()
    e = torch.tensor([[0.3, -0.01, 0.0], [-0.2, 0.05, 0.4]])
    (got,) = engine.project(e, (0,), [torch.Size([2, 8])], [torch.float32])
    scale = e.abs().sum() / (e != 0).sum()  # mean over the entries that carry error
    q = torch.sign(e) * scale if error == "sign" else torch.sign(e) * (e.abs() > scale / 2) * scale
    torch.testing.assert_close(got, q @ engine.matrix)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_centered_error_feeds_back_no_component_shared_by_the_batch_and_leaves_unlabelled_rows_silent(projection):
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=[8])
    engine = FeedbackEngine(model, ["blocks.*.0"], error="centered", init="gaussian", **PROJECTIONS[projection])
    x = torch.randn(4, 5)
    draw(engine, x)
    e = torch.tensor([[0.3, -0.1, 0.2], [0.0, 0.0, 0.0], [-0.2, 0.5, 0.4], [0.1, 0.1, 0.1]])  # row 1: no label
    ran(model(x), projection).backward(e)
    labelled = [0, 2, 3]
    sent = torch.zeros(4, 8)
    sent[labelled] = (e[labelled] - e[labelled].mean(dim=0)) @ engine.matrix.to(torch.float64)[:, :8]
    torch.testing.assert_close(model.blocks[0][0].weight.grad, sent.T @ x, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model.blocks[0][0].bias.grad, torch.zeros(8), atol=1e-10, rtol=0)  # B ē is gone


def _feedback_norm_bias_grads(projection: str, mode: str) -> dict[float, tuple[torch.Tensor, ...]]:
    """One DFA backward with ``feedback_norm=mode`` on the first layer's output, scaled by 1 and by 10: per gain, that
    layer's bias gradient, its output h and g = B e. Also checks that the forward is untouched."""
    torch.manual_seed(5)
    x, e = torch.randn(6, 5), torch.randn(6, 3)
    results, base = {}, MLP(5, 3, hidden=[8]).state_dict()
    for gain in (1.0, 10.0):
        model = MLP(5, 3, hidden=[8])
        model.load_state_dict(base)
        with torch.no_grad():
            model.blocks[0][0].weight.mul_(gain)
            model.blocks[0][0].bias.mul_(gain)
        engine = FeedbackEngine(model, ["blocks.*.0"], init="gaussian", seed=2, feedback_norm=mode,
                                **PROJECTIONS[projection])
        draw(engine, x)
        out = ran(model(x), projection)
        torch.testing.assert_close(out, FeedbackEngine(model, [], method="bp").model(x))  # the forward is untouched
        out.backward(e)
        h = (x @ model.blocks[0][0].weight.T + model.blocks[0][0].bias).detach()
        results[gain] = (model.blocks[0][0].bias.grad.clone(), h, e @ engine.matrix.to(torch.float64)[:, :8])
    return results


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_feedback_norm_hands_b_e_to_the_point_through_a_layernorm_backward_so_it_shrinks_as_the_point_grows(projection):
    """``feedback_norm="layer"``: the point receives (1/σ)(g − mean(g) − y·mean(g·y)), g = B_i e and y the point's
    output normalised per sample (what a post-LN block's norm does to it); scaling the point's output by 10 divides
    the signal by 10, where plain DFA hands every scale the same B_i e. The forward is unchanged."""
    results = _feedback_norm_bias_grads(projection, "layer")
    for grad, h, g in results.values():
        sigma = torch.sqrt(h.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
        y = (h - h.mean(dim=1, keepdim=True)) / sigma
        sent = (g - g.mean(dim=1, keepdim=True) - y * (g * y).mean(dim=1, keepdim=True)) / sigma
        torch.testing.assert_close(grad, sent.sum(0), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(results[10.0][0], results[1.0][0] / 10, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_orthogonal_feedback_norm_removes_the_component_that_would_rescale_the_point_and_keeps_b_e_scale(projection):
    """``feedback_norm="orthogonal"``: the point receives g − mean(g) − y·mean(g·y), LayerNorm's backward without its
    1/σ. Per sample the signal is centred and orthogonal to the centred output (it cannot grow or shrink the point
    to first order), and unlike ``layer`` it does not depend on the point's scale."""
    results = _feedback_norm_bias_grads(projection, "orthogonal")
    for grad, h, g in results.values():
        centred = h - h.mean(dim=1, keepdim=True)
        y = centred / torch.sqrt(h.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
        sent = g - g.mean(dim=1, keepdim=True) - y * (g * y).mean(dim=1, keepdim=True)
        torch.testing.assert_close(grad, sent.sum(0), atol=1e-10, rtol=1e-8)
        along = (sent * centred).sum(dim=1).abs() / (g.norm(dim=1) * centred.norm(dim=1))  # cosine, but for LN's eps
        assert along.max() < 1e-4 and sent.sum(dim=1).abs().max() < 1e-8
    torch.testing.assert_close(results[10.0][0], results[1.0][0], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_feedback_norm_per_point_normalises_the_matched_points_and_hands_the_rest_plain_b_e(projection):
    """``feedback_norm: {glob: mode}``: a point the glob matches gets what the engine-wide mode would give it, every
    other point what plain DFA gives it, from the same B and error, in the same one backward."""
    torch.manual_seed(3)
    x, e = torch.randn(6, 5), torch.randn(6, 3)
    base = MLP(5, 3, hidden=[8, 8, 8]).state_dict()
    got = {}
    for norm in ("none", "orthogonal", {"blocks.1": "orthogonal", "blocks.*": "none"}):
        model = MLP(5, 3, hidden=[8, 8, 8])
        model.load_state_dict(base)
        engine = FeedbackEngine(model, ["blocks.*"], seed=4, feedback_norm=norm, **PROJECTIONS[projection])
        draw(engine, x)
        ran(model(x), projection).backward(e)
        got[str(norm)] = grads(model)
    mixed, plain, ortho = got[str({"blocks.1": "orthogonal", "blocks.*": "none"})], got["none"], got["orthogonal"]
    for name, grad in mixed.items():
        expected = ortho[name] if name.startswith("blocks.1.") else plain[name]
        torch.testing.assert_close(grad, expected, msg=name)
    assert not torch.allclose(ortho["blocks.1.0.bias"], plain["blocks.1.0.bias"])  # the test can tell them apart


def test_orthogonal_at_a_layernorm_output_acts_only_on_the_norms_own_scale_and_shift_while_they_are_1_and_0():
    """Post-LN micro: at the attention and block outputs (LayerNorm outputs) the norm's backward already centres
    B e and removes its component along x̂, so `orthogonal` there, with γ = 1 and β = 0 (y = x̂), changes nothing
    that reaches the layers below; it changes the gradient of γ, which the norm's backward does not project (what
    `benchmarks/ln_affine.py` measures at trained weights)."""
    from dfa_lightning.models.transformer import TransformerLM

    torch.manual_seed(0)
    base = TransformerLM(50, d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.0, max_len=8).state_dict()
    idx = torch.randint(0, 50, (3, 8))
    got = {}
    for norm in ("none", {"blocks.*.attn_out": "orthogonal", "blocks.*.out": "orthogonal"}):
        model = TransformerLM(50, d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.0, max_len=8)
        model.load_state_dict(base)
        engine = FeedbackEngine(model, ["blocks.*.attn_out", "blocks.*.ffn.act", "blocks.*.out"], output="hidden_out",
                                batch_dims=(0, 1), shared_slices=True, scale="max_width", seed=1, feedback_norm=norm)
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        assert engine.ready
        got[str(norm)] = grads(model)
    plain, ortho = got["none"], got[str({"blocks.*.attn_out": "orthogonal", "blocks.*.out": "orthogonal"})]
    below = [n for n in plain if glob_match(n, "blocks.*.attn.**") or glob_match(n, "blocks.*.ffn.**")]
    assert below
    for name in below:
        torch.testing.assert_close(ortho[name], plain[name], rtol=1e-3, atol=1e-6, msg=name)
    gamma = [n for n in plain if glob_match(n, "blocks.*.ln_?.weight")]
    for name in gamma:  # the radial part of B e is γ's whole drive to grow the output: removed
        cos = F.cosine_similarity(ortho[name], plain[name], dim=0)
        assert cos < 0.9, (name, float(cos))


@pytest.mark.parametrize("settings, expected", [
    ({"operator": "lowrank", "rank": 0}, "rank must be >= 1 for the lowrank operator, got 0"),
    ({"operator": "sparse", "nnz": 0}, "nnz must be >= 1 for the sparse operator, got 0"),
    ({"batch_dims": []}, "batch_dims must list distinct sample dims"),
    ({"batch_dims": [0, -1]}, "batch_dims must list distinct sample dims (>= 0)"),
    ({"batch_dims": [0, 0]}, "batch_dims must list distinct sample dims (>= 0) of the output, e.g. [0] or [0, 1] for "
                             "[batch, tokens, features], got [0, 0]"),
], ids=["rank 0", "nnz 0", "no batch dims", "negative batch dim", "repeated batch dim"])
def test_an_impossible_operator_size_or_batch_dims_is_named_when_the_rule_is_made(settings, expected):
    """Found while the recipe is read (was: at setup, after the run folder, or `batch_dims: []` silently [0])."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    with pytest.raises(ConfigError, match=rf"FeedbackAlignmentStrategy: {re.escape(expected)}"):
        FeedbackAlignmentStrategy(feedback_points=["blocks.*"], **settings)


def test_a_lowrank_operator_no_lower_than_the_dense_one_is_warned_about():
    model = MLP(5, 3, hidden=[8, 8])
    engine = FeedbackEngine(model, ["blocks.*"], operator="lowrank", rank=3, seed=0)  # d_out 3: rank 3 is full
    with pytest.warns(UserWarning, match=r"lowrank operator of rank 3 for a 3 x 16 B: no lower than the dense one"):
        draw(engine, torch.randn(4, 5))


def test_a_sparse_operator_with_as_many_non_zeros_as_the_error_is_wide_is_warned_about():
    """nnz above the error's width was cut to it without a word: a dense B, stored and multiplied as sparse."""
    engine = FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], operator="sparse", nnz=100, seed=0)
    with pytest.warns(UserWarning, match=r"sparse operator with nnz 100 for a 3-wide error: every column listens "
                                         r"to all 3 outputs \(nnz is cut to 3\)"):
        draw(engine, torch.randn(4, 5))


@pytest.mark.parametrize("every", [0, -1])
def test_the_alignment_monitor_needs_a_period_of_at_least_one_step(every):
    from dfa_lightning.callbacks import AlignmentMonitor

    with pytest.raises(ConfigError, match=rf"every_n_steps must be an integer >= 1, got {every}"):
        AlignmentMonitor(every_n_steps=every)


def test_feedback_norm_per_point_names_a_glob_that_matches_no_point_and_a_bad_mode():
    with pytest.raises(ConfigError, match=r"feedback_norm: pattern 'block\.\*' matches no feedback point; points: "
                                          r"blocks\.0, blocks\.1"):
        FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], feedback_norm={"block.*": "layer"})
    with pytest.raises(ConfigError, match="feedback_norm must be one of .* or a mapping"):
        FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], feedback_norm={"blocks.*": "batch"})


def test_feedback_norm_normalises_over_the_feature_dims_whichever_dims_are_the_batch():
    engine = FeedbackEngine(MLP(5, 3, hidden=[8]), ["blocks.*"], batch_dims=[1], feedback_norm="layer")
    t = torch.randn(3, 4, 5)
    expected = F.layer_norm(t.movedim(1, 0), (3, 5)).movedim(0, 1)
    torch.testing.assert_close(engine.normalise(t), expected)
    engine.feedback_norm = "orthogonal"  # the same backward, times the (constant) per-sample scale
    scale = torch.sqrt(t.var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(engine.normalise(t), expected * scale)
    with pytest.raises(ConfigError, match="feedback_norm must be one of"):
        FeedbackEngine(MLP(5, 3, hidden=[8]), ["blocks.*"], feedback_norm="batch")


def test_fused_projection_casts_every_signal_to_the_points_dtype_in_one_copy():
    """Under bf16 autocast the fp32 projection goes to the bf16 points: one cast of [N, K], not one per point (a
    launch each on a GPU, where small steps are host-bound); the values are those of a cast per point."""
    model = MLP(6, 3, hidden=[8, 8, 8])
    engine = FeedbackEngine(model, ["blocks.*"], projection="fused", seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(5, 6))
    engine.reset()
    engine.ensure_matrix()
    e = torch.randn(5, 3, dtype=torch.bfloat16)
    shapes, dtypes = [torch.Size([5, 8])] * 3, [torch.bfloat16] * 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        signals = engine.project(e, (0, 1, 2), shapes, dtypes)
    casts = [ev for ev in prof.events() if ev.name == "aten::_to_copy"]
    assert len(casts) == 2  # e up to fp32, then all signals down to bf16 at once
    full = (e.float() @ engine.matrix).to(torch.bfloat16)
    for i, g in enumerate(signals):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, full[:, 8 * i:8 * (i + 1)], atol=0, rtol=0)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_a_point_with_other_batch_elements_than_the_output_is_an_error_naming_it(projection):
    """Per-token points under a per-sequence output with batch_dims [0, 1]: B cannot pair their rows."""

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x):  # [B, T, 5] -> [B, 3]
            return self.head(torch.relu(self.fc(x)).mean(1))

    model, x = Pooled(), torch.randn(2, 4, 5)
    engine = FeedbackEngine(model, ["fc"], batch_dims=[0, 1], **PROJECTIONS[projection])
    with torch.no_grad():
        model(x)  # widths and the output's size
    engine.ensure_matrix()
    with pytest.raises(ConfigError, match=r"feedback point 'fc' has 8 batch elements over batch_dims \[0, 1\] but "
                                          r"the output has 6; adjust batch_dims"):
        ran(model(x), projection).sum().backward()


def test_matmul_receivers_leave_no_python_in_the_backward_and_add_one_thin_forward_matmul_per_point():
    """Per point with matmul receivers: autograd's own matmul backward computes each B_i e (4 ``MmBackward0``
    nodes, the linears being ``addmm``), no engine Function runs per point, and the forward has one extra ``[N, d_i]
    x [d_i, d_out]`` matmul per point, whose value only carries the graph."""
    torch.set_default_dtype(torch.float32)
    model = MLP(16, 3, hidden=[16] * 4)
    engine = FeedbackEngine(model, ["blocks.*"], projection="per_point", receiver="matmul", seed=1)
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    draw(engine, x)
    with torch.profiler.profile() as prof:
        F.cross_entropy(ran(model(x), "per_point-matmul"), y).backward()
    names = [e.name for e in prof.events()]
    assert "_ReceiveFeedback" not in names and "_ReceiveFeedbackBackward" not in names
    assert names.count("autograd::engine::evaluate_function: MmBackward0") == 4
    forward_mm = [e for e in prof.events() if e.name == "aten::mm" and e.sequence_nr >= 0
                  and not any(p.name.startswith("autograd::engine") for p in _ancestors(e))]
    assert len(forward_mm) == 4


def _ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


def test_auto_receiver_is_matmul_for_a_narrow_error_and_token_for_a_wide_one():
    torch.set_default_dtype(torch.float32)
    narrow = FeedbackEngine(MLP(256, 4, hidden=[256] * 4), ["blocks.*"], projection="per_point")
    x = torch.randn(512, 256)
    c = narrow.calibrate(lambda: narrow.model(x).sum())
    assert c["receiver_flops"] == 2 * 512 * 4 * 1024
    assert c["forward_matmul_flops"] == 2 * 512 * (256 * 256 * 4 + 256 * 4)
    assert narrow.receiver == "matmul" and "receiver=auto -> matmul" in narrow.report()
    # a 256-class error on 64-wide points: the receivers would cost 2/3 of the step
    wide = FeedbackEngine(MLP(64, 256, hidden=[64] * 4), ["blocks.*"], projection="per_point")
    xw = torch.randn(2048, 64)
    wide.calibrate(lambda: wide.model(xw).sum())
    assert wide.receiver == "token" and "receiver=auto -> token" in wide.report()
    assert FeedbackEngine(MLP(4, 2, hidden=[4]), ["blocks.*"]).receiver == "token"  # not calibrated: token
    sparse = FeedbackEngine(MLP(256, 4, hidden=[256] * 4), ["blocks.*"], operator="sparse", projection="per_point")
    sparse.calibrate(lambda: sparse.model(x).sum())
    assert sparse.receiver == "token"  # no dense blocks to multiply by
    with pytest.raises(ConfigError, match="receiver 'matmul' needs a dense or lowrank operator"):
        FeedbackEngine(MLP(4, 2, hidden=[4]), ["blocks.*"], operator="sparse", receiver="matmul")
    with pytest.raises(ConfigError, match="receiver must be one of"):
        FeedbackEngine(MLP(4, 2, hidden=[4]), ["blocks.*"], receiver="hook")


def test_a_new_feedback_matrix_reaches_the_matmul_receivers():
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    results = {}
    for projection in ("fused", "per_point-matmul"):
        torch.manual_seed(0)
        model = MLP(5, 3, hidden=[6, 6])
        engine = FeedbackEngine(model, ["blocks.*"], seed=1, **PROJECTIONS[projection])
        draw(engine, x)
        F.cross_entropy(model(x), y).backward()  # the receivers of the first B are made and used
        model.zero_grad()
        engine.set_matrix(torch.arange(36, dtype=torch.float64).reshape(3, 12) / 36)
        F.cross_entropy(ran(model(x), projection), y).backward()
        results[projection] = grads(model)
    for name, g in results["fused"].items():
        torch.testing.assert_close(results["per_point-matmul"][name], g, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("autocast", [False, True])
def test_every_receiver_gives_the_fused_gradients_with_token_level_batch_dims(autocast):
    """Tokens as batch elements ([B, T, d] points, batch_dims [0, 1]), under bf16 autocast too (the matmul receiver
    runs in fp32 inside it and its backward casts B_i e to the point's bf16)."""
    torch.set_default_dtype(torch.float32)
    x, target = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    results = {}
    for projection in PROJECTIONS:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 5))
        engine = FeedbackEngine(model, ["1", "3"], batch_dims=[0, 1], seed=2, **PROJECTIONS[projection])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            draw(engine, x)
            out = ran(model(x), projection)
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        F.mse_loss(out.float(), target).backward()
        results[projection] = grads(model)
    for name, g in results["fused"].items():
        for projection in ("per_point-token", "per_point-matmul"):
            torch.testing.assert_close(results[projection][name], g, atol=1e-6, rtol=1e-5)


def test_matmul_receivers_hold_no_memory_from_the_forward_to_the_backward():
    """A receiver's output ``z_i`` is freed as soon as the output's Function has taken it, and its matmul saves
    only ``M_i^T`` (a view of B's device copy): not the point's output, nor (under bf16 autocast with the fp32
    projection) its fp32 copy. So per point keeps BP's activation memory with either receiver."""
    import weakref
    from collections import Counter

    torch.set_default_dtype(torch.float32)
    x = torch.randn(32, 16)
    saved: dict[str, list[torch.Tensor]] = {}
    for projection in ("per_point-token", "per_point-matmul"):
        torch.manual_seed(0)
        model = MLP(16, 3, hidden=[24] * 3)
        engine = FeedbackEngine(model, ["blocks.*"], seed=1, **PROJECTIONS[projection])
        outputs, receive = [], engine._receive
        engine._receive = lambda i, out: outputs.append(weakref.ref(z := receive(i, out))) or z
        saved[projection] = []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            draw(engine, x)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved[projection].append(t) or t, lambda t: t):
                out = ran(model(x), projection)
        assert len(outputs) == (3 if projection == "per_point-matmul" else 0)
        assert all(ref() is None for ref in outputs)  # every z_i is gone before the backward
        out.float().sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    def kinds(tensors):
        return Counter((tuple(t.shape), t.dtype) for t in tensors)

    extra = kinds(saved["per_point-matmul"]) - kinds(saved["per_point-token"])
    assert extra == Counter({((24, 3), torch.float32): 3})  # the M_i^T: nothing [N, d_i], in bf16 or fp32
    assert not kinds(saved["per_point-token"]) - kinds(saved["per_point-matmul"])
    blocks = {t.untyped_storage().data_ptr() for t in saved["per_point-matmul"] if t.shape == (24, 3)}
    assert len(blocks) == 1  # three views of one device copy of B


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_captured_in_a_cuda_graph_feeds_tokens_and_trains_as_the_eager_matmul_receivers():
    """A replayed graph runs no Python, so a capture takes tokens (no forward matmuls to replay); the replayed
    gradients are those of the eager step with matmul receivers."""
    torch.manual_seed(0)
    model = MLP(16, 3, hidden=[32] * 3).cuda()
    engine = FeedbackEngine(model, ["blocks.*"], projection="per_point", receiver="matmul", seed=1)
    x, y = torch.randn(64, 16, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    draw(engine, x)
    F.cross_entropy(ran(model(x), "per_point-matmul"), y).backward()
    eager = grads(model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before the capture (torch.cuda.graph's recipe)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph, kinds = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        out = model(x)
        kinds.append(out.grad_fn.kind)
        F.cross_entropy(out, y).backward()
    graph.replay()
    torch.cuda.synchronize()
    assert kinds == ["token"]
    for name, g in eager.items():
        torch.testing.assert_close(grads(model)[name], g, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("feedback_norm", ["layer", "orthogonal"])
def test_a_normalised_point_under_an_in_place_activation_gets_the_same_update_as_with_an_out_of_place_one(
        projection, feedback_norm):
    """``feedback_norm`` keeps the point's output for its backward; a ReLU(inplace=True) above the point must neither
    break that backward nor change the update."""
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8), nn.ReLU(inplace=inplace),
                              nn.Linear(8, 3))
        engine = FeedbackEngine(model, ["0", "2"], feedback_norm=feedback_norm, seed=1, **PROJECTIONS[projection])
        draw(engine, x)
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, inplace in zip(*grads):
        torch.testing.assert_close(inplace, plain)


def test_the_model_output_is_read_only_under_dfa_and_an_out_of_place_edit_trains():
    """A known limit: the output the error is taken at comes out of the injecting autograd Function as a view, which
    PyTorch forbids editing in place (its message says to clone). An out-of-place edit (``masked_fill``) works."""
    torch.manual_seed(0)
    model = MLP(4, 3, hidden=[8])
    FeedbackEngine(model, ["blocks.*"], seed=1)
    x = torch.randn(5, 4)
    model(x)  # widths; B drawn at the first forward
    with pytest.raises(RuntimeError, match="clon"):
        model(x).masked_fill_(torch.zeros(5, 3, dtype=torch.bool), 0.0).sum().backward()
    model.zero_grad()
    model(x).masked_fill(torch.zeros(5, 3, dtype=torch.bool), 0.0).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_dotted_point_name_of_the_model_is_not_imported_as_a_package(monkeypatch):
    """``blocks.0`` names a module of the model: it is matched by name, and no ``blocks`` package is imported
    (which could run an unrelated local file); a dotted type path still selects by type."""
    import importlib

    from torch import nn

    from dfa_lightning.feedback.points import resolve_points
    from dfa_lightning.models.mlp import MLP

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    model = MLP(4, 3, hidden=[8, 8])
    assert [n for n, _ in resolve_points(model, ["blocks.0"])] == ["blocks.0"]
    assert imported == []
    assert all(isinstance(m, nn.ReLU) for _, m in resolve_points(model, ["torch.nn.ReLU"]))
    assert imported == ["torch.nn"]


def _stack() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_point_on_the_last_layer_warns_that_it_gets_a_random_projection_instead_of_the_error():
    """`torch.nn.Linear` matches an MLP's last layer too: that layer then trains on B e, not on e."""
    torch.manual_seed(0)
    model, x = _stack(), torch.randn(32, 8)
    engine = FeedbackEngine(model, ["torch.nn.Linear"])
    with pytest.warns(UserWarning, match=r"feedback point '4' \(Linear\) has nothing trainable between it and the "
                                         r"model's output.*leave it out of feedback_points"):
        engine.calibrate(lambda: model(x).sum())


def test_points_on_hidden_layers_or_at_a_chosen_output_do_not_warn(recwarn):
    """Hidden points leave a trainable layer above them; an `output:` inside the model (the LM's error before the
    vocabulary) is where the user chose to take the error, so the point just below it is meant."""
    torch.manual_seed(0)
    model, x = _stack(), torch.randn(32, 8)
    FeedbackEngine(model, ["1", "3"]).calibrate(lambda: model(x).sum())
    inner = _stack()
    FeedbackEngine(inner, ["1"], output="2").calibrate(lambda: inner(x).sum())
    assert not [w for w in recwarn if "nothing trainable" in str(w.message)]


def test_shallow_with_a_point_on_the_last_layer_is_refused_as_nothing_would_train():
    """The cut at the last layer leaves the loss with no trainable parameter: it was a bare autograd traceback."""
    model, x = _stack(), torch.randn(32, 8)
    engine = FeedbackEngine(model, ["torch.nn.Linear"], method="shallow")
    with pytest.raises(ConfigError, match=r"method shallow: the model's output depends on no trainable parameter "
                                          r"outside the feedback points \(0, 2, 4\), so nothing would train"):
        engine.calibrate(lambda: model(x).sum())
    hidden = _stack()
    FeedbackEngine(hidden, ["1", "3"], method="shallow").calibrate(lambda: hidden(x).sum())


def test_the_shallow_report_lists_no_feedback_settings():
    """It printed operator, error and `projection=auto -> fused`, none of which a shallow run uses."""
    engine = FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], method="shallow", seed=0)
    engine.model(torch.randn(4, 5)).sum().backward()
    first = engine.report().splitlines()[0]
    assert "method=shallow" in first and "no feedback" in first
    assert not any(word in first for word in ("operator=", "projection=", "error=", "seed="))


@pytest.mark.parametrize("settings, expected", [
    ({"operator": "dense", "rank": 8}, "rank 8 is read by operator: lowrank only; this rule's operator is dense"),
    ({"operator": "lowrank", "nnz": 4}, "nnz 4 is read by operator: sparse only; this rule's operator is lowrank"),
], ids=["rank with dense", "nnz with lowrank"])
def test_an_operator_size_the_operator_does_not_read_is_warned_about(settings, expected):
    """`rank: 8` beside `operator: dense` was dropped without a word."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    with pytest.warns(UserWarning, match=re.escape(expected)):
        FeedbackAlignmentStrategy(feedback_points=["blocks.*"], **settings)


# ---------------------------------------------------------------- pinned by mutation testing (scales, draws, order)
def test_per_layer_scale_divides_each_points_columns_by_the_square_root_of_its_width():
    """The default ``scale: per_layer``: point i's own columns are the seeded draw times 1/sqrt(d_i), so points of
    different widths get signals of one size (TinyDFA's ``max_width`` is pinned by the shared-slices test)."""
    torch.set_default_dtype(torch.float32)
    engine = FeedbackEngine(MLP(5, 3, hidden=[16, 4]), ["blocks.*"], seed=5)
    draw(engine, torch.randn(2, 5))
    raw = torch.rand((3, 20), generator=torch.Generator().manual_seed(5), dtype=torch.float32) * 2 - 1
    torch.testing.assert_close(engine.matrix[:, :16], raw[:, :16] / 4)
    torch.testing.assert_close(engine.matrix[:, 16:], raw[:, 16:] / 2)


def test_gaussian_init_draws_standard_normal_entries_from_the_seed():
    torch.set_default_dtype(torch.float32)
    engine = FeedbackEngine(MLP(5, 3, hidden=[8, 6]), ["blocks.*"], init="gaussian", scale="none", seed=11)
    draw(engine, torch.randn(2, 5))
    expected = torch.randn((3, 14), generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    torch.testing.assert_close(engine.matrix, expected)


@pytest.mark.parametrize("operator", ["dense", "lowrank", "sparse"])
def test_every_operator_gives_each_points_columns_the_dense_operators_scale(operator):
    """With ±1 entries a dense column of point i has squared norm d_out/d_i (``per_layer``); the sparse operator puts
    that norm on its nnz entries (times sqrt(d_out/nnz)) and the low-rank one, U V / sqrt(r), has it on average: a
    cheaper operator changes the projection's cost, not the size of B_i e (learning rates transfer)."""
    torch.set_default_dtype(torch.float32)
    engine = FeedbackEngine(MLP(5, 64, hidden=[256, 16]), ["blocks.*"], init="sign", operator=operator, rank=8,
                            nnz=4, seed=0)
    draw(engine, torch.randn(2, 5))
    for (start, stop), width in zip(engine._layout.slices, (256, 16)):
        squared = engine.matrix[:, start:stop].square().sum(0)  # per column
        if operator == "lowrank":
            torch.testing.assert_close(squared.mean(), torch.tensor(64 / width), rtol=0.1, atol=0)
        else:
            torch.testing.assert_close(squared, torch.full((width,), 64 / width))


def test_ternary_error_keeps_only_entries_above_half_their_mean_magnitude():
    """m = mean |e| over non-zero entries = 0.42: |e| > m/2 = 0.21 keeps 0.9, 0.3 and 0.6 (0.3 lies between m/2
    and m) at ±m; 0.1 and 0.2 are dropped."""
    e = torch.tensor([[0.9, -0.3, 0.1], [0.0, 0.2, -0.6]])
    expected = torch.tensor([[0.42, -0.42, 0.0], [0.0, 0.0, -0.42]])
    torch.testing.assert_close(operators.transform_error(e, "ternary"), expected)


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_reset_forgets_points_recorded_by_a_forward_that_never_reached_the_output(projection):
    """A forward cut short (an error before the output, a forward through a submodule) leaves its points pending;
    after ``reset()`` (the callback calls it at each batch start) the next step trains as if it had never run."""
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    results = []
    for cut_short in (False, True):
        torch.manual_seed(0)
        model = MLP(5, 3, hidden=[8, 8])
        engine = FeedbackEngine(model, ["blocks.*"], seed=1, **PROJECTIONS[projection])
        draw(engine, x)
        if cut_short:
            model.blocks(2 * x)  # both points run, the output does not
            engine.reset()
        F.cross_entropy(ran(model(x), projection), y).backward()
        results.append(grads(model))
    assert results[1].keys() == results[0].keys()
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, msg=name)


def test_the_callback_resets_the_engine_at_each_training_batch_start():
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    model = MLP(5, 3, hidden=[8, 8])
    strategy = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], seed=0, verbose=False)
    strategy.engine = FeedbackEngine(model, ["blocks.*"], seed=0)
    model.blocks(torch.randn(4, 5))  # points pending: their forward never reached the output
    assert strategy.engine._pending.index == [0, 1]
    strategy.on_train_batch_start(None, None, None, 0)
    assert strategy.engine._pending.index == [] and strategy.engine._pending.tensors == []


def test_points_come_in_the_models_order_once_each_whatever_the_order_of_the_specs():
    """The order of the points is the column layout of B: a recipe listing them otherwise draws the same B."""
    engine = FeedbackEngine(MLP(4, 2, hidden=[3, 3, 3]), ["blocks.2", "blocks.0", "blocks.*"])
    assert [p.name for p in engine.points] == ["blocks.0", "blocks.1", "blocks.2"]


def test_a_glob_question_mark_matches_one_character_inside_one_name_component():
    assert glob_match("blocks.1", "blocks.?") and not glob_match("blocks.10", "blocks.?")
    assert not glob_match("blocks.1", "blocks?1")  # `?` does not stand for the dot


@pytest.mark.parametrize("key, value", [("method", "dfa2"), ("init", "xavier"), ("scale", "unit"),
                                        ("operator", "denze"), ("error", "signed"), ("projection", "fuse"),
                                        ("feedback_norm", "batch")])
def test_every_choice_valued_setting_is_checked_when_the_rule_is_made(key, value):
    """A typo is named while the recipe is read; `projection: fuse` would otherwise run fused without a word, the
    others fail only at setup or at the first backward."""
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    with pytest.raises(ConfigError, match=rf"FeedbackAlignmentStrategy: {key} must be one of .*got '{value}'"):
        FeedbackAlignmentStrategy(feedback_points=["blocks.*"], **{key: value})


def test_a_sparse_operator_with_exactly_as_many_non_zeros_as_the_error_is_wide_is_warned_about():
    engine = FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], operator="sparse", nnz=3, seed=0)
    with pytest.warns(UserWarning, match=r"sparse operator with nnz 3 for a 3-wide error"):
        draw(engine, torch.randn(4, 5))


def test_receiver_flops_count_the_lowrank_rank_and_each_points_own_product_of_shared_columns():
    """What ``receiver: auto`` weighs: a matmul receiver multiplies the point by the prepared error's width, r for
    lowrank (not d_out), and with shared columns every point pays its own product where tokens pay one, the widest."""
    x = torch.randn(32, 5)
    lowrank = FeedbackEngine(MLP(5, 40, hidden=[8, 6]), ["blocks.*"], operator="lowrank", rank=4,
                             projection="per_point")
    assert lowrank.calibrate(lambda: lowrank.model(x).sum())["receiver_flops"] == 2 * 32 * 4 * (8 + 6)
    shared = FeedbackEngine(MLP(5, 3, hidden=[8, 6]), ["blocks.*"], shared_slices=True, projection="per_point")
    assert shared.calibrate(lambda: shared.model(x).sum())["receiver_flops"] == 2 * 32 * 3 * ((8 + 6) + 6)


def test_an_auto_projection_runs_fused_until_calibrated():
    model, x = MLP(5, 3, hidden=[8, 8]), torch.randn(4, 5)
    engine = FeedbackEngine(model, ["blocks.*"], seed=0)
    draw(engine, x)  # B drawn: per point would be possible, but nothing has measured the step
    assert engine.mode == "fused"
    ran(model(x), "fused")


def test_calibrate_measures_its_own_forward_after_earlier_ones_and_counts_parameters_with_their_gradients():
    """The probe's rows, not those of a forward run before it; the step's memory is the saved activations, the
    parameters twice (their gradients) and the optimizer's state."""
    model = MLP(4, 2, hidden=[8, 8])
    engine = FeedbackEngine(model, ["blocks.*"], seed=0)
    model(torch.randn(3, 4))  # an earlier forward on another batch size
    c = engine.calibrate(lambda: model(torch.randn(32, 4)).sum(), optimizer_state_bytes=1000)
    assert c["fused_signal_bytes"] == 32 * 16 * 8  # fp64 signals for 32 rows of 8 + 8 columns
    assert c["parameter_bytes"] == sum(p.numel() for p in model.parameters()) * 8
    step = c["saved_activation_bytes"] + 2 * c["parameter_bytes"] + 1000
    assert c["fused_fraction"] == pytest.approx(c["fused_signal_bytes"] / step)


def test_a_point_without_the_last_batch_dim_is_named():
    """``batch_dims [0, 2]`` on a ``[N, d]`` point: dim 2 does not exist (an IndexError from ``movedim``)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
    FeedbackEngine(model, ["1"], batch_dims=[0, 2])
    with pytest.raises(ConfigError, match=r"feedback point '1' output has shape \(2, 6\), fewer dims than batch_dims "
                                          r"\[0, 2\]"):
        model(torch.randn(2, 4))


def test_a_loaded_feedback_matrix_must_fit_the_widths_and_is_kept_in_fp32():
    engine = FeedbackEngine(MLP(5, 3, hidden=[8, 8]), ["blocks.*"], seed=0)
    draw(engine, torch.randn(4, 5))
    with pytest.raises(ConfigError, match=r"feedback matrix shape \(3, 15\) does not fit this model \(expected "
                                          r"\(3, 16\): d_out x feedback columns\)"):
        engine.set_matrix(torch.zeros(3, 15))
    engine.set_matrix(torch.ones(3, 16, dtype=torch.float64))
    assert engine.feedback_state()["matrix"].dtype == torch.float32  # what the checkpoint and the rank check read


def test_the_output_module_cannot_also_be_a_feedback_point():
    with pytest.raises(ConfigError, match=r"module 'head' is both the output and a feedback point"):
        FeedbackEngine(MLP(5, 3, hidden=[8]), ["head"], output="head")


def test_nested_feedback_points_are_refused():
    """A block and a layer inside it: the inner point's signal would be cut off by the outer one's."""
    with pytest.raises(ConfigError, match=r"feedback points 'blocks.0' and 'blocks.0.0' are nested; choose one"):
        FeedbackEngine(MLP(5, 3, hidden=[8]), ["blocks.0", "blocks.0.0"])


def test_an_output_module_the_model_does_not_have_is_named_with_the_modules_it_has():
    with pytest.raises(ConfigError, match=r"output module 'heads' not found in MLP; modules: blocks, blocks.0"):
        FeedbackEngine(MLP(5, 3, hidden=[8]), ["blocks.*"], output="heads")


def test_method_fa_is_refused_and_a_named_rules_setting_error_names_the_rule():
    from dfa_lightning.callbacks import FeedbackAlignmentStrategy

    with pytest.raises(ConfigError, match=r"method 'fa' \(layer-to-layer feedback alignment\) is not implemented"):
        FeedbackAlignmentStrategy(method="fa", feedback_points=["blocks.*"])
    with pytest.raises(ConfigError, match=r"FeedbackAlignmentStrategy 'coarse': init must be one of"):
        FeedbackAlignmentStrategy(feedback_points=["blocks.*"], init="xavier", name="coarse")


class _SharedActivation(nn.Module):
    """One ReLU module after layers of widths 8 and 6 (a point called twice, at two widths)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head, self.relu = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3), nn.ReLU()

    def forward(self, x):
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_a_point_used_at_two_widths_is_named_at_the_probe():
    model = _SharedActivation()
    engine = FeedbackEngine(model, ["torch.nn.ReLU"])
    engine.capture = {}
    with pytest.raises(ConfigError, match=r"'relu' \(ReLU\) output is 6 wide .* was 8 wide .* a module per layer"):
        engine.calibrate(lambda: model(torch.randn(4, 5)).sum())


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_a_point_used_at_two_widths_is_named_in_a_step_without_a_probe(projection):
    """Without a probe (an engine driven by hand), the step names the point: matmul receivers in the forward, the
    others in the backward, where torch's reshape or matmul error named nothing."""
    model = _SharedActivation()
    engine = FeedbackEngine(model, ["torch.nn.ReLU"], **PROJECTIONS[projection])
    x = torch.randn(4, 5)
    draw(engine, x)
    with pytest.raises(ConfigError, match=r"'relu' \(ReLU\) output is 6 wide .* was 8 wide"):
        model(x).sum().backward()


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_a_sequence_length_that_changes_between_batches_is_named_with_the_batch_dims_that_fit(projection):
    """A tagger's [batch, tokens, classes] output with batch_dims [0]: its width is tokens x classes, so B was
    sized for the first batch's length; a longer batch met torch's "mat1 and mat2 shapes cannot be multiplied"."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = FeedbackEngine(model, ["1"], batch_dims=[0], **PROJECTIONS[projection])
    draw(engine, torch.randn(2, 5, 4))
    model(torch.randn(2, 5, 4)).sum().backward()  # the length B was sized for
    engine.reset()
    with pytest.raises(ConfigError, match=r"wide .* was (15|40) wide .* belongs in batch_dims.*\[0, 1\]"):
        model(torch.randn(2, 7, 4)).sum().backward()


def test_a_point_called_twice_reports_every_calls_segment_and_its_count():
    """A block applied twice (weight sharing): the layer under its first call gets B e through that call; the
    report listed it as trained by backprop from the output, from the last call's segment alone."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.head = nn.Linear(5, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.block(self.block(self.inp(x))))

    model = Twice()
    engine = FeedbackEngine(model, ["block"])
    engine.capture = {}
    engine.calibrate(lambda: model(torch.randn(6, 5)).sum())
    engine.record_segments()
    engine.capture = None
    assert engine.segments["block"] == ["block.0.bias", "block.0.weight", "inp.bias", "inp.weight"]
    report = engine.report()
    assert "called 2x per forward" in report
    assert "backprop from the output: 15 params (head.bias, head.weight)" in report
    assert engine.capture_calls == {}  # ending the capture drops every call's graph


def test_a_point_inside_a_reentrant_checkpoint_is_warned_about_at_the_probe():
    """``checkpoint(use_reentrant=True)`` runs the block without grad and reruns it in the backward, where the cut
    leaves torch's "none of output has requires_grad=True", which does not say why."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.head = nn.Linear(5, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant))

    model = Checkpointed()
    engine = FeedbackEngine(model, ["block"])
    for reentrant in (True, False):
        model.reentrant, engine.capture = reentrant, {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.calibrate(lambda: model(torch.randn(4, 5)).sum())
        engine.capture = None
        named = [w for w in caught if "use_reentrant=False" in str(w.message)]
        assert len(named) == (1 if reentrant else 0)


def test_a_point_the_forward_never_calls_is_named_at_the_first_training_forward():
    """After a probe that did not see it (eval mode), the first training forward is where it must have run."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.spare, self.head = nn.Linear(5, 4), nn.Tanh(), nn.Tanh(), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.act(self.fc(x)))

    model = Unused()
    engine = FeedbackEngine(model, ["act", "spare"])
    engine.capture = {}
    engine.calibrate(lambda: model(torch.randn(4, 5)).sum())  # the probe lets it pass: it may run in training only
    engine.capture = None
    assert engine.operator is None
    with pytest.raises(ConfigError, match=r"never ran before the output in a training forward: spare"):
        model(torch.randn(4, 5))


@pytest.mark.parametrize("method", ["dfa", "shallow"])
def test_a_weight_tied_across_the_points_is_reported_as_trained_from_the_output(method):
    """Tied embeddings: the report counted the embedding as below the points (under shallow: "frozen"), though the
    tied decoder above them trains it by backprop."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.block = nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh())

        def forward(self, tokens):
            return self.block(self.emb(tokens)) @ self.emb.weight.t()

    model = Tied()
    engine = FeedbackEngine(model, ["block"], method=method)
    engine.capture = {}
    engine.calibrate(lambda: model(torch.randint(0, 10, (6,))).sum())
    engine.record_segments()
    engine.capture = None
    report = engine.report()
    assert "tied across the points, trained by backprop from the output" in report and "40 params (emb.weight)" in report
    assert "in 2 tensors" in report  # below: block.0's weight and bias, not the embedding


def test_a_point_whose_batch_dims_are_laid_out_otherwise_than_the_outputs_is_refused():
    """A sequence-first block ([T, B, H]) in a batch-first model ([B, T, V]) has as many rows as the output over
    ``batch_dims: [0, 1]``: row (t, b) took the B e of the output's row (b, t), another token's error, unsaid."""

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.act, self.head = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.act(self.emb(x).transpose(0, 1)).transpose(0, 1))

    x = torch.randn(2, 3, 4)
    for projection in PROJECTIONS.values():
        engine = FeedbackEngine(SequenceFirst(), ["act"], batch_dims=[0, 1], **projection)
        draw(engine, x)
        with pytest.raises(ConfigError, match=re.escape("feedback point 'act' is [3, 2] over batch_dims [0, 1] and the "
                                                        "output [2, 3]: the same rows in another layout")):
            engine.model(x).sum().backward()
    engine = FeedbackEngine(SequenceFirst(), ["act"], batch_dims=[0, 1])
    engine.capture = {}
    with pytest.raises(ConfigError, match=re.escape("is [3, 2] over batch_dims [0, 1] and the output [2, 3]")):
        engine.calibrate(lambda: engine.model(x))  # the probe says it before the first step


@pytest.mark.parametrize("shape, said", [((4,), "no feature dim"), ((4, 1), "one feature")])
def test_a_feedback_norm_on_a_point_with_fewer_than_two_features_is_refused(shape, said):
    """LayerNorm over no feature dim was torch's "normalized_shape to be at least 1-dimensional"; over one feature
    its backward is zero: the point got no feedback at all."""

    class Squeeze(nn.Module):
        def forward(self, h):
            return h.sum(-1) if len(shape) == 1 else h.sum(-1, keepdim=True)

    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), Squeeze(), nn.Identity())
    engine = FeedbackEngine(model, ["3"], feedback_norm="layer", output="4")
    with pytest.raises(ConfigError, match=re.escape(f"feedback_norm 'layer' at feedback point '3': its output {shape} "
                                                    f"has {said} beyond batch_dims [0]")):
        draw(engine, torch.randn(4, 5))


def test_dfa_without_feedback_points_is_refused_by_the_engine_itself():
    with pytest.raises(ConfigError, match=r"method 'dfa' needs feedback_points"):
        FeedbackEngine(MLP(5, 3, hidden=[8]), [])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_error_through_sparse_feedback_on_the_cpu_projects_in_fp32(dtype):
    """The CPU has no half-precision sparse CSR matmul: ``projection_dtype: gradient`` under AMP died in the first
    backward with torch's "addmm_out_sparse_csr_impl_mkl not implemented for 'BFloat16'"."""
    from dfa_lightning.feedback import matrices

    lay = matrices.layout([5, 3], "per_layer", False)
    op = operators.draw_operator("sparse", 6, lay, "uniform", 0, False, rank=1, nnz=2)
    e = torch.randn(4, 6)
    half = op.project(e.to(dtype))
    assert half.dtype == dtype
    torch.testing.assert_close(half, op.project(e.to(dtype).double()).to(dtype))
    torch.testing.assert_close(op.project_slice(e.to(dtype), 5, 8), op.project_slice(e.to(dtype).double(), 5, 8)
                               .to(dtype))
