"""Bad input to the study tools (sweep, placements, failure_map, transport_map, graphs_reproduce): one ``error:`` line
and exit code 2, found before any training where that is cheap, and no stale or silently wrong result."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest

from dfa_lightning import failure_map, graphs_reproduce, placements, studies, sweep, transport_map

REPO = Path(__file__).resolve().parents[1]
GCN_DFA = str(REPO / "recipes/gcn_dfa.yaml")
STACK = [str(REPO / f"recipes/gcn_stack_{m}.yaml") for m in ("bp", "dfa", "shallow")]
DEPTH = "depth=model.model.init_args.num_layers"


def _data(root: Path, tmp_path: Path) -> list[str]:
    return ["--data.init_args.root", str(root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--data.init_args.download", "false"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------ before training
def _tool_argv(tool: str, tmp_path: Path, out: str, root: str, extra: list[str], data_root: Path | None = None
               ) -> tuple:
    data = _data(data_root or tmp_path / "nodata", tmp_path)
    if tool == "sweep":
        return sweep.main, ["--recipes", GCN_DFA, "--seeds", "0", "--out", out, "--root", root, "--", *extra, *data]
    if tool == "placements":
        return placements.main, ["--recipe", GCN_DFA, "--placements", "paper=hidden", "--seeds", "0", "--out", out,
                                 "--root", root, "--", *extra, *data]
    if tool == "failure_map":
        return failure_map.main, ["--recipes", *STACK, "--axis", f"{DEPTH}:2", "--seeds", "0", "--out", out,
                                  "--root", root, "--", *extra, *data]
    return graphs_reproduce.main, ["--models", "gcn", "--methods", "dfa", "--seeds", "0", "--out", out, "--root", root,
                                   "--", *extra, *data]


@pytest.mark.parametrize("tool", ["sweep", "placements", "failure_map", "graphs_reproduce"])
@pytest.mark.parametrize("where", ["out_is_a_folder", "out_under_a_file", "root_is_a_file"])
def test_an_unwritable_out_or_root_is_refused_before_any_training(tool, where, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    out, root = str(tmp_path / "t.md"), str(tmp_path / "runs")
    if where == "out_is_a_folder":
        out = str(tmp_path)
    elif where == "out_under_a_file":
        out = str(afile / "t.md")
    else:
        root = str(afile)
    main, argv = _tool_argv(tool, tmp_path, out, root, ["--trainer.max_epochs", "1"])
    assert main(argv) == 2
    assert ("--out" if where.startswith("out") else "--root") in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_transport_map_refuses_an_out_folder_before_the_audits(tmp_path, capsys):
    assert transport_map.main(["--recipes", GCN_DFA, "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_line(capsys)


@pytest.mark.parametrize("tool", ["sweep", "placements", "failure_map", "graphs_reproduce"])
def test_a_misspelt_run_argument_is_one_line_before_any_training(tool, tmp_path, capsys):
    main, argv = _tool_argv(tool, tmp_path, str(tmp_path / "t.md"), str(tmp_path / "runs"),
                            ["--trainer.max_epoch", "1"])
    assert main(argv) == 2
    assert "max_epoch" in _one_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.md").exists()


def test_sweep_finds_a_missing_second_recipe_before_the_first_trains(tmp_path, capsys):
    argv = ["--recipes", GCN_DFA, str(REPO / "recipes/gcn_bp.yml"), "--seeds", "0", "--out", str(tmp_path / "t.md"),
            "--root", str(tmp_path / "runs"), "--", *_data(tmp_path / "nodata", tmp_path)]
    assert sweep.main(argv) == 2
    assert "gcn_bp.yml" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_sweep_refuses_two_recipes_with_one_name(tmp_path, capsys):
    other = tmp_path / "rec" / "gcn_dfa.yaml"
    other.parent.mkdir()
    other.write_text(Path(GCN_DFA).read_text())
    argv = ["--recipes", GCN_DFA, str(other), "--seeds", "0", "--out", str(tmp_path / "t.md"),
            "--root", str(tmp_path / "runs")]
    assert sweep.main(argv) == 2
    assert "names must differ" in _one_line(capsys)


@pytest.mark.parametrize("value, why", [("abc", "abc"), ("0", "num_layers")])
def test_failure_map_checks_every_axis_value_before_training(value, why, cora_root, tmp_path, capsys):
    argv = ["--recipes", *STACK, "--axis", f"{DEPTH}:2,{value}", "--seeds", "0", "--root", str(tmp_path / "runs"),
            "--", "--trainer.max_epochs", "1", *_data(cora_root, tmp_path)]
    assert failure_map.main(argv) == 2
    assert why in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_placements_finds_a_later_placement_matching_nothing_before_training_and_names_it(tmp_path, capsys):
    argv = ["--recipe", GCN_DFA, "--placements", "paper=hidden", "bad=conv9", "--seeds", "0",
            "--out", str(tmp_path / "t.md"), "--root", str(tmp_path / "runs"), "--", *_data(tmp_path / "nodata", tmp_path)]
    assert placements.main(argv) == 2
    err = _one_line(capsys)
    assert "--placements bad" in err and "conv9" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", [["--trainer.callbacks.feedback_points", "[conv1]"],
                                  ["--trainer.callbacks.init_args.feedback_points=[conv1]"]])
def test_placements_refuses_feedback_points_among_the_run_arguments(flag, tmp_path, capsys):
    """The placement overrode them, while the result file recorded the override as if it had been used."""
    with pytest.raises(SystemExit) as stop:
        placements.main(["--recipe", GCN_DFA, "--placements", "a=hidden", "--out", str(tmp_path / "t.md"), "--", *flag])
    assert stop.value.code == 2
    assert "feedback_points after --: each placement sets the run's feedback points" in capsys.readouterr().err


def test_repeated_seeds_are_run_once():
    parser, _, own, _ = studies.study_arguments("placements", "doc", ["--seeds", "1", "0", "1"], [0], "logs")
    assert parser.parse_args(own).seeds == [1, 0]


@pytest.mark.parametrize("argv, expected", [
    (["--seeds-for", "gcn=0,x"], "seed"), (["--seeds", "-1"], "seed"),
    (["--models", "gcn", "--seeds-for", "gat=0"], "--seeds-for 'gat=0': gat is not among --models (gcn)"),
    (["--recipes", "/nonexistent/recipes"], "--recipes /nonexistent/recipes: no such folder"),
    (["--dfa-tolerance", "-5"], "--dfa-tolerance and --shallow-margin are points, >= 0"),
], ids=["bad seed", "negative seed", "seeds for a model not run", "no recipes folder", "negative tolerance"])
def test_graphs_reproduce_refuses_a_bad_argument_as_a_usage_error(argv, expected, tmp_path, capsys):
    """Among them three that were silent: seeds for a model not run, a recipes folder that does not exist (the
    cached results stood in for it), a negative tolerance."""
    with pytest.raises(SystemExit) as stop:
        graphs_reproduce.main([*argv, "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "t.md")])
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_study_run_gives_lightning_no_cause_to_warn_about_args_and_command_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["placements", "--recipe", GCN_DFA])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        studies.run(["--config", GCN_DFA, *_data(tmp_path / "nodata", tmp_path)], run=False)
    assert not [w for w in seen if "not recommended to provide both" in str(w.message)]
    assert sys.argv == ["placements", "--recipe", GCN_DFA]


def test_short_keeps_the_location_of_a_command_line_error():
    error = "command line (recipes/gcn_dfa.yaml): unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"
    assert graphs_reproduce._short(error) == "command line (recipes/gcn_dfa.yaml): unknown key 'trainer.max_epoch'"
    assert graphs_reproduce._short("Planetoid PubMed: missing ind.pubmed.allx (see x)") == \
        "Planetoid PubMed: missing ind.pubmed.allx"


def test_graphs_reproduce_exits_non_zero_when_no_run_was_measured(tmp_path, capsys):
    argv = ["--models", "gcn", "--methods", "dfa", "--seeds", "0", "--out", str(tmp_path / "t.md"),
            "--root", str(tmp_path / "runs"), "--", "--trainer.max_epochs", "1", *_data(tmp_path / "nodata", tmp_path)]
    assert graphs_reproduce.main(argv) == 1
    assert "no run was measured" in capsys.readouterr().err
    assert "*not measured*" in (tmp_path / "t.md").read_text()


# ------------------------------------------------------------------------------------------------ one short run
def test_graphs_reproduce_retrains_a_cached_result_when_the_overrides_change(cora_root, tmp_path):
    root, data = tmp_path / "runs", _data(cora_root, tmp_path)
    first = graphs_reproduce.run_one("gcn", "dfa", "Cora", 0, root, ["--trainer.max_epochs", "1", *data],
                                     save_hidden=False)
    assert "metrics" in first
    again = graphs_reproduce.run_one("gcn", "dfa", "Cora", 0, root, ["--trainer.max_epochs", "1", *data],
                                     save_hidden=False)
    assert again == first  # same arguments: the cache stands
    longer = graphs_reproduce.run_one("gcn", "dfa", "Cora", 0, root, ["--trainer.max_epochs", "2", *data],
                                      save_hidden=False)
    assert "metrics" in longer and longer["overrides"][:2] == ["--trainer.max_epochs", "2"]
    out = root / "Cora" / "gcn_dfa" / "seed0" / "result.json"
    cached = json.loads(out.read_text())
    assert cached["overrides"][:2] == ["--trainer.max_epochs", "2"]
    recipes = tmp_path / "recipes"  # the same recipe name, edited: another run, not the cached one
    recipes.mkdir()
    (recipes / "gcn_dfa.yaml").write_text(Path(GCN_DFA).read_text().replace("../callbacks/", f"{REPO}/callbacks/")
                                          .replace("lr: 0.01 ", "lr: 0.02 "))
    edited = graphs_reproduce.run_one("gcn", "dfa", "Cora", 0, root, ["--trainer.max_epochs", "2", *data],
                                      recipes=recipes, save_hidden=False)
    assert edited["recipe_sha256"] != longer["recipe_sha256"]
    assert json.loads(out.read_text())["recipe_sha256"] == edited["recipe_sha256"]  # trained, and cached anew


@pytest.mark.parametrize("tool", ["sweep", "placements", "failure_map"])
def test_a_misspelt_metric_stops_after_the_first_run_naming_the_metrics_it_produced(tool, cora_root, tmp_path,
                                                                                      capsys):
    main, argv = _tool_argv(tool, tmp_path, str(tmp_path / "t.md"), str(tmp_path / "runs"),
                            ["--trainer.max_epochs", "1"], cora_root)
    cut = argv.index("--")
    argv = [*argv[:cut], "--metric", "test/accc", *argv[cut:]]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert "test/accc" in err and "test/acc," in err
    assert not (tmp_path / "t.md").exists()
    kept = list((tmp_path / "runs").rglob("result.json"))  # the finished run is kept for the corrected command
    assert len(kept) == 1
    if tool == "sweep":
        assert "the run is kept" in err
        mtime = kept[0].stat().st_mtime_ns
        argv[argv.index("test/accc")] = "test/acc"
        assert main(argv) == 0
        assert kept[0].stat().st_mtime_ns == mtime  # read back, not trained again
        assert "(cached) test/acc=" in capsys.readouterr().out


def test_a_lightning_refusal_during_a_study_run_is_one_line(cora_root, tmp_path, capsys):
    argv = ["--recipe", GCN_DFA, "--placements", "paper=hidden", "--seeds", "0", "--out", str(tmp_path / "t.md"),
            "--root", str(tmp_path / "runs"), "--", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "50",
            *_data(cora_root, tmp_path)]
    assert placements.main(argv) == 2
    assert "trainer.val_check_interval" in _one_line(capsys)


@pytest.mark.parametrize("extra, why", [(["--trainer.strategy", "foo"], "trainer.strategy"),
                                        (["--model.model.init_args.in_channels", "100"], "in_channels")])
def test_transport_map_words_a_refused_setting_as_one_line(extra, why, cora_root, tmp_path, capsys):
    argv = ["--recipes", GCN_DFA, "--out", str(tmp_path / "t.md"), "--", *extra, *_data(cora_root, tmp_path)]
    assert transport_map.main(argv) == 2
    assert why in _one_line(capsys)


def test_graphs_reproduce_checks_the_arguments_on_every_dataset_not_only_the_first(monkeypatch, tmp_path, capsys):
    """A dataset's own overrides (DATASET_OVERRIDES) can make a run argument wrong there only: here PubMed switches
    to SGD, which has no `betas`. Checking only Cora let the PubMed runs fail one by one after Cora trained."""
    monkeypatch.setitem(graphs_reproduce.DATASET_OVERRIDES, ("gcn_dfa", "PubMed"),
                        ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.init_args.lr", "0.1"])
    main, argv = _tool_argv("graphs_reproduce", tmp_path, str(tmp_path / "t.md"), str(tmp_path / "runs"),
                            ["--model.optimizer.init_args.betas", "[0.8, 0.99]"])
    assert main(["--datasets", "Cora", "PubMed", *argv]) == 2
    assert "betas" in _one_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "t.md").exists()


def test_sweep_trains_again_when_the_recipe_text_or_the_arguments_change(cora_root, tmp_path, capsys):
    """A cached run stands only for the same recipe and overlay texts, seed and overrides: an edited recipe (same
    file name), an edited overlay or another --trainer.max_epochs is a different run."""
    recipe = tmp_path / "gcn_dfa.yaml"
    recipe.write_text(Path(GCN_DFA).read_text().replace("../callbacks/", f"{REPO}/callbacks/"))
    argv = ["--recipes", str(recipe), "--seeds", "0", "--out", str(tmp_path / "t.md"), "--root", str(tmp_path / "runs"),
            "--", "--trainer.max_epochs", "1", *_data(cora_root, tmp_path)]
    assert sweep.main(argv) == 0
    assert sweep.main(argv) == 0
    assert "(cached)" in capsys.readouterr().out
    recipe.write_text(recipe.read_text().replace("lr: 0.01 ", "lr: 0.02 "))
    assert sweep.main(argv) == 0
    assert "(cached)" not in capsys.readouterr().out
    argv[argv.index("1")] = "2"
    assert sweep.main(argv) == 0
    assert "(cached)" not in capsys.readouterr().out
    assert sweep.main([*argv[:argv.index("--")], "--rerun", *argv[argv.index("--"):]]) == 0
    assert "(cached)" not in capsys.readouterr().out
    overlay = tmp_path / "overlay.yaml"  # an overlay's text counts as the recipe's does
    overlay.write_text("trainer:\n  log_every_n_steps: 1\n")
    argv += ["--config", str(overlay)]
    assert sweep.main(argv) == 0
    assert sweep.main(argv) == 0
    assert "(cached)" in capsys.readouterr().out
    overlay.write_text("trainer:\n  log_every_n_steps: 2\n")
    assert sweep.main(argv) == 0
    assert "(cached)" not in capsys.readouterr().out


@pytest.mark.parametrize("tool", ["sweep", "placements", "failure_map", "graphs_reproduce"])
@pytest.mark.parametrize("seed", [["--seed_everything", "5"], ["--seed_everything=5"]])
def test_a_seed_among_the_run_arguments_is_a_usage_error(tool, seed, tmp_path, capsys):
    """It came after each run's own seed and won: `--seeds 0 1` reported one run twice with a std of 0."""
    main, argv = _tool_argv(tool, tmp_path, str(tmp_path / "t.md"), str(tmp_path / "runs"), seed)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "--seed_everything after --: every run would have that one seed; give the seeds with --seeds" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("reference", "why"), [
    ('{"gcn_dfaa": 0.79}', "'gcn_dfaa' is not a recipe of this sweep (gcn_dfa)"),
    ('{"gcn_dfa": "high"}', "gcn_dfa: expected a number, got 'high'"),
    ('{"gcn_dfa": true}', "gcn_dfa: expected a number, got True"),  # a bool is an int to isinstance
    ('{"test/acc": {"gcn": 0.8}}', "'gcn' is not a recipe of this sweep"),
    ('[0.8]', "expected a JSON object"),
])
def test_sweep_refuses_a_reference_that_names_no_recipe_or_is_no_number(reference, why, tmp_path, capsys):
    """A misspelt recipe in --reference left the paper column empty, with exit 0."""
    argv = ["--recipes", GCN_DFA, "--seeds", "0", "--out", str(tmp_path / "t.md"), "--root", str(tmp_path / "runs"),
            "--reference", reference]
    with pytest.raises(SystemExit) as stop:
        sweep.main(argv)
    assert stop.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sweep_table_keeps_the_seed_order_and_gives_the_sample_mean_and_std_and_the_paper_value_of_the_main_metric(
        tmp_path, monkeypatch, capsys):
    """What users compare with the paper: each seed's value in the order of --seeds, mean ± sample std (n - 1), and
    the --reference value next to the main metric only."""
    values = {0: {"test/acc": 1.2, "test/loss": 1.0}, 1: {"test/acc": 0.7, "test/loss": 6.0},
              2: {"test/acc": 0.8, "test/loss": 2.0}}
    monkeypatch.setattr(sweep, "check", lambda *args: None)
    monkeypatch.setattr(sweep, "run_seed", lambda recipe, seed, *args: {"metrics": values[seed], "seconds": 1.0})
    out = tmp_path / "t.md"
    assert sweep.main(["--recipes", "recipes/gcn_dfa.yaml", "--seeds", "2", "0", "1", "--metrics", "test/acc",
                       "test/loss", "--out", str(out), "--reference", '{"gcn_dfa": 0.81}']) == 0
    text = out.read_text()
    assert "| gcn_dfa | 0.8000 | 1.2000 | 0.7000 | 0.9000 ± 0.2646 | 0.81 |" in text
    assert "| gcn_dfa | 2.0000 | 1.0000 | 6.0000 | 3.0000 ± 2.6458 |  |" in text
    assert studies.mean_std([1.0, 2.0, 6.0], digits=2) == "3.00 ± 2.65"
    assert studies.mean_std([5.0]) == "5.0000 ± 0.0000"
    assert json.loads(out.with_suffix(".json").read_text())["results"] == {"gcn_dfa": {"2": 0.8, "0": 1.2, "1": 0.7}}


def test_seeds_outside_0_to_2_pow_32_minus_1_are_refused_and_every_wanted_metric_is_required():
    assert studies._seed(str(2 ** 32 - 1)) == 2 ** 32 - 1
    for bad in (str(2 ** 32), "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="outside 0..4294967295"):
            studies._seed(bad)
    with pytest.raises(studies.ConfigError, match=r"--metric test/auroc: not among the test metrics of the first run "
                                                  r"\(test/acc\)"):
        studies.require_metrics({"test/acc": 0.8}, ["test/acc", "test/auroc"])
