"""Recipes and the command line: every recipe instantiates, Cora trains end to end, bad input is one clear line."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from dfa_lightning.checkpoint_check import state_dict_mismatch
from dfa_lightning.cli import main, run
from dfa_lightning.feedback.points import glob_match
from dfa_lightning.model_args import learning_rate_problem, model_arg_problem, null_arg_problem

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses_instantiates_and_passes_the_argument_checks(recipe):
    from dfa_lightning.models.graph import spline_available

    kernels = ["--model.model.init_args.kernels", "torch"] if recipe.stem.startswith("spline") and not \
        spline_available()[0] else []  # without pyg-lib: the plain-PyTorch SplineConv
    cli = run(["--config", str(recipe), *kernels], run=False)
    assert cli.model.model is not None and cli.datamodule is not None
    config = cli.config.model
    model = config.model
    assert model_arg_problem(str(model.class_path), dict(vars(model.init_args))) is None
    for part in (config.optimizer, config.lr_scheduler):
        if part is not None:
            assert null_arg_problem(str(part.class_path), dict(vars(part.init_args))) is None
    scheduler = dict(vars(config.lr_scheduler.init_args)) if config.lr_scheduler is not None else {}
    assert learning_rate_problem(config.optimizer.init_args.lr, scheduler,
                                 [dict(g) for g in config.param_groups or []]) is None
    strategies = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"]
    assert strategies, "every recipe states its learning rule (callbacks/bp.yaml for backprop)"
    if len(strategies) > 1:  # one rule over several networks (NeRF's coarse and fine): one method, distinct names
        assert len({cb.method for cb in strategies}) == 1
        assert len({cb.state_key for cb in strategies}) == len(strategies)


VARIANTS = sorted((REPO / "benchmarks" / "recipes").glob("*.yaml"))
VARIANT_SETTINGS = {"centered": ("error", "centered"), "feedback_norm": ("feedback_norm", "layer"),
                    "feedback_orthogonal": ("feedback_norm", "orthogonal"),
                    "ffn_orthogonal": ("feedback_norm", {"blocks.*.ffn.act": "orthogonal"}),
                    "residual_orthogonal": ("feedback_norm", {"blocks.*.attn_out": "orthogonal",
                                                              "blocks.*.out": "orthogonal"}),
                    "sign": ("error", "sign"), "ternary": ("error", "ternary"), "lowrank": ("operator", "lowrank"),
                    "sparse": ("operator", "sparse")}
#: a name's promise about the model's training rather than the rule: the parameters (glob) its optimiser holds still
VARIANT_FROZEN = {"frozen_ln": "blocks.*.ln_?.*"}


@pytest.mark.parametrize("recipe", VARIANTS, ids=[r.stem for r in VARIANTS])
def test_every_benchmark_variant_instantiates_with_the_setting_its_name_promises(recipe):
    cli = run(["--config", str(recipe)], run=False)
    (rule,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"]
    promised = [setting for word, setting in VARIANT_SETTINGS.items() if word in recipe.stem]
    frozen = [glob for word, glob in VARIANT_FROZEN.items() if word in recipe.stem]
    assert promised or frozen, f"{recipe.name}: name a setting in VARIANT_SETTINGS or VARIANT_FROZEN"
    for key, value in promised:
        assert rule.config[key] == value
    for glob in frozen:
        groups = cli.model.parameter_groups()
        held = {id(p) for g in groups if g.get("lr") == 0.0 for p in g["params"]}
        named = dict(cli.model.model.named_parameters())
        expected = {id(p) for n, p in named.items() if glob_match(n, glob)}
        assert expected and held == expected, f"{recipe.name}: lr 0 on exactly {glob}"


FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[f.stem for f in FRAGMENTS])
def test_every_callback_fragment_names_a_class_that_takes_its_arguments(fragment):
    import importlib

    import yaml

    spec = yaml.safe_load(fragment.read_text())
    module, name = spec["class_path"].rsplit(".", 1)
    callback = getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))
    assert type(callback).__name__ == name


def _fit(recipe: str, tmp_path: Path, *extra: str) -> int:
    return main(["fit", "--config", str(REPO / recipe), *QUIET, "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra])


def _fit_shared_cora(recipe: str, tmp_path: Path, *extra: str) -> int:
    """:func:`_fit` on the shared Cora files (skipped where they are not), with a private cache folder."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "planetoid" / "Cora" / "raw").is_dir():
        pytest.skip("shared Cora not found")
    return _fit(recipe, tmp_path, "--data.init_args.root", str(SHARED_DATA), "--data.init_args.cache_dir",
                str(tmp_path / "cache"), *extra)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err)
    return lines[0]


@pytest.mark.parametrize("recipe", ["recipes/gcn_bp.yaml", "recipes/gcn_dfa.yaml"])
def test_cora_end_to_end_reaches_75_percent_test_accuracy(recipe, cora_root, tmp_path, capsys):
    assert _fit(recipe, tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("TEST")][-1]
    acc = float(line.split("test/acc=")[1].split(",")[0])
    assert acc > 0.75, line


def test_cora_dfa_recipe_compiled_from_the_command_line_gives_the_eager_result(cora_root, tmp_path, capsys):
    """`--model.compile` on a recipe (aot_eager: traced, no C compiler needed): 10 epochs of GCN by DFA on Cora,
    with dropout and the best-checkpoint test, report exactly the eager run's test accuracy and loss."""
    from torch._dynamo.utils import counters

    lines = []
    for compile_ in ("false", "{backend: aot_eager}"):
        counters.clear()
        assert _fit("recipes/gcn_dfa.yaml", tmp_path / compile_[:5], "--data.init_args.root", str(cora_root),
                    "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "10",
                    "--model.compile", compile_) == 0
        out = capsys.readouterr().out
        lines.append([ln.split("): ")[1] for ln in out.splitlines() if ln.startswith("TEST")][-1])
        assert (counters["stats"]["unique_graphs"] > 0) == (compile_ != "false")  # Dynamo compiled the model
    assert lines[0] == lines[1], lines


def test_unknown_recipe_key_names_the_file_and_suggests_the_key(tmp_path, capsys):
    bad = _edited_recipe(tmp_path, "gcn_dfa.yaml", "max_epochs:", "max_epoch:")
    assert main(["fit", "--config", str(bad)]) == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and "'trainer.max_epoch'" in line and "did you mean 'trainer.max_epochs'" in line


def test_a_key_given_twice_in_a_recipe_is_refused_with_both_lines(tmp_path, capsys):
    """YAML keeps the last of two ``trainer:`` blocks silently, which would drop the first one's callbacks (the DFA
    rule) and train by backprop without a word."""
    recipe = (REPO / "recipes/gcn_dfa.yaml").read_text()
    bad = tmp_path / "gcn_dfa.yaml"
    bad.write_text(recipe + "trainer:\n  max_epochs: 3\n")
    first = 1 + next(i for i, line in enumerate(recipe.splitlines()) if line.startswith("trainer:"))
    assert main(["fit", "--config", str(bad)]) == 2
    line = _one_line_error(capsys)
    assert str(bad) in line and f"key 'trainer' given twice (first on line {first})" in line
    assert f"line {len(recipe.splitlines()) + 1}" in line


@pytest.mark.parametrize("edit, expected", [
    (("class_path: dfa_lightning.callbacks.FeedbackAlignmentStrategy",
      "class_path: dfa_lightning.callbacks.FeedbackAlignmentStrategi"),
     "invalid value for 'trainer.callbacks': class 'dfa_lightning.callbacks.FeedbackAlignmentStrategi' not found "
     "(did you mean 'dfa_lightning.callbacks.FeedbackAlignmentStrategy'?)"),
    (("../callbacks/best_val_acc.yaml", "../callbacks/best_val_ac.yaml"),
     "'../callbacks/best_val_ac.yaml' is neither a class path nor an existing file"),
    (("- class_path: dfa_lightning.callbacks.FeedbackAlignmentStrategy",
      "- class_pth: dfa_lightning.callbacks.FeedbackAlignmentStrategy"),
     "unexpected key(s) ['class_pth'] in a class_path/init_args entry"),
    (("name: Cora ", "name: Cora\n    transform: normalise "),
     "invalid value for 'data.init_args.transform': expected one of 'normalize_features', 'target_indegree', 'none'"),
], ids=["callback class", "fragment file", "class_path key", "literal value"])
def test_an_invalid_recipe_value_is_one_line_with_the_reason(tmp_path, capsys, edit, expected):
    """jsonargparse's "does not validate against any of the Union subtypes" wall comes down to its first specific
    reason, not the list of subtypes."""
    recipe = (REPO / "recipes/gcn_dfa.yaml").read_text()
    assert edit[0] in recipe
    bad = tmp_path / "recipes" / "gcn_dfa.yaml"  # beside a copy of the fragments, so that only the edit is wrong
    bad.parent.mkdir()
    shutil.copytree(REPO / "callbacks", tmp_path / "callbacks")
    bad.write_text(recipe.replace(edit[0], edit[1], 1))
    assert main(["fit", "--config", str(bad)]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"error: {bad}: ") and expected in line, line


@pytest.mark.parametrize("flag, expected", [
    (["--trainer.max_epoch", "1"], "unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
    (["--trainer.max_epochs", "abc"], "invalid value for 'trainer.max_epochs': expected int or null, got 'abc'"),
    (["--seed_everything", "abc"], "invalid value for 'seed_everything': expected bool or int, got 'abc'"),
    (["--seed_everything", "-1"], "seed_everything is -1: expected an integer from 0 to 4294967295"),
    (["--model.optimizer.init_args.lr", "abc"],
     "invalid value for 'model.optimizer.init_args.lr': expected float or torch.Tensor, got 'abc'"),
    (["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLRR"], "invalid value for 'model.lr_scheduler': class "
     "'torch.optim.lr_scheduler.StepLRR' not found (did you mean 'torch.optim.lr_scheduler.StepLR'?)"),
    (["--trainer.precision", "17"], "invalid value for 'trainer.precision': expected one of 64, 32, 16, "
     "'transformer-engine'"),
], ids=["no abbreviation", "bad value", "seed type", "seed range", "optimizer argument type", "scheduler class",
        "every precision choice"])
def test_a_command_line_typo_is_named_as_the_command_lines_not_the_recipes(capsys, flag, expected):
    recipe = REPO / "recipes/gcn_dfa.yaml"
    assert main(["fit", "--config", str(recipe), *flag]) == 2
    assert _one_line_error(capsys).startswith(f"error: command line ({recipe}): {expected}")


def test_a_user_error_raised_while_a_class_is_instantiated_is_one_line(capsys):
    """jsonargparse wraps a DataModule's own ConfigError (``name: Coraa``) in a ValueError: still one line, with
    where it was set and the class's key (it named the class alone)."""
    recipe = REPO / "recipes/gcn_dfa.yaml"
    assert main(["fit", "--config", str(recipe), "--data.init_args.name", "Coraa"]) == 2
    assert _one_line_error(capsys) == (f"error: command line ({recipe}): data (PlanetoidDataModule): unknown name "
                                       "'Coraa'; choose one of Cora, CiteSeer, PubMed")


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_missing_checkpoint_is_one_line_before_anything_is_built(tmp_path, capsys, subcommand):
    missing = tmp_path / "nope.ckpt"
    assert main([subcommand, "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", str(missing)]) == 2
    assert _one_line_error(capsys) == f"error: ckpt_path {missing}: checkpoint file not found (from {Path.cwd()})"


@pytest.fixture(scope="module")
def gcn_checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of the GCN recipe (one epoch on the shared Cora, private cache)."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "planetoid" / "Cora" / "raw").is_dir():
        pytest.skip("shared Cora not found")
    tmp = tmp_path_factory.mktemp("gcn_ckpt")
    assert _fit("recipes/gcn_dfa.yaml", tmp, "--data.init_args.root", str(SHARED_DATA), "--data.init_args.cache_dir",
                str(tmp / "cache"), "--trainer.max_epochs", "1", "--test_after_fit", "false") == 0
    return next(tmp.rglob("*.ckpt"))


def _truncated(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cut.ckpt"
    out.write_bytes(path.read_bytes()[:20000])  # a copy interrupted midway
    return out


def _plain_state_dict(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "weights.pt"
    torch.save({"conv1.bias": torch.zeros(16)}, out)  # torch.save(model.state_dict()), not a run's checkpoint
    return out


@pytest.mark.parametrize("make, expected", [
    (_truncated, "cannot be read as a checkpoint (OSError: "),
    (_plain_state_dict, "is not a Lightning checkpoint (no 'state_dict'; it holds ['conv1.bias'])"),
], ids=["truncated", "plain state_dict"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(gcn_checkpoint, tmp_path, capsys, subcommand, make, expected):
    bad = make(gcn_checkpoint, tmp_path)
    assert main([subcommand, "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", str(bad)]) == 2
    assert _one_line_error(capsys).startswith(f"error: ckpt_path {bad}: {expected}")


def test_a_checkpoint_of_another_recipe_is_one_line_naming_what_does_not_fit(gcn_checkpoint, tmp_path, capsys):
    """A GCN checkpoint given to the GAT recipe: was Lightning's load_state_dict wall after the data was set up."""
    from conftest import SHARED_DATA

    assert main(["validate", "--config", str(REPO / "recipes/gat_dfa.yaml"), "--ckpt_path", str(gcn_checkpoint),
                 "--data.init_args.root", str(SHARED_DATA), "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--trainer.logger", "false"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"error: ckpt_path {gcn_checkpoint}: does not fit this recipe's model (GAT): 3 shape "
                           "mismatch (model.conv1.bias (16,) in the file, (64,) here; "), line
    assert "4 missing (model.conv1.att_src; model.conv1.att_dst; model.conv2.att_src and 1 more)" in line
    assert not (tmp_path / "cache").exists()  # named before the data was set up


def test_the_checkpoint_of_the_same_recipe_still_loads(gcn_checkpoint, tmp_path, capsys):
    from conftest import SHARED_DATA

    assert main(["test", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", str(gcn_checkpoint),
                 "--data.init_args.root", str(SHARED_DATA), "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), *QUIET]) == 0
    assert (tmp_path / "config.yaml").exists()  # the resolved config goes to the run's folder, not the CWD


@pytest.mark.parametrize("flag, expected", [
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches is 0: expected an integer >= 1"),
    (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch is 0: expected an integer >= 1"),
    (["--trainer.val_check_interval", "0"], "trainer.val_check_interval is 0: expected a fraction of an epoch"),
    (["--trainer.max_steps", "-2"], "trainer.max_steps: `max_steps` must be a non-negative integer or -1"),
    (["--trainer.strategy", "ddq"], "trainer.strategy: You selected an invalid strategy name: `strategy='ddq'`"),
    pytest.param(["--trainer.accelerator=gpu"], "trainer.accelerator: No supported gpu backend found!",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param(["--trainer.devices", "-1"], "trainer.devices: `devices` selected with `CPUAccelerator` should be",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param(["--trainer.precision", "transformer-engine"], "trainer.precision: Requirement 'transformer_engine",
                 marks=pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                                          reason="transformer_engine is installed")),
], ids=["accumulate 0", "every 0 epochs", "interval 0", "max_steps", "strategy", "no gpu", "devices -1 on cpu",
        "precision without its package"])
def test_a_trainer_setting_lightning_refuses_is_one_line_naming_the_key(capsys, flag, expected):
    """Lightning's MisconfigurationException, and counts it takes modulo unchecked (a ZeroDivisionError mid-run)."""
    recipe = REPO / "recipes/gcn_dfa.yaml"
    assert main(["fit", "--config", str(recipe), *flag, "--trainer.logger", "false"]) == 2
    assert _one_line_error(capsys).startswith(f"error: command line ({recipe}): {expected}")


def test_a_val_check_interval_longer_than_the_epoch_is_one_line_naming_the_key(tmp_path, capsys):
    """Lightning's own ValueError once the epoch's length is known (GCN: one full-graph batch per epoch)."""
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--trainer.val_check_interval", "5") == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"error: command line ({REPO / 'recipes/gcn_dfa.yaml'}): trainer.val_check_interval: "
                           "`val_check_interval` (5) must be less than or equal to the number of the training "
                           "batches (1)"), line
    assert not list((tmp_path / "logs").rglob("version_*"))  # refused inside fit: its empty run folder is gone


@pytest.mark.parametrize("ckpt_path, expected", [
    ("hpc", 'ckpt_path hpc: `.{sub}(ckpt_path="hpc")` is set but no HPC checkpoint was found'),
    ("registry", "ckpt_path registry: Checkpoint file not found: registry"),
    ("https://example.invalid/x.ckpt", "ckpt_path https://example.invalid/x.ckpt: Checkpoint file not found"),
    ("s3://bucket/x.ckpt", "ckpt_path s3://bucket/x.ckpt: Install s3fs to access S3"),
], ids=["hpc", "registry", "url", "s3 without s3fs"])
@pytest.mark.parametrize("subcommand", ["fit"])  # (test resolves the path the same way)
def test_a_checkpoint_lightning_resolves_itself_is_one_line_when_it_cannot(cora_root, tmp_path, capsys, ckpt_path,
                                                                          expected, subcommand):
    """`hpc`, `registry` and URLs are left to Lightning (a real user can fetch a URL); its refusal was a traceback."""
    if ckpt_path.startswith("s3") and importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    assert main([subcommand, "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", ckpt_path, *QUIET,
                 "--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert _one_line_error(capsys).startswith(f"error: {expected.format(sub=subcommand)}")


@pytest.mark.parametrize("precision", ["64-true"])
def test_a_graph_batch_gets_the_precisions_input_cast(cora_root, tmp_path, capsys, precision):
    """Lightning casts the tensors of a collection batch, not those in torch_geometric's Data: `precision: 64`
    met float features with double weights (a dtype RuntimeError in the first layer)."""
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--trainer.precision", precision, "--trainer.max_epochs", "3",
                "--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache")) == 0
    assert "TEST (best checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_without_a_checkpoint_is_refused_not_scored_on_untrained_weights(capsys, subcommand):
    """`test` after `fit` in a new command, without --ckpt_path, printed a normal table for the initial weights."""
    recipe = str(REPO / "recipes/gcn_dfa.yaml")
    assert main([subcommand, "--config", recipe]) == 2
    assert _one_line_error(capsys).startswith(f"error: {subcommand} without --ckpt_path would score the untrained "
                                              "initial weights")
    assert main([subcommand, "--config", recipe, "--ckpt_path", "best"]) == 2  # was Lightning's ValueError wall
    assert "is the best checkpoint of a fit in the same command" in _one_line_error(capsys)


def test_ckpt_path_init_scores_the_initial_weights_on_purpose(tmp_path, capsys):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "planetoid" / "Cora" / "raw").is_dir():
        pytest.skip("shared Cora not found")
    assert main(["test", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", "init", "--trainer.logger",
                 "false", "--data.init_args.root", str(SHARED_DATA), "--data.init_args.cache_dir",
                 str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path), *QUIET]) == 0


def test_predict_on_a_datamodule_without_prediction_data_is_one_line(gcn_checkpoint, capsys):
    assert main(["predict", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", str(gcn_checkpoint)]) == 2
    assert _one_line_error(capsys) == ("error: predict: PlanetoidDataModule has no prediction data (no "
                                       "predict_dataloader); `test --ckpt_path <file>` scores a checkpoint on the "
                                       "test split")


@pytest.mark.parametrize("spelling", ["spaced", "equals"])
def test_an_override_typed_before_the_recipe_that_sets_it_is_refused(capsys, spelling):
    """Arguments apply in order: `--trainer.max_epochs 2 --config r.yaml` trained the recipe's 250 epochs (and with
    `--config=r.yaml` it still did, unrefused)."""
    recipe = str(REPO / "recipes/gcn_dfa.yaml")
    config = ["--config", recipe] if spelling == "spaced" else [f"--config={recipe}"]
    assert main(["fit", "--trainer.max_epochs", "2", *config]) == 2
    assert _one_line_error(capsys) == (f"error: command line: --trainer.max_epochs comes before --config {recipe}, "
                                       "which sets it again (later arguments win); put overrides after the --config "
                                       "they change")
    cli = run(["--config", recipe, "--trainer.max_epochs", "2"], run=False)  # the other order overrides
    assert cli.trainer.max_epochs == 2


@pytest.mark.parametrize("given, expected", [
    ("gcn_dfa", "gcn_dfa: recipe file not found (from {cwd}) (did you mean recipes/gcn_dfa.yaml?)"),
    ("recipes", "recipes: is a folder, not a recipe file (from {cwd})"),
], ids=["stem", "folder"])
def test_a_recipe_that_is_not_a_file_says_what_it_is(capsys, monkeypatch, given, expected):
    monkeypatch.chdir(REPO)
    assert main(["fit", "--config", given]) == 2
    assert _one_line_error(capsys) == "error: " + expected.format(cwd=REPO)


def test_an_empty_recipe_is_named_as_empty(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["fit", "--config", str(tmp_path / "empty.yaml")]) == 2
    assert _one_line_error(capsys) == f"error: {tmp_path / 'empty.yaml'}: the recipe is empty"


def test_a_recipe_or_fragment_that_is_not_valid_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    """A bracket left open gave pages of yaml.ParserError traceback, raised while the error line was being built."""
    recipe = (REPO / "recipes/gcn_dfa.yaml").read_text().replace("max_epochs: 250", "max_epochs: [250")
    (tmp_path / "bad.yaml").write_text(recipe)
    assert main(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert _one_line_error(capsys) == (f"error: {tmp_path / 'bad.yaml'}: line 7, column 3: not valid YAML (expected "
                                       "',' or ']', but got '<scalar>')")
    (tmp_path / "frag.yaml").write_text("class_path: dfa_lightning.callbacks.AlignmentMonitor\n"
                                        "init_args: {every_n_steps: [3\n")
    good = str(REPO / "recipes/gcn_dfa.yaml")
    assert main(["fit", "--config", good, f"--trainer.callbacks+={tmp_path / 'frag.yaml'}"]) == 2
    assert _one_line_error(capsys) == (f"error: command line ({good}): invalid value for 'trainer.callbacks': fragment "
                                       f"{tmp_path / 'frag.yaml'}: line 3, column 1: not valid YAML (expected ',' or "
                                       "']', but got '<stream end>')")


@pytest.mark.parametrize("where", ["command line", "command line with init_args", "recipe"])
def test_a_setting_of_the_wrong_type_is_named_with_the_type_expected_not_as_an_unknown_key(tmp_path, capsys, where):
    """`feedback_points: hidden` (no brackets) was "FeedbackAlignmentStrategy has no argument 'feedback_points'" on
    the command line, and an empty reason in a recipe; typed with its `init_args` level it is still the command
    line's, not the recipe's."""
    if where.startswith("command line"):
        recipe = REPO / "recipes/gcn_dfa.yaml"
        key = "trainer.callbacks." + ("init_args." if "init_args" in where else "") + "feedback_points"
        argv = ["fit", "--config", str(recipe), f"--{key}", "hidden"]
        prefix = f"command line ({recipe})"
    else:
        recipe = _edited_recipe(tmp_path, "gcn_dfa.yaml", "feedback_points: [hidden]", "feedback_points: hidden")
        argv, prefix = ["fit", "--config", str(recipe)], str(recipe)
    assert main(argv) == 2
    assert _one_line_error(capsys) == (f"error: {prefix}: invalid value for 'trainer.callbacks.init_args."
                                       "feedback_points': expected list[str] or null, got 'hidden'")


def test_an_overlay_given_before_its_recipe_says_to_swap_them(capsys):
    assert main(["fit", "--config", str(REPO / "recipes/sample/lm_wikitext2_cpu.yaml"), "--config",
                 str(REPO / "recipes/lm_dfa_macro.yaml")]) == 2
    assert "give the recipe before an overlay (--config recipe.yaml --config overlay.yaml)" in _one_line_error(capsys)


@pytest.mark.parametrize("groups, expected", [
    ('[{"params": "conv1.**", "weight_decy": 0.1}]', "Adam has no option 'weight_decy' (did you mean 'weight_decay'?)"),
    ('[{"params": "conv1.**", "lr": -1}]', "lr must be a finite number >= 0, got -1"),
    ('[{"params": "conv1.**", "lr": "abc"}]', "lr must be a finite number >= 0, got 'abc'"),
    ('[{"params": "conv1.**", "lr": .nan}]', "lr must be a finite number >= 0, got nan"),
    ('[{"params": "conv1.**"}, {"params": "conv1.lin.weight", "lr": 0.1}]',
     "recipes/gcn_dfa.yaml): model.param_groups pattern 'conv1.lin.weight' matches only parameters an earlier entry "
     "took (conv1.lin.weight)"),
], ids=["misspelt option", "negative lr", "string lr", "nan lr", "taken by an earlier entry"])
def test_a_param_groups_mistake_is_one_line_not_a_silent_change_of_the_experiment(tmp_path, capsys, groups, expected):
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--model.param_groups", groups) == 2
    assert expected in _one_line_error(capsys)


def test_a_param_groups_pattern_matching_nothing_names_the_recipe_that_set_it(tmp_path, capsys):
    """Refused once the run has begun (the optimizer is built then): the message named the setting, not the file."""
    overlay = tmp_path / "groups.yaml"
    overlay.write_text("model:\n  param_groups:\n    - params: 'conv9.**'\n      weight_decay: 1.0e-4\n")
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--config", str(overlay)) == 2
    assert _one_line_error(capsys).startswith(f"error: {REPO / 'recipes/gcn_dfa.yaml'}, {overlay}: model.param_groups "
                                              "pattern 'conv9.**' matches no parameter; names: conv1.bias")


def test_an_optimizer_torch_refuses_is_one_line_naming_model_optimizer(tmp_path, capsys):
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--model.optimizer.init_args.eps", "-1") == 2
    assert _one_line_error(capsys) == (f"error: command line ({REPO / 'recipes/gcn_dfa.yaml'}): model.optimizer: "
                                       "Invalid epsilon value: -1.0")


def test_a_scheduler_period_of_zero_is_one_line_before_training(tmp_path, capsys):
    """StepLR(step_size=0) was a ZeroDivisionError after the first epoch."""
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--model.lr_scheduler",
                            "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.init_args.step_size", "0") == 2
    assert _one_line_error(capsys) == (f"error: command line ({REPO / 'recipes/gcn_dfa.yaml'}): model.lr_scheduler: "
                                       "StepLR step_size must be >= 1, got 0")


def test_an_output_that_runs_before_the_feedback_points_is_refused(tmp_path, capsys):
    """`output: conv1` below the point `hidden`: conv1 got no update at all while the report said it trained."""
    assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--trainer.callbacks.output", "conv1") == 2
    assert _one_line_error(capsys).startswith(f"error: command line ({REPO / 'recipes/gcn_dfa.yaml'}): "
                                              "FeedbackAlignmentStrategy: output 'conv1' runs before the feedback "
                                              "point(s) hidden")


def test_a_bad_feedback_setting_is_one_line_naming_the_callback_before_a_run_folder_is_made(tmp_path, capsys):
    recipe = _edited_recipe(tmp_path, "gcn_dfa.yaml", "method: dfa", "method: dfa\n        operator: denze")
    assert main(["fit", "--config", str(recipe), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]) == 2
    assert _one_line_error(capsys) == (f"error: {recipe}: trainer.callbacks (FeedbackAlignmentStrategy): operator "
                                       "must be one of ('dense', 'lowrank', 'sparse'), got 'denze'")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(("key", "value", "expected"), [("in_channels", "1400", "1433 features"),
                                                       ("out_channels", "3", "7 classes")])
def test_channels_that_do_not_fit_the_data_are_one_line_before_training(key, value, expected, cora_root, tmp_path,
                                                                       capsys):
    """A matmul shape error in the first forward, or `IndexError: Target 3 is out of bounds` in the first loss."""
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), f"--model.model.init_args.{key}", value) == 2
    assert _one_line_error(capsys) == (f"error: model.model.init_args.{key} is {value}, but the data has {expected} "
                                       f"(PlanetoidDataModule); set it to {expected.split()[0]}")


@pytest.mark.parametrize("spelling", ["spaced", "equals"])
def test_a_missing_recipe_file_is_one_line_saying_so(tmp_path, capsys, spelling):
    missing = tmp_path / "gcn_dfa_typo.yaml"
    assert main(["fit", *(["--config", str(missing)] if spelling == "spaced" else [f"--config={missing}"])]) == 2
    assert _one_line_error(capsys) == f"error: {missing}: recipe file not found (from {Path.cwd()})"


def test_unknown_model_argument_names_the_class(capsys):
    assert main(["fit", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--model.model.init_args.hiden", "3"]) == 2
    line = _one_line_error(capsys)
    assert "model.model.init_args.hiden" in line and "GCN has no argument 'hiden'" in line


def test_missing_dataset_directory_is_one_line_naming_the_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--data.init_args.root", str(missing),
                "--data.init_args.download", "false", "--data.init_args.cache_dir", str(tmp_path / "cache")) == 2
    line = _one_line_error(capsys)
    assert str(missing) in line and "does not exist" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def _edited_recipe(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (REPO / "recipes" / name).read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new).replace("../callbacks/", f"{REPO}/callbacks/"))
    return path


def test_feedback_pattern_matching_nothing_lists_the_modules(cora_root, tmp_path, capsys):
    recipe = _edited_recipe(tmp_path, "gcn_dfa.yaml", "feedback_points: [hidden]", "feedback_points: [hiddn]")
    assert _fit(str(recipe), tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache")) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"error: {recipe}: FeedbackAlignmentStrategy: feedback point 'hiddn' matches no module of "
                           "GCN; modules: conv1")
    assert "hidden" in line  # the recipe that set it is named: the pattern is refused once the run has begun
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not list((tmp_path / "logs").rglob("version_*"))  # refused in setup: the run's empty folder is gone


def test_nan_loss_is_one_line_and_leaves_no_checkpoint_from_the_bad_step(tmp_path, capsys):
    args = ["fit", "--model.model", "dfa_lightning.models.mlp.MLP", "--model.model.in_features", "32",
            "--model.model.out_features", "4", "--model.task", "dfa_lightning.tasks.classification.Classification",
            "--model.task.num_classes", "4", "--data", "helpers.NaNAfterOneStepDataModule",
            "--trainer.max_epochs", "2", "--trainer.callbacks+=" + str(REPO / "callbacks/best_val_acc.yaml"),
            "--trainer.callbacks+=dfa_lightning.callbacks.FeedbackAlignmentStrategy",
            "--trainer.callbacks.feedback_points", "[blocks.*]", *QUIET,
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(args) == 2
    line = _one_line_error(capsys)
    assert "loss is nan at epoch 0, global step 1" in line
    assert not list(tmp_path.rglob("*.ckpt"))  # validation never ran on a good epoch: nothing claims to be good
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # a step was trained: its run folder (its logs) is kept


def test_a_nan_validation_loss_is_one_line_and_no_checkpoint_claims_those_weights(tmp_path, capsys):
    args = ["fit", "--model.model", "dfa_lightning.models.mlp.MLP", "--model.model.in_features", "32",
            "--model.model.out_features", "4", "--model.task", "dfa_lightning.tasks.classification.Classification",
            "--model.task.num_classes", "4", "--data", "helpers.NaNValidationDataModule",
            "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks+=" + str(REPO / "callbacks/best_val_loss.yaml"), *QUIET,
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(args) == 2
    assert "validation loss is nan at epoch 0" in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_two_learning_rules_in_one_run_are_one_clear_line(capsys):
    args = ["fit", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--trainer.callbacks+=" + str(REPO / "callbacks/bp.yaml")]
    assert main(args) == 2
    assert "a run has one learning rule" in _one_line_error(capsys)


def test_per_network_rules_need_a_distinct_name_each_and_one_method(tmp_path, capsys):
    """NeRF's recipes hold one rule per field (named coarse and fine); an unnamed extra rule, a repeated name or
    a mix of methods is still one clear line."""
    dfa = REPO / "recipes/nerf_dfa.yaml"
    assert main(["fit", "--config", str(dfa), "--trainer.callbacks+=" + str(REPO / "callbacks/dfa.yaml")]) == 2
    assert "a distinct `name` each" in _one_line_error(capsys)
    text = dfa.read_text().replace("../callbacks/", str(REPO / "callbacks") + "/")
    fine = text.index("name: fine")
    for label, edited in (("repeated", text[:fine] + text[fine:].replace("name: fine", "name: coarse", 1)),
                          ("mixed", text[:fine] + text[fine:].replace("method: dfa", "method: shallow", 1))):
        recipe = tmp_path / f"{label}.yaml"
        recipe.write_text(edited)
        assert main(["fit", "--config", str(recipe)]) == 2
        assert "the same method and a distinct `name` each" in _one_line_error(capsys)


def test_a_run_is_named_after_its_recipe_not_after_an_override():
    cli = run(["--config", str(REPO / "recipes/nerf_dfa.yaml"), "--config",
               str(REPO / "recipes/sample/nerf_lego_100px.yaml")], run=False)
    assert cli.trainer.logger.name == "nerf_dfa"
    assert cli.datamodule.folder == "nerf_synthetic_100px" and cli.model.model.coarse.trunk[0].out_features == 128


def test_the_lego_sample_trains_with_density_noise_and_the_blender_recipes_without():
    """In the sample's small network a field can start with every density below zero and then gets no gradient
    (7 of 40 fields over 20 seeds, benchmarks/results/nerf_lego_100px_init_density.md): the sample adds NeRF's
    density noise in training; the full Blender recipes keep the paper's 0."""
    sample = run(["--config", str(REPO / "recipes/nerf_dfa.yaml"), "--config",
                  str(REPO / "recipes/sample/nerf_lego_100px.yaml")], run=False)
    assert sample.model.task.noise_std == 1.0
    assert run(["--config", str(REPO / "recipes/nerf_dfa.yaml")], run=False).model.task.noise_std == 0.0


def test_the_llff_override_switches_a_nerf_recipe_to_fern_with_the_papers_llff_settings():
    cli = run(["--config", str(REPO / "recipes/nerf_bp.yaml"), "--config",
               str(REPO / "recipes/sample/nerf_llff_fern.yaml")], run=False)
    data, task = cli.datamodule, cli.model.task
    assert (data.dataset, data.scene, data.rays_per_batch, data.precrop_steps) == ("llff", "fern", 4096, 0)
    assert task.noise_std == 1.0 and cli.trainer.max_steps == 200_000


def test_the_cpu_sized_fern_override_keeps_the_llff_settings_and_shrinks_the_run():
    cli = run(["--config", str(REPO / "recipes/nerf_dfa.yaml"), "--config", str(REPO / "recipes/sample/nerf_llff_fern.yaml"),
               "--config", str(REPO / "recipes/sample/nerf_llff_fern_cpu.yaml")], run=False)
    data, task, model = cli.datamodule, cli.model.task, cli.model.model
    assert (data.dataset, data.scene, data.rays_per_batch, data.precrop_steps, data.val_views) == ("llff", "fern", 1024, 0, 1)
    assert task.noise_std == 1.0 and (task.coarse_samples, task.fine_samples) == (32, 32)
    assert len(model.coarse.trunk) == 4 and model.coarse.sigma_head.in_features == 128
    assert cli.trainer.max_steps == 1000


@pytest.mark.parametrize("recipe", ["lm_bp", "lm_dfa_macro", "lm_dfa_micro", "lm_dfa_macro_after_vocab", "lm_shallow"])
def test_the_cpu_sized_lm_override_shrinks_every_lm_recipe_and_keeps_its_rule(recipe):
    base = run(["--config", str(REPO / f"recipes/{recipe}.yaml")], run=False)
    cli = run(["--config", str(REPO / f"recipes/{recipe}.yaml"), "--config",
               str(REPO / "recipes/sample/lm_wikitext2_cpu.yaml")], run=False)
    model, data = cli.model.model, cli.datamodule
    assert (len(model.blocks), model.decoder.in_features, model.decoder.out_features) == (2, 128, 8000)
    assert (data.tokenizer, data.bpe_vocab_size, data.streams, data.seq_len) == ("bpe", 8000, 16, 64)
    assert cli.trainer.max_steps == 1000 and cli.trainer.val_check_interval == 250
    rule = lambda c: [cb for cb in c.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"][0].config
    assert rule(cli) == rule(base)  # the override changes the size, never the learning rule


def test_a_feedback_point_on_the_last_layer_is_named_in_a_warning_before_training(tmp_path):
    """`feedback_points: [conv2]` on the GCN: conv2 is the output layer, so it trained on B e in silence."""
    with pytest.warns(UserWarning, match="feedback point 'conv2' .GCNConv. has nothing trainable between it and the "
                                         "model's output"):
        assert _fit_shared_cora("recipes/gcn_dfa.yaml", tmp_path, "--trainer.max_epochs", "1",
                                "--trainer.callbacks.feedback_points", "[hidden, conv2]") == 0


def test_shallow_with_a_point_on_the_last_layer_is_one_line_before_training(tmp_path, capsys):
    assert _fit_shared_cora("recipes/gcn_shallow.yaml", tmp_path, "--trainer.callbacks.feedback_points",
                            "[hidden, conv2]") == 2
    assert _one_line_error(capsys).startswith(f"error: command line ({REPO / 'recipes/gcn_shallow.yaml'}): "
                                              "FeedbackAlignmentStrategy: method shallow: the model's output depends "
                                              "on no trainable")


@pytest.mark.parametrize("callbacks", ["[../callbacks/best_val_acc.yaml]", "[]", "callbacks/alignment.yaml"])
def test_replacing_the_callbacks_list_without_a_rule_is_refused_as_it_silently_trained_by_backprop(
        callbacks, cora_root, tmp_path, capsys):
    """`--trainer.callbacks [...]` replaces the recipe's list: the DFA rule went with it, and gcn_dfa trained by BP
    under its own name (one callback without brackets was an NSKeyError traceback)."""
    value = callbacks.replace("../callbacks/", f"{REPO}/callbacks/").replace("callbacks/alignment",
                                                                              f"{REPO}/callbacks/alignment")
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.callbacks", value) == 2
    assert _one_line_error(capsys).startswith("error: --trainer.callbacks replaces the recipe's whole callbacks "
                                              "list, and the new one has no FeedbackAlignmentStrategy")
    assert not (tmp_path / "logs").exists()


def test_a_list_that_keeps_a_rule_or_an_added_callback_still_trains(cora_root, tmp_path):
    common = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--trainer.max_epochs", "1"]
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, *common, "--trainer.callbacks",
                f"[{REPO}/callbacks/best_val_acc.yaml, {REPO}/callbacks/dfa.yaml]") == 0
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, *common, f"--trainer.callbacks+={REPO}/callbacks/lr_monitor.yaml") == 0


@pytest.mark.parametrize(("key", "value"), [("max_epochs", "0"), ("max_steps", "0"), ("limit_train_batches", "0")])
def test_a_fit_bounded_to_no_training_step_is_refused_rather_than_testing_the_untrained_weights(
        key, value, cora_root, tmp_path, capsys):
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), f"--trainer.{key}", value) == 2
    assert _one_line_error(capsys) == (f"error: command line ({REPO}/recipes/gcn_dfa.yaml): trainer.{key} is 0: fit "
                                       "would take no training step and test the untrained weights; to score those, "
                                       "run `test --ckpt_path init`")


def test_make_train_with_an_empty_recipe_says_so():
    """It was `error: --trainer.max_epochs: recipe file not found`: the first ARGS word taken for the recipe."""
    import subprocess

    done = subprocess.run(["make", "-s", "train", "RECIPE=", "ARGS=--trainer.max_epochs 1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "error: RECIPE is empty; e.g. make train RECIPE=recipes/gcn_dfa.yaml" in done.stderr


@pytest.mark.parametrize(("recipe", "flag", "value", "expected"), [
    ("gcn_dfa.yaml", "hidden", "0", "hidden is 0: expected an integer >= 1"),
    ("gcn_dfa.yaml", "hidden", "-4", "hidden is -4: expected an integer >= 1"),
    ("gcn_dfa.yaml", "dropout", "1.5", "dropout is 1.5: expected a probability in [0, 1]"),
    ("lm_dfa_macro.yaml", "n_heads", "0", "n_heads is 0: expected an integer >= 1"),
    ("deepfm_dfa.yaml", "mlp_dims", "[]", "mlp_dims is []: expected at least one layer width"),
    ("deepfm_dfa.yaml", "mlp_dims", "[0]", "mlp_dims is [0]: expected widths >= 1"),
], ids=["hidden 0", "hidden -4", "dropout 1.5", "n_heads 0", "mlp_dims []", "mlp_dims [0]"])
def test_a_model_size_below_1_or_a_dropout_outside_0_1_is_one_line_before_anything_is_built(
        recipe, flag, value, expected, tmp_path, capsys):
    """They were tracebacks deep in PyTorch: an uninitialised lazy parameter, a ZeroDivisionError in the heads, an
    IndexError on the empty MLP."""
    assert _fit(f"recipes/{recipe}", tmp_path, f"--model.model.init_args.{flag}", value) == 2
    assert _one_line_error(capsys) == (f"error: command line ({REPO}/recipes/{recipe}): "
                                       f"model.model.init_args.{expected}")
    assert not (tmp_path / "logs").exists()


def test_a_nerf_batch_too_big_for_memory_is_one_line_before_anything_trains(shared_data, tmp_path, monkeypatch, capsys):
    """A huge `rays_per_batch` was the kernel's out-of-memory kill, with no message at all."""
    if not (shared_data / "nerf/nerf_synthetic_100px/lego/transforms_train.json").is_file():
        pytest.skip("lego 100px not in the shared data")
    import dfa_lightning.tasks.view_synthesis as vs

    monkeypatch.setattr(vs, "free_bytes", lambda device: 2**30)  # as if 1 GiB were free
    recipe = ["recipes/nerf_dfa.yaml", "--config", str(REPO / "recipes/sample/nerf_lego_100px.yaml"),
              "--data.init_args.root", str(shared_data), "--data.init_args.download", "false",
              "--trainer.max_steps", "1"]
    assert _fit(*recipe[:1], tmp_path, *recipe[1:], "--data.init_args.rays_per_batch", "20000") == 2
    line = _one_line_error(capsys)
    assert "rays_per_batch 20000: one training step needs at least" in line and "free on cpu" in line, line
    assert _fit(*recipe[:1], tmp_path, *recipe[1:], "--data.init_args.rays_per_batch", "2000000") == 2
    assert "rays_per_batch 2000000 is more than the 1000000 training rays" in _one_line_error(capsys)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))


def test_resuming_a_finished_run_is_refused_and_a_moved_best_checkpoint_falls_back_to_the_final_weights(
        cora_root, tmp_path, capsys):
    """`fit --ckpt_path` at the run's own limit trained nothing and printed the old run's TEST line as its result;
    with the old run folder moved away it ended in a FileNotFoundError after training."""
    data = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    assert _fit("recipes/gcn_dfa.yaml", tmp_path / "first", *data, "--trainer.max_epochs", "2",
                "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last", "true") == 0
    best = next((tmp_path / "first" / "logs").rglob("last.ckpt"))
    kept = tmp_path / "kept.ckpt"
    shutil.copy(best, kept)
    capsys.readouterr()
    assert _fit("recipes/gcn_dfa.yaml", tmp_path / "again", *data, "--trainer.max_epochs", "2",
                "--ckpt_path", str(kept)) == 2
    line = _one_line_error(capsys)
    assert f"error: fit --ckpt_path {kept}: the checkpoint (epoch" in line and "trainer.max_epochs 2" in line, line
    assert not list((tmp_path / "again").rglob("version_*"))  # nothing trained: no empty run folder left behind
    shutil.rmtree(tmp_path / "first")  # the resumed run's best checkpoint is gone
    with pytest.warns(UserWarning, match="recorded by the resumed run\\) is gone: testing the final weights"):
        assert _fit("recipes/gcn_dfa.yaml", tmp_path / "again", *data, "--trainer.max_epochs", "3",
                    "--trainer.limit_val_batches", "0", "--ckpt_path", str(kept)) == 0  # no new best to replace it
    assert "TEST (final weights)" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, expected", [
    ("lr", "0.5", "(lr, weight_decay) (0.01, 0.0001) in parameter group 0, the recipe (0.5, 0.0001)"),
    ("weight_decay", "0.1", "(lr, weight_decay) (0.01, 0.0) in parameter group 1, the recipe (0.01, 0.1)"),
], ids=["lr", "weight decay"])
def test_resuming_with_another_learning_rate_or_weight_decay_is_refused(cora_root, tmp_path, capsys, flag, value,
                                                                       expected):
    """Lightning restores the checkpoint's optimizer: the recipe's new lr or weight decay was silently dropped."""
    data = ["--data.init_args.root", str(cora_root), "--data.init_args.cache_dir", str(tmp_path / "cache")]
    assert _fit("recipes/gcn_dfa.yaml", tmp_path / "first", *data, "--trainer.max_epochs", "1") == 0
    ckpt = str(next((tmp_path / "first" / "logs").rglob("*.ckpt")))
    capsys.readouterr()
    assert _fit("recipes/gcn_dfa.yaml", tmp_path / "again", *data, "--trainer.max_epochs", "2", "--ckpt_path", ckpt,
                f"--model.optimizer.init_args.{flag}", value) == 2
    assert f"the checkpoint's optimizer has {expected}" in _one_line_error(capsys)
    assert not list((tmp_path / "again").rglob("version_*"))  # refused before its first step: no run folder
    if flag == "lr":  # and under another rule: refused while restoring, its step not yet restored
        assert _fit("recipes/gcn_bp.yaml", tmp_path / "bp", *data, "--trainer.max_epochs", "2", "--ckpt_path",
                    ckpt) == 2
        assert "the checkpoint was trained by dfa and this recipe trains by bp" in _one_line_error(capsys)
        assert not list((tmp_path / "bp").rglob("version_*"))


def test_model_argument_checks_allow_zero_only_where_documented_and_check_only_this_packages_sizes():
    deepcross = "dfa_lightning.models.recsys.DeepCrossNetwork"
    assert model_arg_problem(deepcross, {"num_cross_layers": 0, "embed_dim": 1, "mlp_dims": [1]}) is None
    assert model_arg_problem(deepcross, {"embed_dim": 0}) == "embed_dim is 0: expected an integer >= 1"
    assert model_arg_problem(deepcross, {"embed_dim": True}) == "embed_dim is True: expected an integer >= 1"
    assert model_arg_problem(deepcross, {"dropout": 0}) is None and model_arg_problem(deepcross, {"dropout": 1}) is None
    assert model_arg_problem("torch.nn.Linear", {"in_features": 0}) is None  # not ours: its ints may mean anything


def test_a_null_is_refused_only_where_the_argument_has_a_value_by_default():
    assert null_arg_problem("torch.optim.Adam", {"lr": None}) == "lr is null: Adam takes a value here (default 0.001)"
    assert null_arg_problem("torch.optim.lr_scheduler.OneCycleLR", {"total_steps": None}) is None


def test_learning_rate_zero_is_refused_unless_a_group_or_the_scheduler_sets_a_rate():
    assert learning_rate_problem(0, {}, []).startswith("lr is 0: no parameter would change")
    assert learning_rate_problem(0, {}, [{"lr": 0}]).startswith("lr is 0: ")
    assert learning_rate_problem(-0.1, {}, []) == "lr is -0.1: expected a rate > 0"
    assert learning_rate_problem(0, {"max_lr": 0.1}, []) is None and learning_rate_problem(0, {}, [{"lr": 0.1}]) is None
    assert learning_rate_problem(1e-3, {}, []) is None


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_finite_is_refused_not_called_zero(lr):
    assert learning_rate_problem(lr, {}, []) == f"lr is {lr}: expected a finite rate > 0"


def test_state_dict_mismatch_skips_what_loading_itself_accepts():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    saved = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3), "embedding.weight": torch.zeros(9, 2)}
    assert state_dict_mismatch(saved, model) == "1 unexpected (embedding.weight)"
    assert state_dict_mismatch(saved, model, unbuilt=True) is None  # a CTR table not built yet: not "unexpected"
    assert state_dict_mismatch({"0.weight": torch.zeros(3, 2)}, model) == "1 missing (0.bias)"
    assert state_dict_mismatch({"0.weight": torch.zeros(3, 2)}, model, strict=False) is None
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))  # sized by the checkpoint, as load_state_dict does
    assert state_dict_mismatch({"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3)}, lazy) is None


def test_lr_zero_is_refused_under_a_scheduler_whose_lr_named_argument_starts_no_rate():
    """ReduceLROnPlateau's ``min_lr`` and LambdaLR's ``lr_lambda`` have "lr" in their names but only scale or floor
    a decrease: from lr 0 the rate stays 0, so the run would still report the initial weights as trained."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, min_lr=1e-3)
    for _ in range(3):
        plateau.step(1.0)
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert learning_rate_problem(0, {"mode": "min", "patience": 0, "min_lr": 1e-3}, []).startswith("lr is 0: ")
    assert learning_rate_problem(0, {"lr_lambda": lambda step: 1.0}, []).startswith("lr is 0: ")
    assert learning_rate_problem(0, {"base_lr": 0.01, "max_lr": 0.1}, []) is None  # CyclicLR sets its own rate
    assert learning_rate_problem(0, {"T_max": 4, "eta_min": 0.1}, []) is None  # cosine: anneals from 0 up to 0.1
    assert learning_rate_problem(0, {"max_lr": 0, "total_steps": 9}, []).startswith("lr is 0: ")


USER_MODEL = '''
from torch import nn


class TinyCNN(nn.Module):
    """A user's own network: nothing in it knows of DFA."""

    def __init__(self, side: int = 4, classes: int = 4, channels: int = 6) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(channels * side * side, classes)

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, self.side, self.side)).flatten(1))
'''

USER_RECIPE = """
seed_everything: 0
trainer:
  max_epochs: 2
  callbacks:
    - class_path: dfa_lightning.callbacks.FeedbackAlignmentStrategy
      init_args:
        feedback_points: [torch.nn.Conv2d]
model:
  model:
    class_path: my_models.TinyCNN
  task:
    class_path: dfa_lightning.tasks.classification.Classification
    init_args:
      num_classes: 4
data:
  class_path: dfa_lightning.data.synthetic.SyntheticClassificationDataModule
  init_args:
    num_samples: 64
    in_features: 16
    batch_size: 16
"""


def test_a_users_own_model_trains_by_dfa_from_a_recipe_with_points_chosen_by_module_type(tmp_path, monkeypatch):
    """The card's promise: any model, by configuration only. A conv net in the user's own package, its points
    given by type: each conv's [N, C, H, W] output gets B e over its C·H·W features, and every weight trains."""
    (tmp_path / "my_models.py").write_text(USER_MODEL)
    (tmp_path / "recipe.yaml").write_text(USER_RECIPE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = run(["--config", str(tmp_path / "recipe.yaml"), *QUIET, "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"], run=False)
    before = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    (rule,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"]
    assert [(p.name, p.width) for p in rule.engine.points] == [("features.0", 96), ("features.2", 96)]
    assert rule.engine.segments["features.0"] and rule.engine.segments["features.2"]
    for name, p in cli.model.model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not train"


def test_an_override_inside_a_recipe_list_typed_before_the_recipe_is_refused(capsys):
    """`--trainer.callbacks.feedback_points [conv1] --config r.yaml`: the recipe's callbacks list comes after and
    replaces what the flag set, so the rule would keep the recipe's points without a word."""
    recipe = str(REPO / "recipes/gcn_dfa.yaml")
    assert main(["fit", "--trainer.callbacks.feedback_points", "[conv1]", "--config", recipe]) == 2
    assert _one_line_error(capsys) == (f"error: command line: --trainer.callbacks.feedback_points comes before "
                                       f"--config {recipe}, which sets it again (later arguments win); put overrides "
                                       "after the --config they change")


def test_a_misspelt_key_given_with_equals_is_named_without_its_value_and_with_a_close_match(capsys):
    recipe = REPO / "recipes/gcn_dfa.yaml"
    assert main(["fit", "--config", str(recipe), "--trainer.max_epoch=1"]) == 2
    assert _one_line_error(capsys) == (f"error: command line ({recipe}): unknown key 'trainer.max_epoch' (did you "
                                       "mean 'trainer.max_epochs'?)")


def test_the_largest_seed_numpy_takes_is_accepted():
    cli = run(["--config", str(REPO / "recipes/gcn_dfa.yaml"), "--seed_everything", str(2 ** 32 - 1)], run=False)
    assert cli.config["seed_everything"] == 2 ** 32 - 1


def test_a_folder_given_as_the_checkpoint_is_one_line_naming_the_checkpoints_in_it(tmp_path, capsys):
    """Before anything is built; a run's checkpoints/ folder is the usual slip."""
    (tmp_path / "best-epoch007.ckpt").touch()
    (tmp_path / "last.ckpt").touch()
    (tmp_path / "checkpoints").mkdir()  # a run's version folder: its checkpoints sit one level down
    (tmp_path / "checkpoints" / "best-epoch001.ckpt").touch()
    assert main(["test", "--config", str(REPO / "recipes/gcn_dfa.yaml"), "--ckpt_path", str(tmp_path),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false", *QUIET]) == 2
    assert _one_line_error(capsys) == (f"error: ckpt_path {tmp_path}: a folder, not a checkpoint file (its "
                                       "checkpoints: best-epoch007.ckpt, checkpoints/best-epoch001.ckpt, last.ckpt)")
    assert not (tmp_path / "run").exists()


def test_a_logger_name_the_recipe_or_command_line_gives_is_kept():
    """Only the default name is replaced by the recipe's: a name the user chose must not be overwritten."""
    cli = run(["--config", str(REPO / "recipes/gcn_dfa.yaml"), "--trainer.logger.init_args.name", "mine"], run=False)
    assert cli.trainer.logger.name == "mine"


PLATEAU = ["--model.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau",
           "--model.lr_scheduler.init_args.mode", "max"]


@pytest.mark.parametrize("flags, said", [
    (["--trainer.limit_val_batches", "0"], "trainer.limit_val_batches is 0: validation is off, but model.lr_scheduler "
                                           "ReduceLROnPlateau steps at each epoch's end on val/acc"),
    (["--trainer.check_val_every_n_epoch", "2"], "trainer.check_val_every_n_epoch is 2: epochs end without a "
                                                 "validation"),
    (["--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", "3"],
     "trainer.val_check_interval is 3 batches across epochs of 1: the first epoch ends before the first validation"),
], ids=["validation off", "every other epoch", "by steps beyond the epoch"])
def test_a_plateau_scheduler_without_a_validation_every_epoch_is_refused_before_training(flags, said, cora_root,
                                                                                         tmp_path, capsys):
    """Lightning stopped the run after its first whole epoch ("ReduceLROnPlateau conditioned on metric val/loss which
    is not available"): hours of an LM recipe's training, and no checkpoint."""
    assert _fit("recipes/gcn_bp.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), *PLATEAU, *flags) == 2
    assert said in _one_line_error(capsys)
    assert not (tmp_path / "logs").exists()


def test_validation_on_the_clock_is_passed_to_lightning(cora_root, tmp_path):
    """``val_check_interval: "00:00:01:00"`` (Lightning's time-based validation) was a TypeError in the CLI's check."""
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "2",
                "--trainer.val_check_interval", "00:00:01:00") == 0


def test_fit_from_the_last_checkpoint_by_name_is_refused_not_trained_from_scratch(tmp_path, capsys):
    """Every run logs to a new version folder: Lightning found no `last` there, warned, and trained afresh."""
    assert _fit("recipes/gcn_dfa.yaml", tmp_path, "--ckpt_path", "last") == 2
    assert _one_line_error(capsys).startswith("error: ckpt_path 'last' on fit: every run logs to a new version folder")


def test_a_misspelt_callback_fragment_gets_the_close_match(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["fit", "--config", "recipes/gcn_dfa.yaml", "--trainer.callbacks+=callbacks/alignmnt.yaml"]) == 2
    assert _one_line_error(capsys).endswith("; did you mean 'callbacks/alignment.yaml'?")


MLP_PLATEAU_RECIPE = """
trainer:
  max_epochs: 2
  limit_val_batches: 0
model:
  model:
    class_path: dfa_lightning.models.mlp.MLP
    init_args: {in_features: 16, out_features: 4, hidden: [8]}
  task:
    class_path: dfa_lightning.tasks.classification.Classification
    init_args: {num_classes: 4}
  lr_scheduler:
    class_path: torch.optim.lr_scheduler.ReduceLROnPlateau
    init_args: {mode: max}
data:
  class_path: dfa_lightning.data.synthetic.SyntheticClassificationDataModule
  init_args: {num_samples: 64, in_features: 16, batch_size: 16}
"""


@pytest.mark.parametrize("max_steps, refused", [(1, False), (5, True)])
def test_a_plateau_scheduler_without_validation_is_accepted_when_the_run_ends_inside_its_first_epoch(
        max_steps, refused, tmp_path, capsys):
    """The transport audit runs one step of every recipe with validation off: every LM recipe (ReduceLROnPlateau)
    was refused, though a run that ends inside its first epoch never steps the scheduler (4 batches an epoch here)."""
    (tmp_path / "mlp.yaml").write_text(MLP_PLATEAU_RECIPE)
    code = main(["fit", "--config", str(tmp_path / "mlp.yaml"), *QUIET, "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.logger", "false", "--trainer.max_steps", str(max_steps)])
    assert code == (2 if refused else 0)
    if refused:
        assert "trainer.limit_val_batches is 0: validation is off" in _one_line_error(capsys)


@pytest.mark.parametrize("reader, said", [
    (PLATEAU, "trainer.val_check_interval is a time: epochs end without a validation"),
    (["--trainer.callbacks+=callbacks/early_stopping_auroc_patience3.yaml", "--trainer.max_steps", "5"],
     "trainer.val_check_interval is a time: Lightning's EarlyStopping (monitoring val/auroc) fails"),
], ids=["plateau", "early stopping"])
def test_validation_on_the_clock_is_refused_where_its_readers_cannot_follow_it(reader, said, cora_root, tmp_path,
                                                                             capsys, monkeypatch):
    """The checks read ``trainer.val_check_interval``, which Lightning leaves unset for a time: AttributeError."""
    monkeypatch.chdir(REPO)
    assert _fit("recipes/gcn_bp.yaml", tmp_path, "--data.init_args.root", str(cora_root),
                "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.val_check_interval", "00:00:01:00",
                *reader) == 2
    assert said in _one_line_error(capsys)
