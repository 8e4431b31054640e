"""Fast CPU tests of the NeRF MLP, the Transformer LM and the plain MLP: shapes, causality, feedback-point names,
trainability."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from dfa_lightning.errors import ConfigError
from dfa_lightning.models import nerf, transformer
from dfa_lightning.models.mlp import MLP
from dfa_lightning.models.nerf import NeRFMLP, PositionalEncoding
from dfa_lightning.models.transformer import TransformerLM

V = 11


def tiny_lm(**kw) -> TransformerLM:
    args = dict(vocab_size=V, d_model=16, n_heads=2, d_ff=32, n_layers=2, dropout=0.1, max_len=32)
    return TransformerLM(**(args | kw))


def tiny_nerf(**kw) -> NeRFMLP:
    return NeRFMLP(**({"num_layers": 4, "hidden": 16, "skip": 1} | kw))


def matched(model: nn.Module, pattern: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n and fnmatch.fnmatch(n, pattern)]


def outputs_of(model: nn.Module, names: list[str], *inputs) -> dict[str, object]:
    """Run the model once and return each named module's forward output."""
    seen, mods = {}, dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in names]
    model(*inputs)
    for h in handles:
        h.remove()
    return seen


# ------------------------------------------------------------------------------------------------ NeRF
def test_positional_encoding_dims():
    x = torch.randn(5, 7, 3)
    assert PositionalEncoding(10).out_dim == 63 and PositionalEncoding(10)(x).shape == (5, 7, 63)
    assert PositionalEncoding(4).out_dim == 27 and PositionalEncoding(4)(x).shape == (5, 7, 27)
    enc = PositionalEncoding(2)(x)
    torch.testing.assert_close(enc[..., :3], x)  # raw input first
    torch.testing.assert_close(enc[..., 3:6], torch.sin(x))  # then sin(2^0 x), cos(2^0 x), sin(2^1 x), ...
    torch.testing.assert_close(enc[..., 12:15], torch.cos(2 * x))
    assert PositionalEncoding(4, include_input=False).out_dim == 24


def test_nerf_shapes_and_broadcast_directions():
    m = NeRFMLP()  # default 8x256, skip at 4
    assert len(m.trunk) == 8 and m.trunk[5].in_features == 256 + 63 and m.views[0].in_features == 256 + 27
    pts, dirs = torch.randn(3, 5, 3), torch.randn(3, 1, 3)  # [R, S, 3] samples, [R, 1, 3] per-ray directions
    assert m(pts, dirs).shape == (3, 5, 4)
    assert m(torch.randn(7, 3), torch.randn(7, 3)).shape == (7, 4)


def test_nerf_skip_on_off():
    with_skip, no_skip = tiny_nerf(skip=1), tiny_nerf(skip=None)
    assert [layer.in_features for layer in with_skip.trunk] == [63, 16, 16 + 63, 16]
    assert [layer.in_features for layer in no_skip.trunk] == [63, 16, 16, 16]
    paper = NeRFMLP(num_layers=4, hidden=128, skip=None)  # the released checkpoints' shape
    assert paper.trunk[0].weight.shape == (128, 63) and paper.views[0].weight.shape == (64, 155)
    for bad in (3, 4, -1):
        with pytest.raises(ConfigError):
            tiny_nerf(skip=bad)


def test_nerf_feedback_points_are_single_tensors():
    m = tiny_nerf()
    pts, dirs = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    for pattern in nerf.FEEDBACK_POINTS["paper"]:
        names = matched(m, pattern)
        assert names, pattern
        for name, out in outputs_of(m, names, pts, dirs).items():
            assert isinstance(out, torch.Tensor) and out.shape[:2] == (2, 3), name
            assert (out >= 0).all(), f"{name} must be post-ReLU"
    assert matched(m, "trunk.*") == ["trunk.0", "trunk.1", "trunk.2", "trunk.3"]  # no sub-layers matched


# ------------------------------------------------------------------------------------------------ Transformer
@pytest.mark.parametrize("kw", [{}, {"norm": "pre", "pos_encoding": "learned", "activation": "gelu"}])
def test_lm_shapes(kw):
    m = tiny_lm(**kw)
    assert m(torch.randint(0, V, (3, 9))).shape == (3, 9, V)


def test_lm_tied_embeddings():
    m = tiny_lm(tie_embeddings=True)
    assert m.decoder.weight is m.tok_emb.weight
    assert m(torch.randint(0, V, (1, 4))).shape == (1, 4, V)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lm_causal(norm):
    m = tiny_lm(norm=norm).eval()
    idx = torch.randint(0, V, (2, 10))
    idx2 = idx.clone()
    idx2[:, 6] = (idx[:, 6] + 1) % V
    with torch.no_grad():
        a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_lm_dropout_eval_deterministic():
    m = tiny_lm(dropout=0.5)
    idx = torch.randint(0, V, (2, 8))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(idx), m(idx), rtol=0, atol=0)
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(idx), m(idx))


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("variant", ["macro", "micro"])
def test_lm_feedback_points_are_single_tensors(norm, variant):
    m = tiny_lm(norm=norm)
    idx = torch.randint(0, V, (2, 5))
    for pattern in transformer.FEEDBACK_POINTS[variant]:
        names = matched(m, pattern)
        assert len(names) == 2, (pattern, names)  # one per block, nothing else
        for name, out in outputs_of(m, names, idx).items():
            assert isinstance(out, torch.Tensor) and out.shape[:2] == (2, 5), name
            assert out.shape[-1] == (32 if name.endswith("ffn.act") else 16), name
    hidden = transformer.ERROR_AT["before_vocab"]
    assert matched(m, hidden) == [hidden]
    assert outputs_of(m, [hidden], idx)[hidden].shape == (2, 5, 16)
    assert transformer.ERROR_AT["after_vocab"] is None


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lm_points_cut_every_path(norm):
    """Detaching every micro point's output (as the DFA engine does) leaves no path around a point, residual included:
    the loss reaches only the layers above the last point, and a gradient fed into one point reaches only its segment.
    """
    m = tiny_lm(norm=norm, dropout=0.0)
    names = [n for p in transformer.FEEDBACK_POINTS["micro"] for n in matched(m, p)]
    mods, kept = dict(m.named_modules()), {}

    def cut(name):
        def hook(mod, inputs, out):
            kept[name] = out
            return out.detach().requires_grad_()

        return hook

    handles = [mods[n].register_forward_hook(cut(n)) for n in names]
    m(torch.randint(0, V, (2, 5))).sum().backward()
    for h in handles:
        h.remove()
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in m.named_parameters() if n.startswith(("decoder", "ln_f"))}

    m.zero_grad(set_to_none=True)
    kept["blocks.1.attn_out"].sum().backward()  # the segment between blocks.0.out and blocks.1.attn_out
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in m.named_parameters() if n.startswith(("blocks.1.attn.", "blocks.1.ln_1"))}


def test_lm_bad_config():
    for kw in ({"norm": "mid"}, {"pos_encoding": "rope"}, {"activation": "tanh"}, {"n_heads": 3}):
        with pytest.raises(ConfigError):
            tiny_lm(**kw)
    with pytest.raises(ValueError):
        tiny_lm()(torch.zeros(1, 33, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ trainability
def _fit(model: nn.Module, inputs, loss_fn, steps: int = 30) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(*inputs))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_nerf_bp_reduces_loss():
    torch.manual_seed(0)
    pts, dirs = torch.rand(64, 3), torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    target = torch.cat((torch.sin(3 * pts), pts.norm(dim=-1, keepdim=True)), dim=-1)  # [64, 4]
    first, last = _fit(tiny_nerf(), (pts, dirs), lambda y: torch.nn.functional.mse_loss(y, target))
    assert last < 0.5 * first


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lm_bp_reduces_loss(norm):
    torch.manual_seed(0)
    idx = torch.randint(0, V, (4, 12))
    m = tiny_lm(norm=norm, dropout=0.0)
    ce = lambda y: torch.nn.functional.cross_entropy(y.reshape(-1, V), idx[:, 1:].reshape(-1))  # noqa: E731
    first, last = _fit(m, (idx[:, :-1],), ce)
    assert last < 0.75 * first


def test_positional_encoding_linear_sampling_spaces_frequencies_evenly_from_1_to_2_pow_l_minus_1():
    x = torch.randn(2, 3)
    enc = PositionalEncoding(4, include_input=False, log_sampling=False)(x)
    for k, f in enumerate((1.0, 1.0 + 7 / 3, 1.0 + 14 / 3, 8.0)):  # linspace(2^0, 2^3, 4)
        torch.testing.assert_close(enc[..., 6 * k: 6 * k + 3], torch.sin(f * x))
        torch.testing.assert_close(enc[..., 6 * k + 3: 6 * k + 6], torch.cos(f * x))


def test_nerf_skip_feeds_the_encoded_input_first_then_the_hidden_features():
    """Mildenhall et al.'s ``cat([input_pts, h])``: the order fixes which weight columns see the input."""
    m = tiny_nerf(skip=1)
    pts, dirs = torch.randn(5, 3), torch.randn(5, 3)
    seen = {}
    m.trunk[2].register_forward_pre_hook(lambda mod, args: seen.__setitem__("in", args[0]))
    h1 = outputs_of(m, ["trunk.1"], pts, dirs)["trunk.1"]
    torch.testing.assert_close(seen["in"], torch.cat((m.pe_xyz(pts), h1), dim=-1))


def test_nerf_density_comes_from_the_trunk_alone_and_colour_depends_on_the_view_direction():
    torch.manual_seed(0)
    m = tiny_nerf()
    pts = torch.randn(6, 3)
    d1, d2 = torch.randn(6, 3), torch.randn(6, 3)
    with torch.no_grad():
        a, b = m(pts, d1), m(pts, d2)
        trunk_out = outputs_of(m, ["trunk.3"], pts, d1)["trunk.3"]
        torch.testing.assert_close(a[..., 3:], m.sigma_head(trunk_out))  # sigma = sigma_head(trunk), no view input
    torch.testing.assert_close(a[..., 3], b[..., 3])
    assert not torch.allclose(a[..., :3], b[..., :3])  # the view branch sees the direction
    assert (m.sigma_head.bias == 0).all()  # zero bias: a negative draw left every density below the ReLU


def _blocks_input(m: TransformerLM, idx: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        m(idx)
    handle.remove()
    return seen["x"]


def test_lm_input_is_the_embedding_scaled_by_sqrt_d_model_plus_the_sinusoidal_positions():
    m = tiny_lm(dropout=0.0).eval()
    idx = torch.randint(0, V, (2, 9))
    pos, i = torch.arange(9.0).unsqueeze(1), torch.arange(0, 16, 2)
    angle = pos / 10000 ** (i / 16)  # [T, C/2]
    pe = torch.stack((torch.sin(angle), torch.cos(angle)), dim=-1).flatten(1)  # sin at even, cos at odd channels
    torch.testing.assert_close(_blocks_input(m, idx), m.tok_emb.weight[idx] * 4.0 + pe)


def test_lm_learned_positions_add_row_t_of_the_position_table_at_position_t():
    m = tiny_lm(dropout=0.0, pos_encoding="learned").eval()
    idx = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(_blocks_input(m, idx), m.tok_emb.weight[idx] * 4.0 + m.pos.emb.weight[:7])


def test_lm_embedding_and_decoder_start_uniform_in_0_1_with_a_zero_decoder_bias():
    m = TransformerLM(vocab_size=500, d_model=16, n_heads=2, d_ff=32, n_layers=1)
    for w in (m.tok_emb.weight, m.decoder.weight):
        assert w.abs().max() <= 0.1 and w.abs().max() > 0.09  # U(-0.1, 0.1), as word_language_model
    assert (m.decoder.bias == 0).all()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_lm_block_and_head_follow_post_and_pre_ln_residuals(norm):
    """post: a = LN1(x + Attn(x)), y = LN2(a + FFN(a)), logits = dec(y); pre: a = x + Attn(LN1 x),
    y = a + FFN(LN2 a), logits = dec(ln_f(y))."""
    m = tiny_lm(norm=norm, dropout=0.0, n_layers=1).eval()
    idx = torch.randint(0, V, (2, 6))
    x = _blocks_input(m, idx)
    blk = m.blocks[0]
    with torch.no_grad():
        if norm == "post":
            a = blk.ln_1(x + blk.attn(x))
            y = blk.ln_2(a + blk.ffn(a))
            h = y
        else:
            a = x + blk.attn(blk.ln_1(x))
            y = a + blk.ffn(blk.ln_2(a))
            h = torch.nn.functional.layer_norm(y, (16,))  # ln_f, at its initial affine (1, 0)
        torch.testing.assert_close(blk(x), y)
        torch.testing.assert_close(m(idx), m.decoder(h))


def test_lm_ffn_hidden_activation_has_dropout_in_training_only():
    m = tiny_lm(dropout=0.5)
    x = torch.randn(2, 5, 16)
    ffn = m.blocks[0].ffn
    relu = torch.relu(ffn.fc(x))
    m.train()
    assert not torch.equal(ffn.act(ffn.fc(x)), relu)
    m.eval()
    torch.testing.assert_close(ffn.act(ffn.fc(x)), relu)


def test_lm_micro_preset_has_three_points_per_block_and_macro_one():
    """``micro`` is the paper's ``--dfa full``: attention output, FFN hidden activation and block output."""
    m = tiny_lm()
    names = lambda variant: sorted(n for p in transformer.FEEDBACK_POINTS[variant] for n in matched(m, p))  # noqa: E731
    assert names("micro") == [f"blocks.{i}.{p}" for i in (0, 1) for p in ("attn_out", "ffn.act", "out")]
    assert names("macro") == ["blocks.0.out", "blocks.1.out"]


def test_lm_takes_sequences_of_exactly_max_len_tokens():
    m = tiny_lm(pos_encoding="learned")
    assert m(torch.zeros(1, 32, dtype=torch.long)).shape == (1, 32, V)
    assert tiny_lm()(torch.zeros(1, 32, dtype=torch.long)).shape == (1, 32, V)


# ------------------------------------------------------------------------------------------------ MLP
def test_mlp_blocks_are_linear_activation_then_dropout_only_when_asked_and_hidden_empty_is_linear():
    with_drop = MLP(16, 4, hidden=[8], activation="tanh", dropout=0.3)
    assert [type(layer) for layer in with_drop.blocks[0]] == [nn.Linear, nn.Tanh, nn.Dropout]
    assert with_drop.blocks[0][2].p == 0.3
    assert [type(layer) for layer in MLP(16, 4, hidden=[8]).blocks[0]] == [nn.Linear, nn.ReLU]
    linear = MLP(16, 4, hidden=[])  # no hidden layer: logistic regression
    assert len(linear.blocks) == 0 and linear.head.in_features == 16
    assert [b[0].out_features for b in MLP(16, 4).blocks] == [256, 256]
