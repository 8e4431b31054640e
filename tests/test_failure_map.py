"""The failure map (`python -m dfa_lightning.failure_map`): BP, DFA and shallow over a grid of architecture changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfa_lightning import failure_map
from dfa_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPES = [str(REPO / f"recipes/gcn_stack_{m}.yaml") for m in ("bp", "dfa", "shallow")]
DEPTH = "depth=model.model.init_args.num_layers:2,3"
SKIP = "skip=model.model.init_args.residual:false,true"


def test_every_cell_trains_every_rule_and_reports_the_gap_and_each_layers_alignment(cora_root, tmp_path):
    out = tmp_path / "map.md"
    extra = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
             "--trainer.max_epochs", "8"]
    argv = ["--recipes", *RECIPES, "--axis", DEPTH, "--axis", SKIP, "--seeds", "0", "--out", str(out),
            "--root", str(tmp_path / "runs"), "--", *extra]
    assert failure_map.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["results"]) == 4 * 3  # cells x recipes x seeds
    rows = data["rows"]
    assert [r["cell"] for r in rows] == [{"depth": d, "skip": s} for d in ("2", "3") for s in ("false", "true")]
    for row in rows:
        depth = int(row["cell"]["depth"])
        assert [p for p, _ in row["update_cos"]] == [f"blocks.{i}" for i in range(depth - 1)]  # the points follow depth
        assert all(-1 <= c <= 1 for _, c in row["update_cos"])
        assert len(row["bp"]) == len(row["dfa"]) == len(row["shallow"]) == 1
        assert row["gap_to_bp"] == pytest.approx(row["dfa"][0] - row["bp"][0])
        assert row["above_shallow"] == pytest.approx(row["dfa"][0] - row["shallow"][0])
    assert all(r["metrics"]["test/acc"] > 0.1 for r in data["results"])
    bp_runs = [r for r in data["results"] if r["recipe"].endswith("gcn_stack_bp.yaml")]
    assert all(r["alignment"] == {} for r in bp_runs)  # no feedback, no alignment
    text = out.read_text()
    assert "| depth | skip | BP | DFA | shallow | DFA − BP | DFA − shallow | update cos per point |" in text
    assert "| depth | 3 |" in text and "| skip | true |" in text  # the marginals
    # a second call trains nothing again
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "runs").rglob("result.json")}
    assert len(stamps) == 12
    assert failure_map.main(argv) == 0
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "runs").rglob("result.json")} == stamps
    # the same cell with other extra arguments is a different run, not a stale cache hit
    assert not failure_map.studies.reusable(data["results"][0], {**{k: data["results"][0][k] for k in
                                                                    ("recipe", "cell", "seed", "overrides")},
                                                                 "extra": extra[:-1] + ["250"]})


def test_an_unknown_recipe_key_stops_the_study_before_any_training(tmp_path, capsys):
    argv = ["--recipes", *RECIPES, "--axis", "depth=model.model.init_args.num_layer:2,3", "--seeds", "0",
            "--root", str(tmp_path / "runs")]
    assert failure_map.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "num_layer" in err and "gcn_stack_bp.yaml" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipes, why", [
    (["recipes/gcn_stack_dfa.yaml", "recipes/gcn_stack_shallow.yaml"], "one bp recipe"),
    (["recipes/gcn_stack_bp.yaml", "recipes/gcn_bp.yaml", "recipes/gcn_stack_dfa.yaml"], "one bp recipe"),
    (["recipes/gcn_stack_bp.yaml", "recipes/gcn_stack_shallow.yaml"], "at least one dfa"),
    (["recipes/gcn_bp.yaml", "recipes/cheb_dfa.yaml"], r"cheb_dfa.yaml has another model than the bp recipe .*gcn_bp"),
    (["recipes/lm_bp.yaml", "recipes/gcn_dfa.yaml"], "gcn_dfa.yaml has another model than the bp recipe"),
], ids=["no bp", "two bp", "no dfa", "other model", "other task"])
def test_a_recipe_set_without_one_baseline_and_a_dfa_rule_on_its_model_is_refused(recipes, why):
    """A DFA recipe of another model than the BP one (gcn_bp against cheb_dfa) trained and mapped a meaningless gap."""
    with pytest.raises(ConfigError, match=why):
        failure_map.methods_of([str(REPO / r) for r in recipes])


@pytest.mark.parametrize("spec", ["depth", "depth=key", "depth=key:", "=key:1", "depth=:1,2", "depth=key:1,,2",
                                  "de pth=key:1", "depth=key:1,1", "depth=key:[1,2"])
def test_a_malformed_axis_names_itself(spec):
    with pytest.raises(ConfigError, match="--axis"):
        failure_map.parse_axis(spec)


def test_axis_values_keep_commas_inside_brackets():
    axis = failure_map.parse_axis("widths=model.model.init_args.hidden:[64,64],[256, 256],16")
    assert (axis.label, axis.key, axis.values) == ("widths", "model.model.init_args.hidden",
                                                   ["[64,64]", "[256, 256]", "16"])
    assert axis.override("[64,64]") == ["--model.model.init_args.hidden", "[64,64]"]


def test_cells_are_the_product_of_the_axes_first_axis_slowest():
    axes = [failure_map.parse_axis("a=k.a:1,2"), failure_map.parse_axis("b=k.b:x,y,z")]
    assert failure_map.cells(axes) == [{"a": a, "b": b} for a in "12" for b in "xyz"]


def _run(recipe, cell, acc, cos=()):
    return {"recipe": recipe, "cell": cell, "seed": 0, "metrics": {"test/acc": acc},
            "alignment": {f"align/update_cos/p{i}": c for i, c in enumerate(cos)},
            "order": [f"p{i}" for i in range(len(cos))], "seconds": 1.0}


def test_the_table_marks_a_cell_where_dfa_does_no_better_than_shallow():
    axes = [failure_map.parse_axis("depth=k:2,8")]
    methods = {"bp.yaml": "bp", "dfa.yaml": "dfa", "shallow.yaml": "shallow"}
    results = [_run("bp.yaml", {"depth": "2"}, 0.80), _run("dfa.yaml", {"depth": "2"}, 0.78, (0.9,)),
               _run("shallow.yaml", {"depth": "2"}, 0.35),
               _run("bp.yaml", {"depth": "8"}, 0.60), _run("dfa.yaml", {"depth": "8"}, 0.30, (0.1, -0.2, 0.05)),
               _run("shallow.yaml", {"depth": "8"}, 0.32)]
    rows = failure_map.summarise(results, methods, axes, "test/acc")
    assert [round(r["gap_to_bp"], 4) for r in rows] == [-0.02, -0.30]
    assert rows[1]["update_cos_min"] == pytest.approx(-0.2)
    text = failure_map.render(rows, axes, "test/acc", "cmd", 6.0)
    line2, line8 = [l for l in text.splitlines() if l.startswith("| 2 |") or l.startswith("| 8 |")]
    assert "✗" not in line2 and "+0.4300" in line2 and line2.endswith("| 0.90 |")
    assert "-0.0200 ✗" in line8 and line8.endswith("| 0.10 -0.20 0.05 |")


def test_for_a_perplexity_a_dfa_no_lower_than_shallow_is_the_failure():
    assert failure_map.default_mode("test/ppl") == "min" and failure_map.default_mode("val/loss") == "min"
    assert failure_map.default_mode("test/acc") == "max" and failure_map.default_mode("test/auroc") == "max"
    assert failure_map.default_mode("test/logloss") == "min"  # the CTR task's log loss: lower is better
    axes = [failure_map.parse_axis("norm=k:post,pre")]
    methods = {"bp.yaml": "bp", "dfa.yaml": "dfa", "shallow.yaml": "shallow"}
    results = [_run("bp.yaml", {"norm": "post"}, 140.0), _run("dfa.yaml", {"norm": "post"}, 250.0),
               _run("shallow.yaml", {"norm": "post"}, 480.0),
               _run("bp.yaml", {"norm": "pre"}, 150.0), _run("dfa.yaml", {"norm": "pre"}, 500.0),
               _run("shallow.yaml", {"norm": "pre"}, 480.0)]
    rows = failure_map.summarise(results, methods, axes, "test/acc")
    text = failure_map.render(rows, axes, "test/acc", "cmd", 6.0, mode="min")
    post, pre = [l for l in text.splitlines() if l.startswith("| post |") or l.startswith("| pre |")]
    assert "| 140.0 ± 0.0 | 250.0 ± 0.0 | 480.0 ± 0.0 | +110.0 | -230.0 |" in post and "✗" not in post
    assert "+20.0 ✗" in pre  # perplexities to one decimal


def test_a_cell_is_cached_under_one_recipe_spelling_and_its_number_is_read_as_the_config_reads_it(monkeypatch,
                                                                                                    tmp_path):
    """``./recipes/r.yaml`` and ``recipes/r.yaml`` were two cache keys (each spelling trained again); an axis value
    ``1e-2`` (0.01 in the config, the string '1e-2' for YAML 1.1) failed the run's check after it had trained."""
    from types import SimpleNamespace

    from dfa_lightning import studies

    calls = []
    monkeypatch.setattr(studies, "run_cached", lambda run_dir, key, recipe, args, check, rerun=False:
                        calls.append((key, check)) or {})
    axis = failure_map.parse_axis("lr=model.optimizer.init_args.lr:1e-2,5e-3")
    for spelling in ("recipes/gcn_stack_dfa.yaml", "./recipes/gcn_stack_dfa.yaml"):
        failure_map.run_cell(spelling, [axis], {"lr": "1e-2"}, 0, tmp_path)
    assert calls[0][0] == calls[1][0]
    config = {"model.optimizer.init_args.lr": 0.01}
    calls[0][1](SimpleNamespace(subcommand=None, config=config))  # accepted
    with pytest.raises(ConfigError, match="did not reach the run's config"):
        calls[0][1](SimpleNamespace(subcommand=None, config={"model.optimizer.init_args.lr": 0.02}))
