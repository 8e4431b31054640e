"""Weight transport (reviewer 3): which weights' transposes a real training step uses to carry error backward."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dfa_lightning import transport_map
from dfa_lightning.callbacks import FeedbackAlignmentStrategy, WeightTransportAudit
from dfa_lightning.callbacks.weight_transport import transported_parameters
from dfa_lightning.feedback.engine import FeedbackEngine
from dfa_lightning.models.mlp import MLP
from dfa_lightning.models.transformer import TransformerLM
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.language_modeling import LanguageModeling
from helpers import FirstOfSeveralLoaders, build, params, trainer
from conftest import REPO


def audited_mlp(tmp_path, method: str, max_steps: int = 1) -> tuple[TaskModule, WeightTransportAudit]:
    module, data, strategy = build(method)
    audit = WeightTransportAudit(verbose=False)
    trainer(tmp_path, [strategy, audit], max_steps=max_steps).fit(module, data)
    return module, audit


def by_name(audit: WeightTransportAudit) -> dict[str, object]:
    return {m.name: m for m in audit.modules}


def test_backprop_transports_every_weight_but_the_first_layers_whose_input_is_data(tmp_path):
    _, audit = audited_mlp(tmp_path, "bp")
    mods = by_name(audit)
    linears = [n for n, m in mods.items() if m.type == "Linear"]
    assert linears == ["blocks.0.0", "blocks.1.0", "head"]
    assert not mods["blocks.0.0"].transported  # its input is the data: no gradient asked for
    assert mods["blocks.1.0"].transported and mods["head"].transported
    t = audit.totals()
    assert t["transported_matrix_params"] == 32 * 32 + 32 * 4 and t["matrix_params"] == 16 * 32 + 32 * 32 + 32 * 4
    assert t["trained_matrix_params"] == t["matrix_params"]
    assert audit.rules == ["bp"]


def test_dfa_with_a_point_after_every_layer_uses_no_weight_transpose_yet_trains_every_weight(tmp_path):
    _, audit = audited_mlp(tmp_path, "dfa")
    t = audit.totals()
    assert t["transported_matrix_params"] == 0 and t["transported_modules"] == 0
    assert t["trained_matrix_params"] == t["matrix_params"] > 0
    mods = by_name(audit)
    assert mods["blocks.0.0"].segment == "blocks.0" and mods["blocks.1.0"].segment == "blocks.1"
    assert mods["head"].segment == "__output__"
    assert [p for p, _ in audit.points] == ["blocks.0", "blocks.1"]


def test_shallow_freezes_the_layers_below_the_points_and_transports_nothing(tmp_path):
    _, audit = audited_mlp(tmp_path, "shallow")
    mods = by_name(audit)
    assert not mods["blocks.0.0"].trained and not mods["blocks.1.0"].trained and mods["head"].trained
    assert audit.totals()["transported_matrix_params"] == 0


def test_the_audit_leaves_the_training_trajectory_unchanged(tmp_path):
    plain, data, strategy = build("dfa")
    trainer(tmp_path / "plain", [strategy], max_steps=3).fit(plain, data)
    audited, audit = audited_mlp(tmp_path / "audited", "dfa", max_steps=3)
    assert audit.modules  # the first step was audited
    for name, value in params(plain).items():
        assert torch.equal(value, params(audited)[name]), name


def lm_audit(tmp_path, norm: str, points: list[str], tie: bool = False) -> WeightTransportAudit:
    torch.manual_seed(0)
    x, y = torch.randint(0, 50, (32, 8)), torch.randint(0, 50, (32, 8))
    model = TransformerLM(50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=8, norm=norm, tie_embeddings=tie)
    module = TaskModule(model, LanguageModeling())
    dfa = FeedbackAlignmentStrategy(feedback_points=points, output="hidden_out", batch_dims=[0, 1], verbose=False)
    audit = WeightTransportAudit(verbose=False)
    trainer(tmp_path, [dfa, audit], max_steps=1).fit(module, train_dataloaders=DataLoader(TensorDataset(x, y),
                                                                                        batch_size=32))
    return audit


def test_macro_dfa_still_transports_inside_each_block_and_through_the_vocabulary_head(tmp_path):
    """Post-LN, error before the vocabulary: B e enters each block at its output and reaches the block's weights
    through the FFN's and attention's transposes; e itself is computed through the decoder's W^T. Block 1's qkv
    reads block 0's cut output: nothing carries error through it."""
    mods = by_name(lm_audit(tmp_path, "post", ["blocks.*.out"]))
    for i in (0, 1):
        assert mods[f"blocks.{i}.ffn.proj"].transported and mods[f"blocks.{i}.ffn.fc"].transported
        assert mods[f"blocks.{i}.attn.proj"].transported
    assert mods["blocks.0.attn.qkv"].transported  # its input (the embeddings) is trained: it needs the gradient
    assert not mods["blocks.1.attn.qkv"].transported
    assert mods["decoder"].transported and mods["decoder"].segment is None  # trained by the loss directly
    assert not mods["tok_emb"].transported and mods["tok_emb"].segment == "blocks.0.out"


def test_micro_dfa_removes_the_ffn_transposes_and_pre_ln_adds_the_qkv_ones(tmp_path):
    micro = by_name(lm_audit(tmp_path / "micro", "post", ["blocks.*.attn_out", "blocks.*.ffn.act", "blocks.*.out"]))
    assert not micro["blocks.1.ffn.fc"].transported and not micro["blocks.1.ffn.proj"].transported
    assert micro["blocks.1.attn.proj"].transported  # attention's internals still carry error (reviewer 3's example)
    pre = by_name(lm_audit(tmp_path / "pre", "pre", ["blocks.*.out"]))
    assert pre["blocks.1.attn.qkv"].transported  # its input is ln_1(x): the LayerNorm's scale needs the gradient


def test_tied_weights_count_once_and_as_transported_when_any_owner_uses_them(tmp_path):
    audit = lm_audit(tmp_path, "post", ["blocks.*.out"], tie=True)
    mods = by_name(audit)
    assert mods["decoder"].transported and mods["tok_emb"].transported  # one matrix: the decoder reads it back
    t = audit.totals()
    untied = lm_audit(tmp_path / "untied", "post", ["blocks.*.out"]).totals()
    assert t["matrix_params"] == untied["matrix_params"] - 50 * 16  # one vocabulary matrix fewer
    assert t["transported_matrix_params"] == untied["transported_matrix_params"]  # the decoder's, now shared


class AttentionOverACutPoint(nn.Module):
    """A point, then ``nn.MultiheadAttention`` (which uses ``out_proj.weight`` through ``F.linear``, never calling
    ``out_proj``), then a head; plus a learned offset added to the input (an addition reads no weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(4, 8))
        self.embed = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x + self.offset)
        return self.head(self.attn(h, h, h, need_weights=False)[0]).mean(1)


def test_weights_used_outside_their_modules_forward_are_seen_and_additions_are_not_transport():
    model = AttentionOverACutPoint()
    x = torch.randn(5, 4, 8)
    params = dict(model.named_parameters())
    loss = model(x).square().mean()
    used = transported_parameters(loss, {id(p): n for n, p in params.items()})
    assert used >= {"attn.out_proj.weight", "attn.in_proj_weight", "head.weight"}  # out_proj only via F.linear
    assert "offset" not in used  # an addition's backward reads no operand
    assert "embed.weight" in used  # its W^T carries error down to the offset
    FeedbackEngine(model, ["embed"], scale="none")  # its hooks cut above embed: attn's input carries no gradient
    loss = model(x).square().mean()
    used = transported_parameters(loss, {id(p): n for n, p in params.items()})
    assert "attn.in_proj_weight" not in used and "attn.out_proj.weight" in used  # still used inside the block


@pytest.mark.parametrize("name, expected", [("blocks.3.attn.qkv", ("blocks.*.attn.qkv", "3")),
                                            ("mlp.0.1", ("mlp.*.1", "0")), ("decoder", ("decoder", "")),
                                            ("layer10", ("layer10", "")), ("0.weight_net", ("*.weight_net", "0"))])
def test_repeated_layers_fold_into_one_pattern(name, expected):
    assert transport_map.pattern(name) == expected


def test_transport_map_tabulates_real_recipes_on_cora(cora_root, tmp_path):
    out = tmp_path / "transport.md"
    extra = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    recipes = [str(REPO / f"recipes/gcn_{m}.yaml") for m in ("bp", "dfa", "shallow")]
    assert transport_map.main(["--recipes", *recipes, "--out", str(out), "--", *extra]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    totals = {r["rules"][0]: r["totals"] for r in data["results"]}
    assert totals["bp"]["transported_matrix_params"] == 16 * 7  # conv2's W^T carries error to conv1
    assert totals["dfa"]["transported_matrix_params"] == 0 and totals["dfa"]["trained_matrix_params"] == 1433 * 16 + 16 * 7
    assert totals["shallow"]["trained_matrix_params"] == 16 * 7
    text = out.read_text()
    assert "| gcn_bp | GCN | bp | 23,040 | 112 (0.5%) | 100% | 1 of 2 | 0 |" in text
    assert "| ◆ `hidden` | feedback point | width 16 | 1 | | receives B_i e; nothing from above crosses it |" in text
    assert "| `conv1.lin` | Linear | 22,928 | 1 | — | B e at hidden |" in text


def test_transport_map_names_a_missing_recipe_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert transport_map.main(["--recipes", str(missing), "--out", str(tmp_path / "t.md")]) == 2
    assert f"{missing}: recipe file not found" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


def test_a_weight_added_to_an_activation_that_needs_its_gradient_is_not_transported():
    """An addition's backward passes the gradient through without reading either operand (a learned offset on a
    hidden state, a bias added after a matmul)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"first": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    model.shift = nn.Parameter(torch.zeros(4))
    loss = model["head"](model["first"](torch.randn(3, 4)) + model.shift).square().mean()
    used = transported_parameters(loss, {id(p): n for n, p in model.named_parameters()})
    assert "head.weight" in used and "first.weight" not in used and "shift" not in used


def test_the_summary_and_the_counts_keep_matrices_scales_and_biases_apart(tmp_path):
    _, audit = audited_mlp(tmp_path, "bp")
    head = by_name(audit)["head"]
    assert (head.matrix_params, head.elementwise_params, head.other_params) == (32 * 4, 0, 4)  # a bias is no scale
    assert audit.summary() == ("WeightTransportAudit (bp): W^T used in the backward for 1,152 of 1,664 matrix "
                               "parameters (69%), in 2 of 3 modules: blocks.1.0, head; elementwise scales used: 0")


def test_a_norm_scale_read_by_the_backward_is_elementwise_transport_and_no_matrix_module(tmp_path):
    audit = lm_audit(tmp_path, "pre", ["blocks.*.out"])
    ln = by_name(audit)["blocks.0.ln_1"]  # its input, the embeddings, needs a gradient
    assert ln.transported and (ln.matrix_params, ln.elementwise_params, ln.other_params) == (0, 16, 16)
    t = audit.totals()
    assert t["transported_elementwise_params"] >= 16
    matrix_modules = [m for m in audit.modules if m.matrix_params]
    transported = sum(m.transported for m in matrix_modules)
    assert t["transported_modules"] == transported < sum(m.transported for m in audit.modules)


def test_the_indices_of_repeated_layers_print_as_ranges():
    assert transport_map._ranges(["0", "1", "2", "5"]) == "0-2, 5"
    assert transport_map._ranges(["3", "1", "2"]) == "1-3" and transport_map._ranges(["7"]) == "7"



def test_the_audit_stops_the_engine_capturing_activations_once_its_step_has_learned_the_segments(tmp_path):
    """With several training loaders there is no probe batch, so the audited step captures the points' outputs to
    learn the segments; left on, every later forward would keep a step of activations alive."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    loaders = [DataLoader(TensorDataset(x, y), batch_size=16) for _ in range(2)]
    module = TaskModule(MLP(16, 4, hidden=[32, 32]), FirstOfSeveralLoaders(4))
    dfa = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], verbose=False)
    audit = WeightTransportAudit(verbose=False)
    trainer(tmp_path, [dfa, audit], max_steps=3).fit(module, train_dataloaders=loaders)
    assert by_name(audit)["blocks.1.0"].segment == "blocks.1"  # learnt from the audited step itself
    assert dfa.engine.capture is None
