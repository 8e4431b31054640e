"""The placement study (`python -m dfa_lightning.placements`): one DFA recipe, several feedback placements, on Cora."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch_geometric.data import Data

from dfa_lightning import placements
from dfa_lightning.callbacks import AlignmentMonitor, FeedbackAlignmentStrategy, FinalAlignment
from dfa_lightning.errors import ConfigError
from dfa_lightning.models.mlp import MLP
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks.classification import Classification

from tests.helpers import adam, build, trainer

REPO = Path(__file__).resolve().parents[1]


def test_each_placement_trains_with_its_own_points_and_reports_their_alignment(cora_root, tmp_path):
    out = tmp_path / "placements.md"
    extra = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
             "--trainer.max_epochs", "60"]
    argv = ["--recipe", str(REPO / "recipes/gcn_dfa.yaml"), "--placements", "paper=hidden", "before_relu=conv1",
            "--seeds", "0", "--out", str(out), "--root", str(tmp_path / "runs"), "--", *extra]
    assert placements.main(argv) == 0
    results = {r["label"]: r for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    assert results["paper"]["points"] == ["hidden"] and results["before_relu"]["points"] == ["conv1"]
    for label, point in (("paper", "hidden"), ("before_relu", "conv1")):
        r = results[label]
        assert r["order"] == [point]
        assert r["metrics"]["test/acc"] > 0.5  # 60 epochs of DFA on Cora learn (the largest class is 32 % of the test nodes)
        assert -1 <= r["alignment"][f"align/signal_cos/{point}"] <= 1
        assert -1 <= r["alignment"][f"align/update_cos/{point}"] <= 1
    text = out.read_text()
    assert "| paper | `hidden` |" in text and "| before_relu | `conv1` |" in text and "conv1 " in text
    # a second call finds every result.json and trains nothing again
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "runs").rglob("result.json")}
    assert len(stamps) == 2
    assert placements.main(argv) == 0
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "runs").rglob("result.json")} == stamps
    assert json.loads(out.with_suffix(".json").read_text())["results"] == list(results.values())


def test_a_recipe_without_a_dfa_rule_last_is_refused_before_training(tmp_path, capsys):
    argv = ["--recipe", str(REPO / "recipes/gcn_bp.yaml"), "--placements", "conv1", "--seeds", "0",
            "--out", str(tmp_path / "x.md"), "--root", str(tmp_path / "runs")]
    assert placements.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "gcn_bp.yaml" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spec", ["=conv1", "a/b=conv1", "label=", "label=,"])
def test_a_malformed_placement_names_itself(spec):
    with pytest.raises(ConfigError, match="--placements"):
        placements.parse_placement(spec)


def test_a_cached_run_is_reused_only_with_the_same_recipe_text_points_and_arguments(tmp_path):
    """The key held the recipe's path, not its text: an edited recipe got the old run's numbers back."""
    from dfa_lightning import studies

    (tmp_path / "callbacks").mkdir()
    fragment = tmp_path / "callbacks" / "dfa.yaml"
    fragment.write_text("class_path: x\n")
    recipe, overlay = tmp_path / "recipes" / "r.yaml", tmp_path / "o.yaml"
    recipe.parent.mkdir()
    recipe.write_text("trainer:\n  callbacks: [../callbacks/dfa.yaml]\n")
    overlay.write_text("a: 1\n")
    extra = ["--config", str(overlay)]
    digests = [studies.recipe_digest(recipe, extra)]
    fragment.write_text("class_path: y\n")  # a file the recipe includes
    digests.append(studies.recipe_digest(recipe, extra))
    overlay.write_text("a: 2\n")  # an overlay among the run arguments
    digests.append(studies.recipe_digest(recipe, extra))
    recipe.write_text(recipe.read_text() + "seed_everything: 1\n")  # the recipe itself
    digests.append(studies.recipe_digest(recipe, extra))
    assert len(set(digests)) == 4 and studies.recipe_digest(recipe, extra) == digests[-1]
    typed = tmp_path / "typed.yaml"  # the other spellings: `--config=FILE`, a fragment typed on the command line
    typed.write_text("class_path: z\n")
    for other in ([f"--config={overlay}"], [f"--trainer.callbacks+={typed}"], ["--trainer.callbacks+", str(typed)]):
        before = studies.recipe_digest(recipe, other)
        (overlay if "--config" in other[0] else typed).write_text(f"edited: {len(other)}\n" + other[0])
        assert studies.recipe_digest(recipe, other) != before, other
    cached = {"recipe": "r.yaml", "recipe_sha256": digests[-1], "points": ["conv1"], "extra": extra}
    assert studies.reusable(cached, dict(cached))
    for change in ({"recipe_sha256": digests[0]}, {"points": ["hidden"]}, {"extra": []}, {"recipe": "o.yaml"}):
        assert not studies.reusable(cached, {**cached, **change})


def test_placement_labels_default_to_their_patterns():
    assert placements.parse_placement("blocks.*.0") == ("blocks.*.0", ["blocks.*.0"])
    assert placements.parse_placement("pre=mlp.*.1, head") == ("pre", ["mlp.*.1", "head"])


@pytest.mark.parametrize("given", ["datamodule", "loader"])
def test_final_alignment_measures_tuple_batches_at_the_end_of_fit(tmp_path, given):
    module, data, strategy = build("dfa", optimizer=adam)
    final = FinalAlignment()
    fit = trainer(tmp_path, [strategy, final], max_epochs=1).fit
    if given == "datamodule":
        fit(module, datamodule=data)
    else:
        data.setup("fit")
        fit(module, train_dataloaders=data.train_dataloader())
    assert final.points == ["blocks.0", "blocks.1"] and final.deepest == "blocks.1"
    for point in final.points:
        assert 0 < final.alignment[f"align/update_ratio/{point}"]
        assert -1 <= final.alignment[f"align/signal_cos/{point}"] <= 1


def test_final_alignment_measures_in_training_mode_and_gives_the_module_back_in_its_mode(tmp_path, monkeypatch):
    module, data, strategy = build("dfa", optimizer=adam, dropout=0.2)
    final = FinalAlignment()
    tr = trainer(tmp_path, [strategy, final], max_steps=1)
    tr.fit(module, datamodule=data)
    modes, measure = [], AlignmentMonitor.measure
    monkeypatch.setattr(AlignmentMonitor, "measure", lambda self, pl_module, *a: modes.append(pl_module.training)
                        or measure(self, pl_module, *a))
    module.eval()
    final.on_train_end(tr, module)
    assert modes == [True] and not module.training and final.points == ["blocks.0", "blocks.1"]


def test_final_alignment_scores_every_node_of_a_graph_batch_unless_told_otherwise(monkeypatch):
    """The paper's ``alignment.py`` scores all nodes; ``all_nodes: false`` keeps the training mask. The data module's
    graph itself is left as it is."""
    graph = Data(x=torch.randn(4, 16), train_mask=torch.tensor([True, False, False, True]))
    strategy = FeedbackAlignmentStrategy(feedback_points=["blocks.*"], verbose=False)
    strategy.engine = SimpleNamespace(points=[])
    stub = SimpleNamespace(callbacks=[strategy], datamodule=SimpleNamespace(train_dataloader=lambda: iter([graph])))
    masks = []
    monkeypatch.setattr(AlignmentMonitor, "measure",
                        lambda self, pl_module, rule, batch: masks.append(batch.train_mask.tolist()) or {})
    module = TaskModule(MLP(16, 4, hidden=[8]), Classification(4))
    FinalAlignment().on_train_end(stub, module)
    FinalAlignment(all_nodes=False).on_train_end(stub, module)
    assert masks == [[True] * 4, [True, False, False, True]]
    assert graph.train_mask.tolist() == [True, False, False, True]


def test_final_alignment_is_empty_for_a_shallow_run_even_after_a_dfa_fit(tmp_path):
    """A table of runs reads BP and shallow rows as "not measured": neither a shallow rule's nor an earlier fit's
    values may show up there."""
    module, data, strategy = build("dfa")
    final = FinalAlignment()
    trainer(tmp_path, [strategy, final], max_steps=1).fit(module, datamodule=data)
    assert final.points == ["blocks.0", "blocks.1"]
    module, data, shallow = build("shallow")
    trainer(tmp_path, [shallow, final], max_steps=1).fit(module, datamodule=data)
    assert (final.alignment, final.points, final.deepest) == ({}, [], None)


def test_a_placement_run_is_reused_only_for_the_same_points_and_arguments_and_must_use_its_points(tmp_path,
                                                                                                  monkeypatch):
    """run_one's cache key: the same label with other points, or other run arguments, trains again; and a run whose
    rule did not get the placement's points is refused (the fake CLI stands in for training)."""
    from dfa_lightning import studies

    calls, used = [], {"points": None}

    def fake_run(args, run=True):
        calls.append(args)
        points = used["points"] or json.loads(args[args.index("--trainer.callbacks.feedback_points") + 1])
        rule = FeedbackAlignmentStrategy(feedback_points=points, verbose=False)
        return SimpleNamespace(trainer=SimpleNamespace(callbacks=[rule]), test_results={"test/acc": 0.5})

    monkeypatch.setattr(studies, "run", fake_run)
    recipe, root = str(REPO / "recipes/gcn_dfa.yaml"), tmp_path / "runs"
    one = ["--trainer.max_epochs", "1"]
    assert placements.run_one(recipe, "paper", ["hidden"], 0, root, one)["metrics"] == {"test/acc": 0.5}
    assert placements.run_one(recipe, "paper", ["hidden"], 0, root, one)["points"] == ["hidden"]
    assert len(calls) == 1  # the same run: read back
    placements.run_one(recipe, "paper", ["hidden"], 0, root, ["--trainer.max_epochs", "2"])
    assert len(calls) == 2  # other run arguments
    placements.run_one(recipe, "paper", ["conv1"], 0, root, ["--trainer.max_epochs", "2"])
    assert len(calls) == 3  # other points under the same label
    used["points"] = ["hidden"]
    with pytest.raises(ConfigError, match=r"did not use the feedback points \['conv1'\]"):
        placements.run_one(recipe, "paper", ["conv1"], 1, root)


def test_the_placement_table_keeps_the_given_order_and_averages_the_alignment_over_seeds():
    def result(label, seed, acc, cos):
        return {"label": label, "points": ["hidden"], "seed": seed, "metrics": {"test/acc": acc},
                "alignment": {"align/update_cos/hidden": cos, "align/signal_cos/hidden": cos}, "order": ["hidden"],
                "seconds": 1.0}

    text = placements.render([result("zeta", 0, 0.5, 0.2), result("zeta", 1, 0.7, 0.4),
                              result("alpha", 0, 0.6, 0.9)], "test/acc", "cmd")
    rows = [line for line in text.splitlines() if line.startswith("| zeta") or line.startswith("| alpha")]
    assert [row.split(" | ")[0] for row in rows] == ["| zeta", "| alpha"]
    assert rows[0].endswith("| 2 | hidden 0.30 | hidden 0.30 |")


def test_a_recipe_with_several_rules_is_refused_as_placements_override_only_the_last(tmp_path):
    """NeRF's recipes hold one rule per field: the placement's points would reach the fine field's rule only."""
    with pytest.raises(ConfigError, match="must end with the recipe's one FeedbackAlignmentStrategy .found 2"):
        placements.check_recipe(str(REPO / "recipes/nerf_dfa.yaml"))


def test_two_placements_with_one_label_are_refused_before_training(tmp_path, capsys):
    """They would share a run folder: the second would read back the first one's runs."""
    argv = ["--recipe", str(REPO / "recipes/gcn_dfa.yaml"), "--placements", "a=hidden", "a=conv1", "--seeds", "0",
            "--out", str(tmp_path / "x.md"), "--root", str(tmp_path / "runs")]
    assert placements.main(argv) == 2
    assert "--placements: labels must differ (got ['a', 'a'])" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_placement_run_is_cached_under_one_recipe_spelling(monkeypatch, tmp_path):
    """``./recipes/r.yaml`` and ``recipes/r.yaml`` were two cache keys: each spelling trained the run again."""
    from dfa_lightning import placements, studies

    keys = []
    monkeypatch.setattr(studies, "run_cached", lambda run_dir, key, *a, **k: keys.append(key) or {})
    for spelling in ("recipes/gcn_dfa.yaml", "./recipes/gcn_dfa.yaml", "recipes/../recipes/gcn_dfa.yaml"):
        placements.run_one(spelling, "paper", ["hidden"], 0, tmp_path)
    assert keys[0] == keys[1] == keys[2]
